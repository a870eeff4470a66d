"""Run ids follow the training code only: editing the book runner or the attacks keeps finished
runs valid, editing anything a training run executes gives new run ids."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpskin_core import results


@pytest.fixture()
def pkg_copy(tmp_path, monkeypatch) -> Path:
    dst = tmp_path / "dpskin_core"
    shutil.copytree(Path(results.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(results, "_PKG_DIR", dst)
    return dst


def test_training_modules_are_the_import_closure_of_train():
    mods = results.training_modules()
    for m in ("train.py", "privacy.py", "data.py", "models.py", "technique.py", "results.py"):
        assert m in mods
    for m in ("book.py", "cli.py", "download.py", "experiments.py"):
        assert m not in mods


def test_editing_a_non_training_module_keeps_run_ids(pkg_copy):
    before = results.code_version(), results.code_version("all")
    (pkg_copy / "book.py").write_text((pkg_copy / "book.py").read_text() + "\n# edited\n")
    after = results.code_version(), results.code_version("all")
    assert after[0] == before[0]          # run ids unchanged
    assert after[1] != before[1]          # notebooks re-execute


def test_editing_training_code_or_a_module_it_imports_changes_run_ids(pkg_copy):
    v0 = results.code_version()
    (pkg_copy / "privacy.py").write_text((pkg_copy / "privacy.py").read_text() + "\n# edited\n")
    v1 = results.code_version()
    assert v1 != v0
    # a new module enters the training version once training code imports it
    (pkg_copy / "newlever.py").write_text("X = 1\n")
    assert results.code_version() == v1
    (pkg_copy / "technique.py").write_text(
        (pkg_copy / "technique.py").read_text() + "\nfrom .newlever import X  # noqa\n")
    v2 = results.code_version()
    assert "newlever.py" in results.training_modules() and v2 != v1
    (pkg_copy / "newlever.py").write_text("X = 2\n")
    assert results.code_version() != v2


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="scope"):
        results.code_version("everything")
