"""The package's architecture: subpackages in layers, no upward import, no import cycle.

Layers, lowest first: the shared base modules (constants, errors, registry, files) -> data ->
training -> attacks -> mple / federated (side by side: neither imports the other) -> book ->
cli and the package root (the public facade). A module may import its own layer and the layers
below; every import counts, also one inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import dpskin_core

PKG = Path(dpskin_core.__file__).resolve().parent
#: top-level name -> layer rank
LAYERS = {"constants": 0, "errors": 0, "registry": 0, "files": 0, "data": 1, "training": 2,
          "attacks": 3, "mple": 4, "federated": 4, "book": 5, "cli": 6, "": 6}


def module_graph(pkg: Path) -> Dict[str, Set[str]]:
    """Dotted module name (relative to the package, '' for its __init__) -> the package modules
    it imports, relative or absolute, anywhere in its source."""
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(pkg).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        for node in ast.walk(ast.parse(f.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}".strip(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == pkg.name:
                mod = node.module.split(".", 1)[1] if "." in node.module else ""
                targets = [mod] + [f"{mod}.{a.name}".strip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".", 1)[1] if "." in a.name else ""
                           for a in node.names if a.name.split(".")[0] == pkg.name]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def layer(module: str) -> Tuple[int, str]:
    top = module.split(".")[0]
    if top not in LAYERS:
        raise AssertionError(f"module {module!r}: its top-level name {top!r} has no layer; add it "
                             "to LAYERS")
    return LAYERS[top], top


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """'a -> b' for each import of a higher layer, or of a sibling subpackage of the same rank."""
    bad = []
    for a, targets in graph.items():
        ra, ta = layer(a)
        for b in targets:
            if a.startswith(b + ".") or b == "":  # a package's own __init__ (re-exports)
                if b == "" and ra < LAYERS[""]:
                    bad.append(f"{a or '__init__'} -> dpskin_core (the facade)")
                continue
            rb, tb = layer(b)
            if rb > ra or (rb == ra and ta != tb and rb > 0):
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring imports of a
    module's own parent packages (an __init__ re-exporting its modules)."""
    edges = {a: {b for b in bs if not a.startswith(b + ".") and b != ""} for a, bs in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_upward_import_and_no_cycle():
    graph = module_graph(PKG)
    assert {"data", "training", "attacks", "book"} <= {m.split(".")[0] for m in graph}
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_training_imports_neither_attacks_nor_book():
    graph = module_graph(PKG)
    for a, targets in graph.items():
        if a.startswith("training") or a.startswith("data"):
            assert not {t for t in targets if t.split(".")[0] in ("attacks", "book", "cli")}, a


@pytest.fixture
def fake_pkg(tmp_path) -> Path:
    pkg = tmp_path / "dpskin_core"
    for sub in ("data", "training", "book"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "data" / "a.py").write_text("from ..errors import x\n")
    (pkg / "training" / "t.py").write_text("from ..data import a\n")
    (pkg / "book" / "b.py").write_text("from ..training.t import run\n")
    return pkg


def test_the_checks_catch_an_upward_import_and_a_cycle(fake_pkg):
    graph = module_graph(fake_pkg)
    assert upward_imports(graph) == [] and cycles(graph) == []
    # a lazy import of the book from the data layer, inside a function
    (fake_pkg / "data" / "a.py").write_text(
        "from ..errors import x\n\ndef f():\n    from ..book import b\n")
    graph = module_graph(fake_pkg)
    assert upward_imports(graph) == ["data.a -> book", "data.a -> book.b"]
    assert cycles(graph) == [["book.b", "data.a", "training.t"]]
    # an absolute import of the facade from a lower layer
    (fake_pkg / "data" / "a.py").write_text("import dpskin_core\n")
    assert upward_imports(module_graph(fake_pkg)) == ["data.a -> dpskin_core (the facade)"]
