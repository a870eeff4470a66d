"""Run ids follow the training code only: editing the book runner or the attacks keeps finished
runs valid, editing anything a training run executes gives new run ids."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import dpskin_core
from dpskin_core.training import records


@pytest.fixture()
def pkg_copy(tmp_path, monkeypatch) -> Path:
    dst = tmp_path / "dpskin_core"
    shutil.copytree(Path(dpskin_core.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(records, "_PKG_DIR", dst)
    return dst


def test_training_modules_are_the_import_closure_of_the_trainer():
    mods = records.training_modules()
    for m in ("training/trainer.py", "training/privacy.py", "data/datasets.py",
              "training/backbones.py", "training/frontends.py", "training/technique.py",
              "training/records.py", "training/checkpoint.py", "files.py"):
        assert m in mods
    for m in ("book/runner.py", "cli.py", "data/download.py", "book/registry.py",
              "training/recipes.py", "attacks/membership.py"):
        assert m not in mods


def test_editing_a_non_training_module_keeps_run_ids(pkg_copy):
    before = records.code_version(), records.code_version("all")
    runner = pkg_copy / "book" / "runner.py"
    runner.write_text(runner.read_text() + "\n# edited\n")
    after = records.code_version(), records.code_version("all")
    assert after[0] == before[0]          # run ids unchanged
    assert after[1] != before[1]          # notebooks re-execute


def test_editing_training_code_or_a_module_it_imports_changes_run_ids(pkg_copy):
    v0 = records.code_version()
    privacy = pkg_copy / "training" / "privacy.py"
    privacy.write_text(privacy.read_text() + "\n# edited\n")
    v1 = records.code_version()
    assert v1 != v0
    # a new module enters the training version once training code imports it, relatively
    # (from a sibling or a parent package) or absolutely
    (pkg_copy / "data" / "newlever.py").write_text("X = 1\n")
    assert records.code_version() == v1
    technique = pkg_copy / "training" / "technique.py"
    technique.write_text(technique.read_text() + "\nfrom ..data.newlever import X  # noqa\n")
    v2 = records.code_version()
    assert "data/newlever.py" in records.training_modules() and v2 != v1
    (pkg_copy / "data" / "newlever.py").write_text("X = 2\n")
    v3 = records.code_version()
    assert v3 != v2
    (pkg_copy / "other.py").write_text("Y = 1\n")
    technique.write_text(technique.read_text() + "\nimport dpskin_core.other  # noqa\n")
    assert "other.py" in records.training_modules() and records.code_version() != v3


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="scope"):
        records.code_version("everything")


def test_a_run_folder_of_the_flat_layout_stays_readable():
    """A run written by the code before the restructuring (commit fb38f31: DP colour head with
    logit adjustment, EMA and early stopping, on tests/test_train.py's toy data) is listed,
    reloaded as the model it released, and carded."""
    from dpskin_core.attacks import cards, load_trained
    from dpskin_core.training.checkpoint import Checkpoint

    from test_train import random_bundle

    root = Path(__file__).parent / "fixtures" / "runs_fb38f31"
    runs = records.load_runs(root)
    assert list(runs["run"]) == ["e9e38e5a5de5b0f7"] and runs.loc[0, "dp"]
    run_dir = root / "e9e38e5a5de5b0f7"
    # one run read alone is its row of the listing
    pd.testing.assert_frame_equal(pd.DataFrame([records.load_run(run_dir)]), runs)
    assert Checkpoint.load(run_dir / "checkpoints").epoch == 2
    model = load_trained(run_dir)
    recorded = records.load_predictions(run_dir).filter(like="prob_").to_numpy()
    import numpy as np

    np.testing.assert_allclose(model.predict_proba(random_bundle().x_test), recorded, atol=1e-5)
    card = cards.privacy_card(run_dir)
    assert card["dp"] and card["epsilon"] <= 3.0 and card["accountant"] == "prv"
