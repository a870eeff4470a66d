"""Training: records, DP guarantees (eps vs dp-accounting PLD), clipping, Poisson batches, resume."""
import numpy as np
import pandas as pd
import pytest
import torch

from dpskin_core.files import read_json
from dpskin_core.training import privacy, records
from dpskin_core.training.backbones import build_backbone
from dpskin_core.training.checkpoint import Checkpoint
from dpskin_core.training.config import RunConfig
from dpskin_core.constants import CLASSES
from dpskin_core.data import DataBundle
from dpskin_core.errors import ConfigError
from dpskin_core.training.trainer import pick_device, run, setup_training


def random_bundle(n_train=240, n_val=70, n_test=70, size=16, seed=0) -> DataBundle:
    """Learnable toy data: the class sets the mean colour of the image."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % len(CLASSES)
        base = (y[:, None] * 30 + 40).astype(np.float64)
        x = base[:, None, None, :].repeat(size, 1).repeat(size, 2) + rng.normal(0, 25, (n, size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = make(n_train), make(n_val), make(n_test)
    meta = pd.DataFrame({
        "image": [f"img{i}" for i in range(n_train + n_val + n_test)],
        "label": np.concatenate([yt, yv, ys]),
        "lesion_id": [f"l{i}" for i in range(n_train + n_val + n_test)],
        "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test,
    })
    return DataBundle(xt, yt, xv, yv, xs, ys, meta, info={"dataset": "toy"})


BASE = dict(image_size=16, epochs=2, batch_size=32, lr=0.05, progress=False, num_threads=1)


def test_nonprivate_run_writes_record_and_is_reused(tmp_path):
    data = random_bundle()
    res = run(RunConfig(**BASE, name="np"), tmp_path, data=data)
    d = res.run_dir
    for f in ("config.json", "meta.json", "metrics.csv", "predictions.csv", "checkpoints/last.pt"):
        assert (d / f).is_file(), f
    m = pd.read_csv(d / "metrics.csv")
    assert list(m.columns) == records.METRIC_COLUMNS
    assert set(m["split"]) == {"train", "val", "test"}
    meta = read_json(d / "meta.json")
    assert meta["status"] == "complete" and meta["train_images_per_s"] > 0
    assert meta["peak_memory_mb"] > 0 and "torch" in meta["packages"]
    assert res.epsilon is None
    pred = pd.read_csv(d / "predictions.csv")
    assert len(pred) == 70 and np.allclose(pred.filter(like="prob_").sum(axis=1), 1, atol=1e-4)
    # the reported balanced accuracy is that of the recorded predictions
    recall = [np.mean(pred["pred"][pred["label"] == c] == c) for c in range(len(CLASSES))]
    assert res.final_metrics["balanced_accuracy"] == pytest.approx(np.mean(recall))
    again = run(RunConfig(**BASE, name="np"), tmp_path, data=data)
    assert again.reused and again.run_id == res.run_id
    assert again.final_metrics == pytest.approx(res.final_metrics, nan_ok=True)
    runs = records.load_runs(tmp_path)
    assert len(runs) == 1 and runs.loc[0, "method"] == "nonprivate-sgd"
    # no run yet: an empty listing with every column a run's row has but its final metrics
    empty = records.load_runs(tmp_path / "nothing-here")
    assert empty.empty and set(runs.columns) - set(res.final_metrics) == set(empty.columns)


def test_nonprivate_learns_toy_data(tmp_path):
    res = run(RunConfig(**{**BASE, "epochs": 4, "lr": 3e-3}, optimizer="adam"), tmp_path,
              data=random_bundle())
    assert res.final_metrics["balanced_accuracy"] > 0.5  # chance is 1/7


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_dp_run_meets_target_and_matches_pld(tmp_path, accountant):
    cfg = RunConfig(**BASE, dp=True, target_epsilon=4.0, delta=1e-4, accountant=accountant)
    res = run(cfg, tmp_path, data=random_bundle())
    q = privacy.sample_rate_for(32, 240)
    steps = privacy.steps_per_epoch(32, 240) * 2
    meta = res.meta
    assert meta["sample_rate"] == pytest.approx(q) and meta["steps"] == steps
    assert res.epsilon <= 4.0
    pld = privacy.epsilon([(res.noise_multiplier, q, steps)], 1e-4, "pld")
    assert res.epsilon >= pld * (1 - 1e-3)  # never below the reference (up to PLD's own grid)
    if accountant == "prv":
        assert res.epsilon <= pld * 1.10
    m = res.metrics
    assert (m["eps"].dropna() <= 4.0).all() and (m["noise_multiplier"] == res.noise_multiplier).all()


@pytest.mark.parametrize("mode", ["hooks", "fast", "bk"])
def test_clipped_per_sample_gradients_are_bounded(mode):
    """Instrument one step: the clipped contribution of each sample has norm <= C (every engine
    with its own clipping path: per-sample rows, or bk's clipped sum)."""
    C = 0.1  # small, so that raw gradients are certainly clipped
    cfg = RunConfig(**BASE, dp=True, target_epsilon=8.0, delta=1e-4, max_grad_norm=C,
                    grad_sample_mode=mode)
    data = random_bundle()
    s = setup_training(cfg, data, torch.device("cpu"))
    plain = build_backbone(cfg.backbone, num_classes=7)  # no DP machinery: the raw gradient
    plain.load_state_dict(s.model._module.state_dict())
    x = torch.from_numpy(data.x_train[:6]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.y_train[:6])
    norms, raw = [], []
    for i in range(6):  # one sample per batch: summed_grad is exactly its clipped gradient
        plain.zero_grad(set_to_none=True)
        s.criterion(plain(x[i:i + 1]), y[i:i + 1]).backward()
        raw.append(torch.sqrt(sum((p.grad ** 2).sum() for p in plain.parameters())).item())
        s.optimizer.zero_grad(set_to_none=True)
        s.criterion(s.model(x[i:i + 1]), y[i:i + 1]).backward()
        if mode == "bk":  # the backward pass left the clipped sum in p.grad
            s.optimizer.accumulate()
        else:
            s.optimizer.clip_and_accumulate()
        norms.append(torch.sqrt(sum((p.summed_grad ** 2).sum() for p in s.model.parameters()
                                    if p.requires_grad)).item())
        for p in s.model.parameters():
            p.summed_grad = None
    assert max(norms) <= C * (1 + 1e-5)
    assert min(raw) > C  # the bound was active, so the test can fail
    assert np.allclose(norms, C, rtol=1e-3)


def test_poisson_batch_sizes_vary():
    cfg = RunConfig(**BASE, dp=True, target_epsilon=8.0, delta=1e-4)
    s = setup_training(cfg, random_bundle(), torch.device("cpu"))
    s.g_sample.manual_seed(0)
    sizes = [len(idx) for (idx,) in s.loader]
    assert len(sizes) == privacy.steps_per_epoch(32, 240)
    assert len(set(sizes)) > 1
    assert abs(np.mean(sizes) - 240 * s.sample_rate) < 12


@pytest.mark.parametrize("dp", [False, True])
def test_resume_matches_uninterrupted(tmp_path, dp):
    """A run stopped after epoch 1 and resumed ends with the weights and eps of an uninterrupted
    run; under DP that holds given the run's secret (copied into the uninterrupted run's
    private checkpoints folder before it starts)."""
    import shutil

    kw = dict(BASE, epochs=3, dp=dp, target_epsilon=4.0 if dp else None, delta=1e-4, optimizer="adam",
              lr_schedule="cosine")
    kw["lr"] = 1e-3
    data = random_bundle()
    part = run(RunConfig(**kw), tmp_path / "b", data=data, stop_after_epoch=1)
    assert part.meta["status"] == "stopped"
    secret = part.run_dir / "checkpoints" / "secret.json"
    assert secret.is_file() == dp
    if dp:
        (tmp_path / "a" / part.run_id / "checkpoints").mkdir(parents=True)
        shutil.copy(secret, tmp_path / "a" / part.run_id / "checkpoints" / "secret.json")
    full = run(RunConfig(**kw), tmp_path / "a", data=data)
    resumed = run(RunConfig(**kw), tmp_path / "b", data=data)
    assert resumed.meta["resumed_at_epochs"] == [1]
    # the record's wall time covers both segments, not only the resumed one
    assert resumed.meta["wall_time_s"] > part.meta["wall_time_s"] > 0
    assert resumed.epsilon == full.epsilon
    wa = Checkpoint.load(full.run_dir / "checkpoints").model
    wb = Checkpoint.load(resumed.run_dir / "checkpoints").model
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert resumed.final_metrics == pytest.approx(full.final_metrics, nan_ok=True, rel=0, abs=0)


def test_dp_noise_is_secret_unless_seeded(tmp_path):
    """The same public config run twice (as in a fresh clone, without the first run's secret)
    gives other weights under the default secret noise, the same eps; the research mode
    ``dp_noise="seeded"`` regenerates the same weights from the public seed."""
    data = random_bundle()
    kw = dict(BASE, dp=True, target_epsilon=4.0, delta=1e-4)

    def weights(mode, root):
        res = run(RunConfig(**kw, dp_noise=mode), tmp_path / root, data=data)
        return res, Checkpoint.load(res.run_dir / "checkpoints").model

    (r1, w1), (r2, w2) = weights("secret", "one"), weights("secret", "two")
    assert r1.epsilon == r2.epsilon and r1.run_id == r2.run_id
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    (s1, v1), (_, v2) = weights("seeded", "three"), weights("seeded", "four")
    assert all(torch.equal(v1[k], v2[k]) for k in v1)
    assert r1.meta["privacy"]["dp_noise"] == "secret" and s1.meta["privacy"]["dp_noise"] == "seeded"
    assert "RESEARCH MODE" in s1.meta["privacy"]["dp_noise_note"]
    # the secret stays in the private checkpoints folder, in no published file
    secret = str(read_json(r1.run_dir / "checkpoints" / "secret.json")["secret"])
    for f in r1.run_dir.iterdir():
        if f.is_file():
            assert secret not in f.read_text(errors="ignore"), f
    with pytest.raises(ConfigError, match="torchcsprng"):
        RunConfig(**kw, dp_noise="secure")


def test_interrupt_keeps_last_checkpoint(tmp_path, monkeypatch):
    from dpskin_core.training.frontends import Inputs

    data = random_bundle()
    cfg = RunConfig(**dict(BASE, epochs=3))
    calls = {"n": 0}
    real = Inputs.train_batch
    steps = privacy.steps_per_epoch(32, 240)

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == steps + 3:  # in the middle of epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(Inputs, "train_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path, data=data)
    d = records.run_dir_for(cfg, tmp_path)
    assert read_json(d / "meta.json")["status"] == "interrupted"
    assert Checkpoint.load(d / "checkpoints").epoch == 1
    monkeypatch.setattr(Inputs, "train_batch", real)
    res = run(cfg, tmp_path, data=data)
    assert res.meta["status"] == "complete" and res.meta["resumed_at_epochs"] == [1]


def test_bad_inputs_fail_before_training(tmp_path):
    data = random_bundle()
    with pytest.raises(ConfigError, match="batch_size"):
        run(RunConfig(**dict(BASE, batch_size=1000)), tmp_path, data=data)
    with pytest.raises(ConfigError, match="1/N"):
        run(RunConfig(**BASE, dp=True, target_epsilon=3.0, delta=0.01), tmp_path, data=data)
    assert not any(tmp_path.iterdir())  # nothing was written: no training started


def test_forced_early_stop_releases_the_best_checkpoint(tmp_path, monkeypatch):
    """Validation scores 0.5 then 0.4: with patience 1 the run stops after epoch 2 and
    releases (evaluates, reports, reloads) the weights of epoch 1, not the last ones."""
    from dpskin_core.attacks import load_trained
    from dpskin_core.training import trainer

    scores, real = iter([0.5, 0.4]), trainer.evaluate

    def scripted(y, probs):
        out = real(y, probs)
        score = next(scores, None)  # the two validations, then the final evaluation (real)
        return out if score is None else {**out, "balanced_accuracy": score}

    monkeypatch.setattr(trainer, "evaluate", scripted)
    data = random_bundle()
    cfg = RunConfig(**dict(BASE, epochs=5), dp=True, target_epsilon=2.0, delta=1e-4,
                    early_stopping_patience=1)
    res = run(cfg, tmp_path, data=data)
    assert res.meta["early_stopped_at_epoch"] == 2 and res.meta["eval_epoch"] == 1
    assert any("not counted in eps" in n for n in res.meta["notes"])
    ck = res.run_dir / "checkpoints"
    best = torch.load(ck / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and Checkpoint.load(ck).epoch == 2
    last = Checkpoint.load(ck).model
    released = load_trained(res.run_dir).model.state_dict()
    assert all(torch.equal(released[k], best["model"][k]) for k in released)
    assert any(not torch.equal(released[k], last[k]) for k in released)
    # the reported predictions are the best epoch's
    probs = pd.read_csv(res.run_dir / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, load_trained(res.run_dir).predict_proba(data.x_test),
                               atol=1e-5)


def test_pick_device():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"


def test_warmup_then_cosine_schedule():
    from dpskin_core.training.trainer import lr_factor

    f = lr_factor("cosine", total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert lr_factor("constant", 10, 0)(0) == 1.0 and lr_factor("constant", 10, 2)(0) == 0.5
    plain = lr_factor("cosine", 10)
    assert plain(0) == 1.0 and plain(5) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        RunConfig(warmup_epochs=-1)


def test_collapse_to_one_class_is_in_the_record(tmp_path, monkeypatch):
    """A model predicting one class for every image is flagged per epoch and at the end."""
    from dpskin_core.training import trainer

    def constant(model, x, inputs, batch=512, logit_shift=None):
        p = np.zeros((len(x), len(CLASSES)))
        p[:, 1] = 1.0
        return p

    monkeypatch.setattr(trainer, "predict_proba", constant)
    res = run(RunConfig(**BASE, name="collapse"), tmp_path, data=random_bundle())
    assert res.meta["collapsed"] is True and res.meta["collapsed_at_epochs"] == [1, 2]
    assert res.final_metrics["predicted_classes"] == 1
    monkeypatch.undo()
    ok = run(RunConfig(**dict(BASE, epochs=3), name="learns"), tmp_path, data=random_bundle())
    assert ok.meta["collapsed"] is False and ok.final_metrics["predicted_classes"] > 1


@pytest.mark.parametrize("mixing", ["mixup", "cutmix"])
def test_a_mixed_run_trains_resumes_exactly_and_differs_from_the_plain_run(tmp_path, mixing):
    """Batch mixing draws from the augmentation stream, so a resumed run replays it; it
    changes what is learned (the weights differ from the unmixed run's)."""
    kw = dict(BASE, epochs=2, optimizer="adam", lr=1e-3, class_weights="balanced")
    data = random_bundle()
    mixed = RunConfig(**kw, mixing=mixing, mixing_alpha=1.0)
    full = run(mixed, tmp_path / "a", data=data)
    run(mixed, tmp_path / "b", data=data, stop_after_epoch=1)
    resumed = run(mixed, tmp_path / "b", data=data)
    plain = run(RunConfig(**kw), tmp_path / "c", data=data)
    assert full.run_id != plain.run_id
    train = full.metrics[(full.metrics.split == "train") & (full.metrics.metric == "loss")]
    assert np.isfinite(train.value).all() and len(train) == 2
    wa, wb, wc = (Checkpoint.load(r.run_dir / "checkpoints").model for r in (full, resumed, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_sqrt_resampled_run_draws_rare_classes_more_often_and_resumes_exactly(tmp_path,
                                                                               monkeypatch):
    """class_weights='sqrt-resampled' draws each batch with replacement, class c in proportion
    to sqrt(n_c), from the sampling stream (so a resumed run replays it) and weights the loss
    by n_c^-1/2; it is refused under DP (it reads the exact counts)."""
    from dpskin_core.training import trainer

    kw = dict(BASE, epochs=2, optimizer="adam", lr=1e-3)
    data = random_bundle()
    cfg = RunConfig(**kw, class_weights="sqrt-resampled")
    seen = []
    real = trainer.DataLoader

    def spy(*a, **k):  # the loaders the run builds
        loader = real(*a, **k)
        seen.append(loader)
        return loader

    monkeypatch.setattr(trainer, "DataLoader", spy)
    full = run(cfg, tmp_path / "a", data=data)
    monkeypatch.undo()
    sampler = seen[0].sampler
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and sampler.replacement
    assert sampler.num_samples == len(data.y_train)
    counts = np.bincount(data.y_train)
    few, many = counts.argmin(), counts.argmax()
    assert counts[few] < counts[many]  # each image of the rarer class is drawn more often
    weights = sampler.weights.numpy()
    assert weights[data.y_train == few].min() > weights[data.y_train == many].max()
    run(cfg, tmp_path / "b", data=data, stop_after_epoch=1)
    resumed = run(cfg, tmp_path / "b", data=data)
    plain = run(RunConfig(**kw, class_weights="balanced"), tmp_path / "c", data=data)
    wa, wb, wc = (Checkpoint.load(r.run_dir / "checkpoints").model for r in (full, resumed, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    with pytest.raises(ConfigError, match="class_weights='sqrt-resampled'"):
        RunConfig(**dict(kw, dp=True, target_epsilon=8.0), class_weights="sqrt-resampled")
