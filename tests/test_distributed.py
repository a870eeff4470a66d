"""Multi-process DP training: torchrun with gloo on 127.0.0.1, two CPU processes.

The distributed update of a batch split across ranks equals the single-process update of the
whole batch (same noise stream), the noise is added once for the global batch (its standard
deviation is sigma C / (U q), not sqrt(world) times that), and ``dpskin train --nproc 2`` spends
exactly the single-process run's privacy (same q, steps, sigma, accountant history).
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from dpskin_core.cli import main
from dpskin_core.errors import ConfigError
from dpskin_core.training.distributed import local_env, torchrun_command, unwrap, World
from dpskin_core.training.sampling import PoissonSampler

PROBE = Path(__file__).parent / "fixtures" / "ddp_probe.py"


def test_shards_partition_the_units_and_one_rank_draws_as_before():
    n, q = 103, 0.2
    owned = torch.cat([PoissonSampler(n, q, 1, shard=(r, 3)).owned for r in range(3)])
    assert sorted(owned.tolist()) == list(range(n))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    single = list(PoissonSampler(n, q, 4, g1))
    expected = [(torch.rand(n, generator=g2) < q).nonzero().reshape(-1).tolist() for _ in range(4)]
    assert single == expected
    with pytest.raises(ConfigError, match="rank"):
        PoissonSampler(n, q, 1, shard=(3, 3))


def test_world_of_one_process_needs_no_process_group():
    w = World()
    assert w.main and not w.distributed and w.broadcast_int(7) == 7 and w.sum(2.5) == 2.5
    m = torch.nn.Linear(2, 2)
    assert unwrap(m) is m
    with pytest.raises(ConfigError, match="nproc"):
        torchrun_command(0, ["x"])
    cmd = torchrun_command(2, ["dpskin_core.cli", "train"], port=1234)
    assert "127.0.0.1" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_two_processes_take_the_single_process_step(tmp_path, mode):
    out = tmp_path / "probe.json"
    cmd = torchrun_command(2, [str(PROBE), str(out), mode], module=False)
    proc = subprocess.run(cmd, env=local_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    # the same update as one process on the whole batch, with rank 0's noise
    assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["max_abs_update"])
    # noise added once for the global batch: std sigma C / (U q) (twice the noise would be
    # sqrt(2) = 1.41 times that); ~280k coordinates, so the estimate is within 1 %
    assert abs(r["noise_std_ratio"] - 1.0) < 0.02, r


def _meta(root: Path) -> dict:
    (meta,) = root.glob("*/meta.json")
    return json.loads(meta.read_text())


@pytest.mark.parametrize("dp", [True, False])
def test_cli_nproc_2_spends_the_single_process_privacy(tmp_path, dp):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"synth_n": 240, "image_size": 16, "epochs": 2, "batch_size": 32,
                               "progress": False, "cache_dir": str(tmp_path / "cache"), "dp": dp,
                               **({"target_epsilon": 8, "delta": 1e-4} if dp else {})}))
    assert main(["train", "--config", str(cfg), "--runs", str(tmp_path / "one")]) == 0
    assert main(["train", "--config", str(cfg), "--runs", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = _meta(tmp_path / "one"), _meta(tmp_path / "two")
    assert two["status"] == "complete" and two["world_size"] == 2 and one["world_size"] == 1
    assert two["run_id"] == one["run_id"]  # how many processes ran it is not part of the config
    assert (tmp_path / "two" / two["run_id"] / "predictions.csv").is_file()
    if dp:
        for k in ("noise_multiplier", "sample_rate", "steps", "privacy_history"):
            assert two[k] == one[k], k
        assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-9)
        assert (tmp_path / "two" / two["run_id"] / "checkpoints" / "secret.json").is_file()
    else:
        assert two["epsilon"] is None
        assert two["steps"] == 2 * (two["n_train"] // 32)  # full batches only, each split in two


def test_sweeps_train_a_run_in_several_processes(tmp_path):
    from dpskin_core.book.sweeps import processes, sweep
    from dpskin_core.errors import DpskinError
    from dpskin_core.training import RunConfig

    assert processes(3) == 3 and processes(0) == max(1, torch.cuda.device_count())
    with pytest.raises(DpskinError, match="nproc"):
        processes(-1)
    cfg = RunConfig(synth_n=240, image_size=16, epochs=1, batch_size=32, progress=False,
                    cache_dir=str(tmp_path / "cache"), dp=True, target_epsilon=8, delta=1e-4,
                    name="ddp-sweep")
    rows = sweep([cfg], tmp_path / "runs", nproc=2, verbose=False)
    assert len(rows) == 1 and rows["epsilon"].iloc[0] <= 8
    assert _meta(tmp_path / "runs")["world_size"] == 2
