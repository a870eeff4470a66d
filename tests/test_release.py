"""What a DP run releases is DP too: no training-split statistic outside a counted mechanism;
q agrees everywhere; empty Poisson batches; early-stopped resume; bad values; the run lock;
lesion-level DP."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from dpskin_core.data import DataBundle
from dpskin_core.errors import ConfigError, RunLockedError
from dpskin_core.files import read_json
from dpskin_core.training import privacy, records
from dpskin_core.training.checkpoint import Checkpoint
from dpskin_core.training.config import RunConfig
from dpskin_core.training.sampling import (aggregate_grad_samples, lesion_groups, poisson_loader,
                                           unit_index)
from dpskin_core.training.trainer import run, setup_training

from test_train import BASE, random_bundle

#: distinctive training counts per class: any of them in a published file would be a leak
COUNTS = [37, 123, 59, 41, 83, 29, 67]


def skewed_bundle(images_per_lesion: int = 1) -> DataBundle:
    """Toy data whose training split has exactly COUNTS images per class."""
    big = random_bundle(n_train=7 * max(COUNTS))
    idx = np.concatenate([np.flatnonzero(big.y_train == c)[:n] for c, n in enumerate(COUNTS)])
    n = len(idx)
    lesions = [f"L{i // images_per_lesion}-{big.y_train[j]}" for i, j in enumerate(idx)]
    meta = pd.concat([pd.DataFrame({"image": [f"t{i}" for i in range(n)],
                                    "label": big.y_train[idx], "lesion_id": lesions,
                                    "split": "train"}),
                      big.meta[big.meta["split"] != "train"]], ignore_index=True)
    return DataBundle(big.x_train[idx], big.y_train[idx], big.x_val, big.y_val, big.x_test,
                      big.y_test, meta, info={"dataset": "toy"})


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        if obj and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            yield obj
        for v in obj:
            yield from _numbers(v)


def published_files(run_dir):
    """Every file of the run folder but the private checkpoints."""
    return [f for f in run_dir.rglob("*") if f.is_file() and "checkpoints" not in f.parts]


@pytest.mark.parametrize("unit", ["image", "lesion"])
def test_no_training_split_statistic_is_published(tmp_path, unit):
    data = skewed_bundle(images_per_lesion=2)
    assert np.bincount(data.y_train).tolist() == COUNTS
    cfg = RunConfig(**dict(BASE, epochs=2, batch_size=64), dp=True, target_epsilon=4.0,
                    delta=1e-4, logit_adjust=True, privacy_unit=unit)
    res = run(cfg, tmp_path, data=data)
    files = published_files(res.run_dir)
    assert {f.name for f in files} >= {"config.json", "meta.json", "metrics.csv", "predictions.csv"}
    for f in files:
        text = f.read_text(errors="ignore")
        # the exact class counts, in any order of the classes written as a list or a CSV row
        assert ", ".join(map(str, COUNTS)) not in text.replace("[", "").replace("]", "")
        assert ",".join(map(str, COUNTS)) not in text, f
        if f.suffix == ".json":
            obj = json.loads(text)
            for seq in _numbers(obj):
                assert sorted(COUNTS) != sorted(int(v) for v in seq if float(v).is_integer()), f
            assert "counts" not in json.dumps(obj).replace("counts_of", ""), f
    # the realised Poisson batch sizes stay secret: the throughput counts N q images a step
    assert res.meta["train_images"] == pytest.approx(sum(COUNTS) * cfg.epochs)
    # the curves of a DP run: no loss or accuracy of the private batches, only lr and eps
    m = pd.read_csv(res.run_dir / "metrics.csv")
    assert set(m.loc[m["split"] == "train", "metric"]) == {"lr"}
    assert {"balanced_accuracy", "nll"} <= set(m.loc[m["split"] == "val", "metric"])
    # the released histogram is the noisy one, of the privacy units' classes
    released = res.meta["released_before_training"]
    assert released["counts_of"] == f"{unit}s per class"
    unit_counts = COUNTS if unit == "image" else [math.ceil(c / 2) for c in COUNTS]
    assert not np.allclose(released["class_histogram"], unit_counts, atol=0.5)
    p = res.meta["privacy"]
    assert p["unit"] == unit and p["n_units"] == sum(unit_counts)
    assert p["adjacency"].startswith("add/remove one " + ("training image" if unit == "image" else "lesion"))
    assert any("N" in n for n in p["not_counted"])


def test_record_accountant_and_sampler_agree_on_q(tmp_path):
    """N = 925, B = 10: ceil(N/B) = 93 batches of q = 1/93 (Opacus' own loader drew 92 with its
    hook at q = 1/92 while the record said 1/93)."""
    data = random_bundle(n_train=925, size=8)
    cfg = RunConfig(**dict(BASE, image_size=8, epochs=1, batch_size=10), dp=True,
                    target_epsilon=3.0, delta=1e-4)
    s = setup_training(cfg, data, torch.device("cpu"), dp_seed=0)
    assert s.sample_rate == pytest.approx(1 / 93) and s.steps_per_epoch == 93 == len(s.loader)
    assert len(list(s.loader)) == 93
    res = run(cfg, tmp_path, data=data)
    assert res.meta["sample_rate"] == pytest.approx(1 / 93) and res.meta["steps"] == 93
    hist = res.meta["privacy_history"]
    assert hist == [{"noise_multiplier": res.noise_multiplier, "sample_rate": pytest.approx(1 / 93),
                     "steps": 93}]
    assert res.epsilon == pytest.approx(privacy.epsilon([(res.noise_multiplier, 1 / 93, 93)], 1e-4),
                                        rel=1e-9)
    assert res.epsilon <= 3.0


def test_empty_poisson_batches_take_a_counted_noise_only_step(tmp_path, monkeypatch):
    """Expected batch of 1 image in 240: about a third of the batches are empty; each is a step
    (clipped sum 0, plus noise) that the accountant counts."""
    data = random_bundle()
    cfg = RunConfig(**dict(BASE, epochs=1, batch_size=1, lr=0.5), dp=True, target_epsilon=8.0,
                    delta=1e-4, dp_noise="seeded")
    s = setup_training(cfg, data, torch.device("cpu"), dp_seed=0)
    s.g_sample.manual_seed(1)
    sizes = [len(idx) for (idx,) in s.loader]
    assert sizes.count(0) > 40 and len(sizes) == 240
    res = run(cfg, tmp_path, data=data)
    assert res.meta["steps"] == 240 and res.meta["privacy_history"][0]["steps"] == 240

    # an all-empty epoch still moves the weights (the noise) and is counted
    from dpskin_core.training import sampling, trainer

    monkeypatch.setattr(sampling.PoissonSampler, "__iter__",
                        lambda self: iter([[] for _ in range(self.steps)]))
    cfg2 = cfg.replace(epochs=1, batch_size=60)
    session = trainer.start(cfg2, data, tmp_path / "empty")
    before = {k: v.clone() for k, v in session.setup.model.state_dict().items()}
    trainer.train_one_epoch(session, 1)
    after = session.setup.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert session.setup.engine.accountant.history[-1][2] == 4  # ceil(240 / 60) steps


def test_an_early_stopped_run_killed_before_its_record_resumes_to_the_same_end(tmp_path, monkeypatch):
    from dpskin_core.training import trainer

    def scripted(monkeypatch):
        scores, real = iter([0.5, 0.4]), trainer.evaluate

        def fake(y, probs):
            out = real(y, probs)
            score = next(scores, None)
            return out if score is None else {**out, "balanced_accuracy": score}
        monkeypatch.setattr(trainer, "evaluate", fake)

    data = random_bundle()
    cfg = RunConfig(**dict(BASE, epochs=5), dp=True, target_epsilon=2.0, delta=1e-4,
                    early_stopping_patience=1)
    scripted(monkeypatch)
    real_finish = trainer.finish
    monkeypatch.setattr(trainer, "finish", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "killed", data=data)
    monkeypatch.setattr(trainer, "finish", real_finish)
    killed = records.run_dir_for(cfg, tmp_path / "killed")
    assert Checkpoint.load(killed / "checkpoints").early_stopped
    resumed = run(cfg, tmp_path / "killed", data=data)
    assert resumed.meta["resumed_at_epochs"] == [2] and resumed.meta["eval_epoch"] == 1
    assert Checkpoint.load(killed / "checkpoints").epoch == 2  # not trained further
    # the uninterrupted run with the same secret
    ref_ck = tmp_path / "ref" / killed.name / "checkpoints"
    ref_ck.mkdir(parents=True)
    shutil.copy(killed / "checkpoints" / "secret.json", ref_ck / "secret.json")
    scripted(monkeypatch)
    ref = run(cfg, tmp_path / "ref", data=data)
    assert ref.epsilon == resumed.epsilon and ref.meta["steps"] == resumed.meta["steps"]
    a, b = (Checkpoint.load(d / "checkpoints").model for d in (killed, ref.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref.final_metrics == pytest.approx(resumed.final_metrics, nan_ok=True, rel=0, abs=0)


@pytest.mark.parametrize("field,value", [
    ("max_grad_norm", float("inf")), ("momentum", float("nan")), ("la_tau", float("nan")),
    ("epochs", 1.5), ("batch_size", 16.5), ("seed", "abc"), ("lr", float("nan")),
    ("target_epsilon", float("inf")), ("weight_decay", -1.0), ("aug_mult", 2.0),
    ("early_stopping_patience", 0), ("hist_noise", float("nan")), ("dp", "yes"),
    ("ema_decay", 1.0), ("split_seed", -1), ("dp_noise", "fast"), ("privacy_unit", "patient"),
    ("la_tau_kept", float("inf")), ("la_tau_kept", 0.5),  # 0.5 without logit_adjust
])
def test_bad_values_are_refused_before_any_run_folder(tmp_path, field, value):
    cfg = {**BASE, "dp": True, "target_epsilon": 3.0, "delta": 1e-4, field: value}
    with pytest.raises(ConfigError, match=field):
        run(cfg, tmp_path, data=random_bundle())
    assert not any(tmp_path.iterdir())


def test_a_run_being_trained_is_locked(tmp_path):
    cfg = RunConfig(**BASE)
    run_dir = records.run_dir_for(cfg, tmp_path)
    with records.run_lock(run_dir):
        with pytest.raises(RunLockedError, match=f"run {run_dir.name} is being trained by pid"):
            run(cfg, tmp_path, data=random_bundle())
    assert not (run_dir / "meta.json").exists()  # the refused process wrote nothing
    assert run(cfg, tmp_path, data=random_bundle()).meta["status"] == "complete"


def test_lesion_units_and_their_gradients():
    groups = lesion_groups(["b", "a", "b", "c", "a", "b"])
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3]]
    assert unit_index(groups, 6).tolist() == [0, 1, 0, 2, 1, 0]
    lin = torch.nn.Linear(2, 1, bias=False)
    lin.weight.grad_sample = torch.tensor([[[1., 0.]], [[3., 0.]], [[0., 2.]], [[0., 4.]]])
    n = aggregate_grad_samples(lin, torch.tensor([7, 7, 2, 2]))
    assert n == 2 and torch.equal(lin.weight.grad_sample, torch.tensor([[[0., 3.]], [[2., 0.]]]))
    # Poisson sampling of lesions: a lesion's images come together, or not at all
    g = torch.Generator().manual_seed(0)
    for (idx,) in poisson_loader(6, 0.5, 20, g, groups):
        got = set(idx.tolist())
        assert all(set(gr.tolist()) <= got or not (set(gr.tolist()) & got) for gr in groups)


def test_lesion_level_clipping_bounds_each_lesion(tmp_path):
    """One step on a batch of whole lesions: one clipped gradient per lesion, norm <= C."""
    C = 0.1
    data = skewed_bundle(images_per_lesion=3)
    cfg = RunConfig(**BASE, dp=True, target_epsilon=8.0, delta=1e-4, max_grad_norm=C,
                    privacy_unit="lesion")
    s = setup_training(cfg, data, torch.device("cpu"), dp_seed=0)
    n_lesions = len(set(data.meta.loc[data.meta["split"] == "train", "lesion_id"]))
    assert s.n_units == n_lesions and s.sample_rate == pytest.approx(1 / math.ceil(n_lesions / 32))
    assert s.optimizer.expected_batch_size == pytest.approx(n_lesions * s.sample_rate)
    idx = torch.arange(9)  # the first three lesions
    x = torch.from_numpy(data.x_train[:9]).permute(0, 3, 1, 2).float() / 255
    s.optimizer.zero_grad(set_to_none=True)
    s.criterion(s.model(x), torch.from_numpy(data.y_train[:9])).backward()
    assert aggregate_grad_samples(s.model, s.units[idx]) == 3
    rows = [p.grad_sample for p in s.model.parameters() if p.requires_grad]
    assert all(r.shape[0] == 3 for r in rows)
    raw = torch.sqrt(sum((r.flatten(1) ** 2).sum(1) for r in rows))
    s.optimizer.clip_and_accumulate()
    total = torch.sqrt(sum((p.summed_grad ** 2).sum() for p in s.model.parameters() if p.requires_grad))
    assert (raw > C).all() and total <= 3 * C * (1 + 1e-5)


def test_lesion_level_run_records_its_unit(tmp_path):
    data = skewed_bundle(images_per_lesion=2)
    cfg = RunConfig(**BASE, dp=True, target_epsilon=4.0, delta=1e-4, privacy_unit="lesion")
    res = run(cfg, tmp_path, data=data)
    lesions = sum(math.ceil(c / 2) for c in COUNTS)
    assert res.meta["privacy"]["n_units"] == lesions
    assert res.meta["sample_rate"] == pytest.approx(1 / math.ceil(lesions / 32))
    assert res.meta["steps"] == 2 * math.ceil(lesions / 32)
    assert any("one training lesion" in n for n in res.meta["notes"])
    card = __import__("dpskin_core.attacks.cards", fromlist=["cards"]).privacy_card(res.run_dir)
    assert "lesion" in card["guarantee"] and card["privacy"]["unit"] == "lesion"
    with pytest.raises(ConfigError, match="privacy_unit"):
        RunConfig(**BASE, privacy_unit="lesion")  # a non-private run has no unit


def test_secret_file_is_written_before_any_release(tmp_path):
    cfg = RunConfig(**BASE, dp=True, target_epsilon=4.0, delta=1e-4, logit_adjust=True)
    res = run(cfg, tmp_path, data=random_bundle())
    secret = read_json(res.run_dir / "checkpoints" / "secret.json")
    assert secret["mode"] == "secret" and 0 <= secret["secret"] < 2 ** 63
