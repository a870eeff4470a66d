"""The benchmark's ``--set KEY=VALUE`` overrides: typed values, malformed items named, unknown
keys rejected by the profile; its ``--append`` table (benchmarks/bench_proposed.py)."""
import importlib.util
from pathlib import Path

import pytest

from dpskin_core.book.registry import profile_params
from dpskin_core.errors import ConfigError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_proposed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_proposed", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_values_are_read_as_yaml():
    sets = _bench().parse_sets(["epochs=40", "lr_adam=0.002", "lr_schedule=constant",
                                "loso_sites=[a, b]"])
    assert sets == {"epochs": 40, "lr_adam": 0.002, "lr_schedule": "constant",
                    "loso_sites": ["a", "b"]}
    sets.pop("loso_sites")
    assert profile_params("smoke", sets).epochs == 40


@pytest.mark.parametrize("item", ["epochs", "=3", " =3"])
def test_malformed_item_is_named(item):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _bench().parse_sets([item])


def test_unknown_key_is_rejected_by_the_profile():
    with pytest.raises(ConfigError, match="epochz"):
        profile_params("smoke", _bench().parse_sets(["epochz=3"]))


def test_append_adds_rows_and_replace_does_not(tmp_path):
    """``--append`` keeps the rows already in ``--out`` (a sweep of ``--set`` values in one
    table); without it the table is replaced."""
    import pandas as pd

    out = tmp_path / "sub" / "t.csv"
    first = pd.DataFrame([{"recipe": "dp-sgd", "set": "", "val_bacc": 0.3}])
    second = pd.DataFrame([{"recipe": "dp-sgd", "set": "dp_epochs=20", "val_bacc": 0.4}])
    _bench().write_table(first, out, append=True)          # nothing there yet: written
    both = _bench().write_table(second, out, append=True)
    assert list(both["val_bacc"]) == [0.3, 0.4] and pd.read_csv(out).shape[0] == 2
    assert list(_bench().write_table(second, out, append=False)["val_bacc"]) == [0.4]
    assert pd.read_csv(out).shape[0] == 1


def test_search_refuses_a_recipe_without_a_space(monkeypatch, tmp_path):
    """``--search`` reads each recipe's space from chapter 07_tuning (as the chapter does) and
    refuses, before any training, a recipe the chapter does not search."""
    monkeypatch.setattr("sys.argv", ["bench_proposed.py", "--profile", "smoke", "--search",
                                     "--recipes", "dp-sgd,nonprivate-adam",
                                     "--runs", str(tmp_path / "runs"),
                                     "--out", str(tmp_path / "t.csv")])
    with pytest.raises(SystemExit, match="no search space for nonprivate-adam.*searched: dp-sgd, proposed"):
        _bench().main()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.csv").exists()
