"""The thin CLI: overrides parsing, clear one-line errors, train + runs listing."""
import json

import pytest

from dpskin_core.cli import main, parse_overrides
from dpskin_core.errors import DpskinError


def test_parse_overrides():
    assert parse_overrides(["epochs=3", "dp=true", "target_epsilon=8", "data_root=null", "name=a=b", "delta=1e-5"]) == {
        "epochs": 3, "dp": True, "target_epsilon": 8, "data_root": None, "name": "a=b", "delta": 1e-5}
    with pytest.raises(DpskinError, match="key=value"):
        parse_overrides(["epochs"])


def test_bad_config_is_one_clear_line(capsys, tmp_path):
    assert main(["train", "--set", "target_epsilon=-1", "--set", "dp=true", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "target_epsilon" in err and "Traceback" not in err
    assert main(["train", "--set", "lerning_rate=1", "--runs", str(tmp_path)]) == 2
    assert "lerning_rate" in capsys.readouterr().err


def test_train_and_list_runs(capsys, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"synth_n": 200, "image_size": 16, "epochs": 1, "batch_size": 32,
                               "progress": False, "cache_dir": str(tmp_path / "cache")}))
    assert main(["train", "--config", str(cfg), "--set", "dp=true", "--set", "target_epsilon=8",
                 "--set", "delta=1e-4", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "eps =" in out and "prv accountant" in out
    assert main(["runs", "--runs", str(tmp_path / "runs")]) == 0
    assert "dp-sgd" in capsys.readouterr().out


def test_fl_run_and_a_bad_federation_config(capsys, tmp_path):
    import json

    from dpskin_core.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rounds": 1, "clients": 4}))
    assert main(["fl", "run", "--config", str(bad), "--runs", str(tmp_path)]) == 2
    assert "unknown key(s) clients" in capsys.readouterr().err
    good = tmp_path / "fl.json"
    good.write_text(json.dumps({"rounds": 1, "run": {"backbone": "smallcnn_fast", "synth_n": 200,
                                                     "image_size": 16, "batch_size": 16,
                                                     "progress": False, "lr": 0.05}}))
    assert main(["fl", "run", "--config", str(good), "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean balanced accuracy" in out and "synth_a" in out
