"""The experiment registry and the book runner (on tiny fake notebooks, for speed)."""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from dpskin_core.book.registry import load_registry, profile_params, thaw
from dpskin_core.book.runner import (execution_hash, notebook_parameters, resolve_parameters,
                                     run_book, runs_fingerprint)
from dpskin_core.errors import ConfigError
from dpskin_core.training.recipes import Params

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the real registry
def test_registry_loads_with_the_four_profiles():
    reg = load_registry(ROOT / "experiments.yml")
    assert set(reg.profiles) == {"smoke", "cpu", "cpu64", "gpu"}
    assert reg.default_profile == "smoke"
    names = [e.name for e in reg.experiments]
    for required in ("00_data", "01_baseline", "02_dp_sgd", "03_dp_adam", "06_networks",
                     "07_tuning", "10_summary"):
        assert required in names
    # a chapter that reads another's runs (without training them) executes after it
    assert names.index("07_tuning") > max(names.index(n) for n in ("02_dp_sgd", "03_dp_adam",
                                                                   "04_proposed"))
    for e in reg.experiments:
        assert (ROOT / e.notebook).is_file(), e.notebook
        for profile in reg.profiles:  # every experiment resolves under every profile
            params = resolve_parameters(reg, e, profile, ROOT)
            assert params.get("profile", profile) == profile


def test_every_profile_is_typed_and_complete():
    """Every profile lists every parameter the recipes need (Params), and nothing else."""
    reg = load_registry(ROOT / "experiments.yml")
    for name in reg.profiles:
        p = reg.params(name)
        assert isinstance(p, Params) and p.profile == name
    with pytest.raises(ConfigError, match="epochz"):
        profile_params("smoke", {"epochz": 3}, ROOT / "experiments.yml")
    assert profile_params("smoke", {"epochs": 3}, ROOT / "experiments.yml").epochs == 3


def test_notebook_defaults_are_the_smoke_profile():
    """Run standalone (papermill without -p), a notebook computes what the smoke book shows (a
    source executed as several chapters: what one of them shows)."""
    reg = load_registry(ROOT / "experiments.yml")
    for source in {e.notebook for e in reg.experiments}:
        defaults = notebook_parameters(ROOT / source)
        differs = []
        for e in (e for e in reg.experiments if e.notebook == source):
            smoke = reg.parameters_for(e, "smoke")
            differs.append({k: (defaults[k], smoke[k]) for k in defaults
                            if k in smoke and defaults[k] != smoke[k]})
        assert min(differs, key=len) == {}, f"{source}: defaults differ from smoke: {differs}"


def test_profiles_and_experiments_are_frozen():
    reg = load_registry(ROOT / "experiments.yml")
    exp = reg.experiments[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        reg.profiles["smoke"].parameters["epochs"] = 99  # type: ignore[index]
    assert isinstance(thaw(reg.profiles["smoke"].parameters)["seeds"], list)


# --------------------------------------------------------------------------- validation
BASE_YML = """
default_profile: smoke
profiles:
  smoke:
    description: tiny
    parameters: {x: 1}
experiments:
  - name: a
    notebook: notebooks/a.py
"""


@pytest.mark.parametrize("snippet,key", [
    ("colour: red\n", "colour"),
    ("profiles:\n  smoke:\n    descripton: typo\n", "descripton"),
    ("experiments:\n  - name: a\n    notebook: n.py\n    parmeters: {}\n", "parmeters"),
    ("experiments:\n  - name: a\n    notebook: n.py\n    profiles: {laptop: {}}\n", "laptop"),
])
def test_unknown_keys_are_rejected_naming_the_key(tmp_path, snippet, key):
    import yaml

    data = yaml.safe_load(BASE_YML)
    data.update(yaml.safe_load(snippet))
    f = tmp_path / "experiments.yml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=key) as err:
        load_registry(f)
    assert str(f) in str(err.value)


def test_unknown_profile_and_experiment_names(tmp_path):
    f = tmp_path / "experiments.yml"
    f.write_text(BASE_YML)
    reg = load_registry(f)
    with pytest.raises(ConfigError, match="laptop.*known: smoke"):
        reg.profile("laptop")
    with pytest.raises(ConfigError, match="zz"):
        reg.experiment("zz")
    with pytest.raises(ConfigError, match="not found"):
        load_registry(tmp_path / "missing.yml")


def test_merge_order_profile_then_experiment_then_override(tmp_path):
    f = tmp_path / "experiments.yml"
    f.write_text(textwrap.dedent("""
        profiles:
          smoke: {parameters: {x: 1, y: 1, z: 1}}
          cpu: {parameters: {x: 2, y: 2, z: 2}}
        experiments:
          - {name: a, notebook: a.py, parameters: {y: 10}, profiles: {cpu: {z: 30}}}
    """))
    reg = load_registry(f)
    assert reg.parameters_for("a", "smoke") == {"x": 1, "y": 10, "z": 1}
    assert reg.parameters_for("a", "cpu") == {"x": 2, "y": 10, "z": 30}


# --------------------------------------------------------------------------- hashing
def test_execution_hash_changes_with_parameters_source_code_and_runs():
    h = execution_hash({"a": 1, "b": [1, 2]}, "src", "v1")
    assert h == execution_hash({"b": [1, 2], "a": 1}, "src", "v1")  # key order is irrelevant
    assert h != execution_hash({"a": 2, "b": [1, 2]}, "src", "v1")
    assert h != execution_hash({"a": 1, "b": [1, 2]}, "src2", "v1")
    assert h != execution_hash({"a": 1, "b": [1, 2]}, "src", "v2")
    assert h != execution_hash({"a": 1, "b": [1, 2]}, "src", "v1", runs=["r1"])
    assert execution_hash({}, "s", "v", ["r1"]) != execution_hash({}, "s", "v", ["r1", "r2"])


def test_runs_fingerprint_lists_complete_runs_only(tmp_path):
    assert runs_fingerprint(tmp_path / "none") == []
    for rid, status in (("r1", "complete"), ("r2", "running"), ("r3", "complete")):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "meta.json").write_text(json.dumps({"status": status}))
    assert runs_fingerprint(tmp_path) == ["r1", "r3"]


def test_notebook_parameters_parses_the_tagged_cell(tmp_path):
    nb = tmp_path / "n.py"
    nb.write_text('# %%\nz = 0\n\n# %% tags=["parameters"]\na = 1\nb: list = [1, 2]\n'
                  'c = None\nd = dict(x=1)\n\n# %%\nprint(a)\n')
    assert notebook_parameters(nb) == {"a": 1, "b": [1, 2], "c": None, "d": None}
    nb.write_text("# %%\na = 1\n")
    with pytest.raises(ConfigError, match="parameters"):
        notebook_parameters(nb)


# --------------------------------------------------------------------------- the runner
def _fake_book(root: Path) -> None:
    (root / "notebooks").mkdir()
    cell = '# %% tags=["parameters"]\nx = 0\nlabel = "?"\n\n'
    (root / "notebooks" / "a.py").write_text(
        cell + '# %%\nfrom pathlib import Path\nPath("a_ran.txt").write_text(str(x))\nprint(x)\n')
    (root / "notebooks" / "b.py").write_text(
        cell + '# %%\nraise ValueError(f"boom from {label}")\n')
    (root / "notebooks" / "c.py").write_text(cell + "# %%\nprint(label * 2)\n")
    (root / "experiments.yml").write_text(textwrap.dedent("""
        default_profile: smoke
        profiles:
          smoke: {parameters: {x: 1, label: s, unused_by_notebooks: 5}}
        experiments:
          - {name: a, notebook: notebooks/a.py}
          - {name: b, notebook: notebooks/b.py, parameters: {label: bee}}
          - {name: c, notebook: notebooks/c.py}
    """))


def _run(root, lines, **kw):
    return run_book("smoke", root=root, build=False, log_output=False, say=lines.append, **kw)


def test_runner_executes_skips_reruns_and_reports_failures(tmp_path):
    _fake_book(tmp_path)
    lines: list = []
    rep = _run(tmp_path, lines, code_version="v1")
    status = {o.name: o.status for o in rep.outcomes}
    assert status == {"a": "executed", "b": "failed", "c": "executed"}  # c ran after b failed
    assert not rep.ok
    out = tmp_path / "book" / "results"
    assert (out / "a.ipynb").is_file() and (out / "c.ipynb").is_file()
    assert (tmp_path / "a_ran.txt").read_text() == "1"  # executed in the repo root, with x=1
    fail = rep.failed[0]
    assert "ValueError" in fail.error and "boom from bee" in fail.error
    assert fail.output == out / "b.ipynb" and fail.output.is_file()  # the partial notebook
    text = "\n".join(lines)
    assert "FAILED b" in text and "partial notebook" in text and str(out / "b.ipynb") in text
    rec = json.loads((out / "a.json").read_text())
    assert rec["status"] == "complete" and rec["parameters"] == {"x": 1, "label": "s"}
    assert json.loads((out / "b.json").read_text())["status"] == "failed"

    # second run: finished ones skipped, the failed one tried again
    lines.clear()
    rep = _run(tmp_path, lines, code_version="v1")
    assert {o.name: o.status for o in rep.outcomes} == {"a": "skipped", "b": "failed",
                                                       "c": "skipped"}

    # a parameter change re-executes exactly that experiment
    yml = tmp_path / "experiments.yml"
    yml.write_text(yml.read_text().replace("{name: a, notebook: notebooks/a.py}",
                                           "{name: a, notebook: notebooks/a.py, parameters: {x: 7}}"))
    rep = _run(tmp_path, lines, code_version="v1", only=["a", "c"])
    assert {o.name: o.status for o in rep.outcomes} == {"a": "executed", "c": "skipped"}
    assert (tmp_path / "a_ran.txt").read_text() == "7"

    # a new code version re-executes everything
    rep = _run(tmp_path, lines, code_version="v2", only=["c"])
    assert [o.status for o in rep.outcomes] == ["executed"]


def test_runner_rejects_an_undeclared_experiment_parameter(tmp_path):
    _fake_book(tmp_path)
    yml = tmp_path / "experiments.yml"
    yml.write_text(yml.read_text().replace("{name: c, notebook: notebooks/c.py}",
                                           "{name: c, notebook: notebooks/c.py, parameters: {lable: t}}"))
    lines: list = []
    rep = _run(tmp_path, lines, code_version="v1", only=["c"])
    assert rep.outcomes[0].status == "failed"
    assert "lable" in rep.outcomes[0].error and "notebooks/c.py" in rep.outcomes[0].error
    with pytest.raises(ConfigError, match="unknown experiment"):
        _run(tmp_path, lines, only=["nope"])
    with pytest.raises(ConfigError, match="unknown profile"):
        run_book("laptop", root=tmp_path, build=False, say=lines.append)


def test_runner_draws_figures_even_when_the_caller_sets_mplbackend_agg(tmp_path, monkeypatch):
    """A CI machine or a shell profile may export MPLBACKEND=Agg; the kernels inherit it and
    plt.show() then draws nothing. The runner must give the kernels the inline backend and
    restore the caller's."""
    import os

    import nbformat

    _fake_book(tmp_path)
    (tmp_path / "notebooks" / "c.py").write_text(
        '# %% tags=["parameters"]\nx = 0\n\n# %%\nimport matplotlib.pyplot as plt\n'
        'plt.plot([0, x])\nplt.show()\n')
    monkeypatch.setenv("MPLBACKEND", "Agg")
    rep = _run(tmp_path, [], code_version="v1", only=["c"])
    assert rep.ok, rep.failed
    nb = nbformat.read(tmp_path / "book" / "results" / "c.ipynb", as_version=4)
    kinds = [k for c in nb.cells for o in c.get("outputs", []) for k in o.get("data", {})]
    assert "image/png" in kinds
    assert os.environ["MPLBACKEND"] == "Agg"


def test_cli_book_exits_nonzero_when_a_notebook_fails(tmp_path, monkeypatch):
    from dpskin_core import cli
    from dpskin_core.book import runner

    _fake_book(tmp_path)
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    (tmp_path / "notebooks" / "a.py").write_text('# %% tags=["parameters"]\nx = 0\n\n# %%\n1/0\n')
    assert cli.main(["book", "--only", "a", "--no-build"]) == 1
    assert cli.main(["book", "--only", "nope", "--no-build"]) == 2  # a user error, one line
    assert cli.main(["book", "--pdf", "--no-build"]) == 2  # the PDF is built from the book


def test_the_pdf_build_names_the_missing_tex(tmp_path, monkeypatch):
    from dpskin_core.book import runner

    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    with pytest.raises(runner.BookError, match="the PDF needs xelatex and latexmk: apt-get install "
                                               "texlive-xetex"):
        runner.build_pdf(tmp_path, say=lambda s: None)


# --------------------------------------------------------------------------- helpers
def test_benign_warnings_are_silenced_and_no_others():
    import warnings

    from dpskin_core.book.sweeps import benign_warnings_silenced

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with benign_warnings_silenced():
            warnings.warn("Full backward hook is firing when gradients are computed")
            warnings.warn("the learning rate is too large")
        warnings.warn("Optimal order is the largest alpha")  # outside the block: shown again
    assert [str(w.message) for w in seen] == ["the learning rate is too large",
                                              "Optimal order is the largest alpha"]


def test_offline_check_flags_remote_loads_but_not_links():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpskin_offline",
                                                  ROOT / "book" / "_ext" / "dpskin_offline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._REMOTE_LOAD.search('<script src="https://cdn.example.org/x.js"></script>')
    assert mod._REMOTE_LOAD.search("<link rel='stylesheet' href='//fonts.example.com/css'>")
    assert not mod._REMOTE_LOAD.search('<a href="https://doi.org/10.1000/1">paper</a>')
    assert not mod._REMOTE_LOAD.search('<script src="_static/mathjax/tex-chtml.js"></script>')
    assert mod._REMOTE_CSS.search("src: url('https://fonts.example.com/a.woff2')")


def test_recipe_runs_of_an_empty_folder_has_the_config_columns(tmp_path):
    """Nothing run yet: an empty table that can still be filtered on config fields (chapter
    07 compares searches with the hand-chosen runs by recipe, network and budget)."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.book.sweeps import recipe_runs

    p = load_registry().params("smoke")
    assert recipe_runs(["dp-sgd"], p, tmp_path / "absent").empty
    t = recipe_runs(["dp-sgd", "proposed"], p, tmp_path)  # a folder holding no run
    assert t.empty
    picked = t[(t["recipe"] == "dp-sgd") & (t["backbone"] == "smallcnn_fast")
               & (t["target_epsilon"] == 8.0)]
    assert picked.empty and {"run", "recipe", "label", "seed"} <= set(t.columns)
