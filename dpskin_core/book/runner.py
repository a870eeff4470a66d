"""The book runner: execute the registry's notebooks with papermill, then build the Jupyter Book.

For each experiment of ``experiments.yml`` (in order) under a profile:

1. convert ``notebooks/NAME.py`` (jupytext percent format) to ``_build/notebooks/NAME.ipynb``;
2. compute the execution hash: sha256 of its merged parameters under the profile, the notebook source,
   :func:`dpskin_core.training.records.code_version` and, for notebooks that aggregate run records
   (``reads_runs``), the list of complete runs they read;
3. skip it when ``book/results/NAME.json`` records a finished execution with that hash;
   otherwise execute it with papermill into ``book/results/NAME.ipynb``;
4. carry on past a failure, and report every failure at the end (papermill's error and the
   path of the partial notebook).

Then ``jupyter-book build`` with ``-W -n --keep-going`` (a warning fails the build), and the
path of ``index.html`` is printed; with ``pdf``, also the PDF through LaTeX (:func:`build_pdf`). The exit status is non-zero when any notebook or the build
failed.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ..attacks.cards import SUMMARY_FILE as ATTACK_SUMMARY
from ..errors import ConfigError, DpskinError
from ..files import write_json
from ..training.records import code_version as _code_version
from .registry import Experiment, ExperimentRegistry, load_registry, to_json

PathLike = Union[str, Path]
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path("book") / "results"     # executed notebooks + execution records
STAGING_DIR = Path("_build") / "notebooks"  # jupytext -> ipynb inputs of papermill
BUILD_HTML = Path("_build") / "html"
KERNEL = "python3"
# The kernels draw figures with IPython's inline backend whatever the caller's environment says:
# a ``MPLBACKEND=Agg`` set by a CI machine or a shell profile is inherited by the kernel, and
# under Agg ``plt.show()`` draws nothing, so the book would lose its figures without an error.
KERNEL_MPLBACKEND = "module://matplotlib_inline.backend_inline"


class BookError(DpskinError):
    """The book could not be executed or built."""


# --------------------------------------------------------------------------- notebooks
@contextlib.contextmanager
def kernel_environment():
    """Set the environment the papermill kernels inherit (see KERNEL_MPLBACKEND); restore it."""
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = KERNEL_MPLBACKEND
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old


def _parameters_cell(nb: Any, path: Path) -> Any:
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    raise ConfigError(f"{path}: no cell tagged 'parameters' "
                      "(jupytext percent format: '# %% tags=[\"parameters\"]')")


def notebook_parameters(path: PathLike) -> Dict[str, Any]:
    """Names declared in the notebook's ``parameters`` cell and their default values.

    Defaults that are not literals (e.g. ``Path(...)``) are reported as ``None``.
    """
    import jupytext

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"notebook not found: {p}")
    cell = _parameters_cell(jupytext.read(p), p)
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as e:
        raise ConfigError(f"{p}: the parameters cell is not valid Python: {e}") from None
    out: Dict[str, Any] = {}
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    out[t.id] = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    out[t.id] = None
    return out


def resolve_parameters(registry: ExperimentRegistry, exp: Experiment, profile: str,
                       root: PathLike) -> Dict[str, Any]:
    """The parameters ``exp`` receives under ``profile``: the merged registry values that its
    notebook declares. Profile parameters a notebook does not declare are not passed (not every
    notebook trains); an experiment-level parameter it does not declare is an error."""
    merged = registry.parameters_for(exp, profile)
    declared = notebook_parameters(Path(root) / exp.notebook)
    own = set(exp.parameters) | set(exp.profiles.get(profile, {}))
    undeclared = sorted(own - set(declared))
    if undeclared:
        raise ConfigError(f"{registry.path}: experiment {exp.name!r} sets "
                          f"{', '.join(undeclared)}, which {exp.notebook} does not declare in "
                          "its parameters cell")
    return {k: v for k, v in merged.items() if k in declared}


def runs_fingerprint(runs_root: PathLike) -> List[str]:
    """Sorted ids of the complete runs under ``runs_root`` (what an aggregating notebook reads),
    then, when the attacks chapter has written its privacy table there, that file's digest."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    ids = []
    for d in sorted(root.iterdir()):
        meta = d / "meta.json"
        if meta.is_file():
            try:
                if json.loads(meta.read_text()).get("status") == "complete":
                    ids.append(d.name)
            except (OSError, ValueError):
                continue
    summary = root / ATTACK_SUMMARY
    if summary.is_file():
        digest = hashlib.sha256(summary.read_bytes()).hexdigest()[:12]
        ids.append(f"{ATTACK_SUMMARY.as_posix()}@{digest}")
    return ids


def execution_hash(parameters: Dict[str, Any], source: str, code_version: str,
                   runs: Optional[Sequence[str]] = None) -> str:
    """sha256 of what determines an executed notebook (hex)."""
    payload = json.dumps({"parameters": json.loads(to_json(parameters)), "source": source,
                          "code": code_version, "runs": list(runs) if runs is not None else None},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- execution
@dataclass
class Outcome:
    """What happened to one experiment."""

    name: str
    status: str                       # executed | skipped | failed
    output: Path                      # executed (or partial) notebook
    hash: str = ""
    wall_s: float = 0.0
    error: Optional[str] = None


@dataclass
class BookReport:
    """Everything :func:`run_book` did."""

    profile: str
    outcomes: List[Outcome] = field(default_factory=list)
    index_html: Optional[Path] = None
    build_ok: Optional[bool] = None   # None: not built
    pdf: Optional[Path] = None        # the dissertation PDF (``pdf=True``)

    @property
    def failed(self) -> List[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.build_ok is not False


def _record_path(root: Path, name: str) -> Path:
    return root / RESULTS_DIR / f"{name}.json"


def read_record(root: PathLike, name: str) -> Optional[Dict[str, Any]]:
    """The execution record of experiment ``name`` (None when absent or unreadable)."""
    p = _record_path(Path(root), name)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _write_record(root: Path, name: str, record: Dict[str, Any]) -> None:
    write_json(_record_path(root, name), record)


def _papermill_error(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell is not None else "")
    return f"{type(exc).__name__}: {exc}"


def execute_experiment(exp: Experiment, parameters: Dict[str, Any], root: PathLike, *,
                       profile: str, code_version: str, force: bool = False,
                       merged: Optional[Dict[str, Any]] = None, log_output: bool = True,
                       say: Callable[[str], None] = print) -> Outcome:
    """Execute one experiment unless its recorded hash matches (see module docstring).

    ``parameters`` are passed to the notebook; ``merged`` (default: ``parameters``), every
    parameter of the experiment under the profile, enters the execution hash: a notebook
    that builds recipes from its profile depends on all of them.
    """
    import jupytext
    import papermill as pm

    root = Path(root)
    src = root / exp.notebook
    source = src.read_text()
    merged = parameters if merged is None else merged
    runs = (runs_fingerprint(root / str(merged.get("runs_root", "runs")))
            if exp.reads_runs else None)
    digest = execution_hash(merged, source, code_version, runs)
    out = root / RESULTS_DIR / f"{exp.name}.ipynb"
    rec = read_record(root, exp.name)
    if (not force and rec and rec.get("status") == "complete" and rec.get("hash") == digest
            and out.is_file()):
        say(f"== {exp.name}: unchanged (hash {digest[:12]}), skipped")
        return Outcome(exp.name, "skipped", out, digest, 0.0)

    staged = root / STAGING_DIR / f"{exp.name}.ipynb"
    staged.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, staged)
    say(f"== {exp.name}: executing {exp.notebook} -> {out.relative_to(root)}")
    record = {"name": exp.name, "title": exp.title, "notebook": exp.notebook, "profile": profile,
              "parameters": parameters, "hash": digest, "code_version": code_version,
              "runs_read": len(runs) if runs is not None else None,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    try:
        with kernel_environment():
            pm.execute_notebook(str(staged), str(out), parameters=parameters,
                                kernel_name=KERNEL, cwd=str(root), log_output=log_output,
                                progress_bar=False)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, the others go on
        wall = time.perf_counter() - t0
        msg = _papermill_error(exc)
        try:
            if out.is_file():
                present(out, exp.title)
        except Exception:  # noqa: BLE001 - a torn partial notebook stays as papermill left it
            pass
        _write_record(root, exp.name, {**record, "status": "failed", "error": msg,
                                       "wall_s": round(wall, 1)})
        say(f"!! {exp.name} FAILED after {wall:.0f} s: {msg}")
        return Outcome(exp.name, "failed", out, digest, wall, msg)
    wall = time.perf_counter() - t0
    present(out, exp.title)
    _write_record(root, exp.name, {**record, "status": "complete", "wall_s": round(wall, 1)})
    say(f"== {exp.name}: done in {wall:.0f} s")
    return Outcome(exp.name, "executed", out, digest, wall)


_SHOWN_TAGS = {"remove-cell", "remove-input", "hide-input", "hide-cell", "hide-output",
               "remove-output", "show-input"}


def present(path: Path, title: Optional[str] = None) -> None:
    """Prepare an executed notebook for the book (presentation only; nothing is re-run).

    The chapter title (the first ``# `` heading) becomes ``title``, the experiment's title in
    the registry, so one notebook source can stand for several chapters. The defaults of the
    ``parameters`` cell are removed (papermill's injected cell holds the values actually
    used); the injected cell moves below the chapter title, collapsed; code cells are
    collapsed ("Show code cell source") unless their tags say otherwise (``show-input`` keeps
    a cell's code visible).
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    heading = next((c for c in nb.cells
                    if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")), None)
    if title and heading is not None:
        lines = heading.source.lstrip().splitlines()
        heading.source = "\n".join([f"# {title}", *lines[1:]])
    injected = None
    for cell in list(nb.cells):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if cell.cell_type != "code":
            continue
        if "parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        elif "injected-parameters" in tags:
            injected = cell
        elif not _SHOWN_TAGS & set(tags):
            tags.append("hide-input")
    if injected is not None:
        nb.cells.remove(injected)
        injected.source = "# Parameters of this execution (see experiments.yml)\n" + "\n".join(
            ln for ln in injected.source.splitlines() if not ln.startswith("# Parameters"))
        injected.metadata["tags"] = [*injected.metadata.get("tags", []), "hide-input"]
        title = next((i for i, c in enumerate(nb.cells)
                      if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")), -1)
        nb.cells.insert(title + 1, injected)
    nbformat.write(nb, str(path))


def write_placeholder(path: Path, exp: Experiment) -> None:
    """A stand-in chapter for an experiment that has not been executed yet (``--only``)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {exp.title}\n\nThis chapter has not been executed yet. Run\n\n"
        f"```bash\ndpskin book --only {exp.name}\n```\n"))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


# --------------------------------------------------------------------------- build
def jupyter_book_command() -> List[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


def build_book(root: PathLike, *, say: Callable[[str], None] = print) -> Path:
    """``jupyter-book build`` the book at ``root`` (-W -n --keep-going --all); index.html path.

    Raises :class:`BookError` when the build fails or warns.
    """
    root = Path(root)
    cmd = [*jupyter_book_command(), "build", str(root), "--all", "-W", "-n", "--keep-going"]
    say("== jupyter-book build (-W -n --keep-going)")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (root / "_build").mkdir(exist_ok=True)
    (root / "_build" / "build.log").write_text(log)
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
    if proc.returncode != 0 or warnings:
        tail = "\n".join(warnings[-30:] or log.splitlines()[-30:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}); full log in "
                        f"{root / '_build' / 'build.log'}:\n{tail}")
    index = (root / BUILD_HTML / "index.html").resolve()
    if not index.is_file():
        raise BookError(f"jupyter-book build finished but {index} is missing")
    return index


PDF = Path("_build") / "latex" / "dpskin.pdf"  # _config.yml's latex targetname
#: Debian's packages the PDF needs (README, .ci/run and the Pages workflow install these)
TEX_PACKAGES = ("texlive-xetex", "texlive-latex-extra", "texlive-fonts-recommended",
                "fonts-freefont-otf", "latexmk", "poppler-utils")


def pdf_config(root: PathLike) -> Path:
    """``_config.yml`` for the PDF, written under ``_build/``: the same book without the code
    of the notebooks' cells (a printed dissertation shows their outputs; the code is in the
    HTML book and in ``notebooks/``), which LaTeX cannot fold away as HTML does."""
    import yaml

    root = Path(root)
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    sphinx = cfg.setdefault("sphinx", {})
    sphinx.setdefault("config", {})["nb_remove_code_source"] = True
    # Jupyter Book resolves local extensions against the config file's folder, not the book's
    sphinx["local_extensions"] = {k: str((root / v).resolve())
                                  for k, v in (sphinx.get("local_extensions") or {}).items()}
    out = root / "_build" / "_config_pdf.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return out


def build_pdf(root: PathLike, *, say: Callable[[str], None] = print) -> Path:
    """The dissertation PDF through LaTeX (``jupyter-book build --builder pdflatex``, XeLaTeX
    as ``_config.yml`` sets) from the same executed notebooks; its path.

    Raises :class:`BookError` when XeLaTeX or latexmk is missing (naming the Debian packages),
    when Sphinx warns, or when LaTeX fails (the tail of its log).
    """
    root = Path(root)
    missing = [t for t in ("xelatex", "latexmk") if shutil.which(t) is None]
    if missing:
        raise BookError(f"the PDF needs {' and '.join(missing)}: apt-get install "
                        f"{' '.join(TEX_PACKAGES)}")
    cmd = [*jupyter_book_command(), "build", str(root), "--builder", "pdflatex", "--all", "-n",
           "--keep-going", "--config", str(pdf_config(root))]
    say("== jupyter-book build --builder pdflatex (XeLaTeX)")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (root / "_build").mkdir(exist_ok=True)
    (root / "_build" / "pdf.log").write_text(log)
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln]
    pdf = (root / PDF).resolve()
    tex_log = pdf.with_suffix(".log")
    errors = [ln for ln in tex_log.read_text(errors="replace").splitlines() if ln.startswith("!")] \
        if tex_log.is_file() else []
    if proc.returncode != 0 or warnings or errors or not pdf.is_file():
        tail = "\n".join((warnings + errors)[-30:] or log.splitlines()[-30:])
        raise BookError(f"the PDF build failed (exit {proc.returncode}); logs in "
                        f"{root / '_build' / 'pdf.log'} and {tex_log}:\n{tail}")
    return pdf


# --------------------------------------------------------------------------- the runner
def _stream_notebook_output() -> None:
    """Show what the notebooks print (papermill logs cell output at INFO) on stdout."""
    import logging

    log = logging.getLogger("papermill")
    if not any(getattr(h, "_dpskin", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("   %(message)s"))
        # keep the notebooks' own output, drop papermill's per-cell banners
        h.addFilter(lambda r: not str(r.getMessage()).startswith(
            ("Executing Cell", "Ending Cell", "Executing notebook with kernel", "Input Notebook",
             "Output Notebook", "Working directory", "Black is not installed")))
        h._dpskin = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_book(profile: Optional[str] = None, *, only: Optional[Sequence[str]] = None,
             build: bool = True, root: Optional[PathLike] = None,
             registry: Optional[PathLike] = None, force: bool = False,
             code_version: Optional[str] = None, log_output: bool = True,
             pdf: bool = False, say: Callable[[str], None] = print) -> BookReport:
    """Execute the experiments of ``profile`` (or only those named), then build the book (and,
    with ``pdf``, its PDF through LaTeX)."""
    root = Path(root) if root is not None else REPO_ROOT
    reg = load_registry(registry if registry is not None else root / "experiments.yml")
    profile = profile or reg.default_profile
    reg.profile(profile)  # unknown profile: ConfigError listing the known ones
    exps = [reg.experiment(n) for n in only] if only else list(reg.experiments)
    if code_version is None:
        code_version = _code_version("all")
    if log_output:
        _stream_notebook_output()
    report = BookReport(profile)
    t0 = time.perf_counter()
    for exp in exps:
        try:
            params = resolve_parameters(reg, exp, profile, root)
        except ConfigError as e:  # a bad entry fails this experiment only
            report.outcomes.append(Outcome(exp.name, "failed", root / RESULTS_DIR /
                                           f"{exp.name}.ipynb", error=str(e)))
            say(f"!! {exp.name} FAILED: {e}")
            continue
        report.outcomes.append(execute_experiment(
            exp, params, root, profile=profile, code_version=code_version, force=force,
            merged=reg.parameters_for(exp, profile), log_output=log_output, say=say))
    say(f"== notebooks: {sum(o.status == 'executed' for o in report.outcomes)} executed, "
        f"{sum(o.status == 'skipped' for o in report.outcomes)} skipped, "
        f"{len(report.failed)} failed ({time.perf_counter() - t0:.0f} s)")
    if build:
        for exp in reg.experiments:
            out = root / RESULTS_DIR / f"{exp.name}.ipynb"
            if not out.is_file():
                write_placeholder(out, exp)
                say(f"   {exp.name} has no executed notebook yet: a placeholder stands in")
        try:
            report.index_html = build_book(root, say=say)
            report.build_ok = True
            if pdf:
                report.pdf = build_pdf(root, say=say)
        except BookError as e:
            report.build_ok = False
            say(f"!! {e}")
    for o in report.failed:
        say(f"!! FAILED {o.name}: {o.error}\n   partial notebook: {o.output}")
    if report.index_html:
        say(f"The book: {report.index_html}")
    if report.pdf:
        say(f"The PDF: {report.pdf}")
    return report
