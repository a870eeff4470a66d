"""RunConfig: frozen, rejects unknown keys and invalid values, hashes semantically."""
import dataclasses

import pytest

from dpskin_core.training.config import RunConfig
from dpskin_core.errors import ConfigError
from dpskin_core.training.records import config_hash


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match="lerning_rate"):
        RunConfig.from_dict({"lerning_rate": 0.1})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("changes,field", [
    ({"dp": True}, "target_epsilon"),
    ({"dp": True, "target_epsilon": 0.0}, "target_epsilon"),
    ({"dp": True, "target_epsilon": -3}, "target_epsilon"),
    ({"dp": True, "target_epsilon": 3, "delta": 1.5}, "delta"),
    ({"dp": True, "target_epsilon": 3, "class_weights": "balanced"}, "class_weights"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"accountant": "gdp"}, "accountant"),
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": -1}, "epochs"),
    ({"val_frac": 0.6, "test_frac": 0.5}, "val_frac"),
])
def test_invalid_values(changes, field):
    with pytest.raises(ConfigError, match=field):
        RunConfig.from_dict(changes)


def test_hash_ignores_execution_fields_only():
    a = RunConfig(name="a", progress=True)
    b = RunConfig(name="b", progress=False, device="cpu")
    assert config_hash(a, "v") == config_hash(b, "v")
    assert config_hash(a, "v") != config_hash(a.replace(seed=1), "v")
    assert config_hash(a, "v") != config_hash(a, "w")  # code version is part of the id


def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dp: true\ntarget_epsilon: 8\nepochs: 2\n")
    cfg = RunConfig.from_file(p)
    assert cfg.dp and cfg.target_epsilon == 8 and cfg.method == "dp-sgd"
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_file(tmp_path / "missing.yaml")


def test_an_open_upper_bound_is_part_of_the_one_number_check():
    from dpskin_core.errors import check_number

    check_number(0.999, "decay", positive=True, below=1)
    check_number(None, "decay", positive=True, optional=True, below=1)
    for bad in (1, 1.0, 1.5, float("inf")):
        with pytest.raises(ConfigError, match="decay must be a finite positive number below 1"):
            check_number(bad, "decay", positive=True, below=1)
