"""Membership inference, extraction, model loading and privacy cards: known answers."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from torch import nn

from dpskin_core import attacks
from dpskin_core.attacks import cards
from dpskin_core.training import records
from dpskin_core.attacks import MIAData, TrainedModel, membership
from dpskin_core.training.config import RunConfig
from dpskin_core.training.backbones import has_batchnorm
from dpskin_core.errors import ConfigError, UnknownNameError

from test_train import random_bundle

torch.set_num_threads(1)

# a model that can memorise: no augmentation, Adam, many passes over a tiny set
FAST = dict(image_size=16, batch_size=16, progress=False, num_threads=1, backbone="smallcnn_fast",
            augment_flips=False, augment_rot90=False)
MEMORISE = dict(FAST, epochs=30, optimizer="adam", lr=3e-3)


def blocks(n, size=16, seed=0):
    """Random colours on 4x4 px cells with random labels: fitted only by memorising."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
    return np.ascontiguousarray(x), rng.integers(0, 7, n)


def logits_from_conf(conf, labels, c=7):
    """Logits whose logit-scaled confidence of ``labels`` is exactly ``conf`` (..., N, V)."""
    z = np.zeros(conf.shape + (c,))
    np.put_along_axis(z, np.broadcast_to(labels[:, None, None], conf.shape + (1,)).copy(),
                      (conf + np.log(c - 1))[..., None], axis=-1)
    return z


# ------------------------------------------------------------------------------ registry
def test_registry_names_kinds_and_unknown_names():
    assert {"loss_threshold", "lira_offline", "lira_online"} == set(attacks.attack_names("membership"))
    assert {"copycat", "model_inversion", "gradient_inversion", "one_run_audit"} <= set(attacks.ATTACKS)
    with pytest.raises(UnknownNameError, match="unknown attack 'lira_ofline'.*lira_offline"):
        attacks.run_attack("lira_ofline")
    d = MIAData(np.zeros((4, 1, 7)), np.zeros(4, int))
    with pytest.raises(ConfigError, match="'copycat' is not a membership attack"):
        attacks.membership_scores("copycat", d)
    with pytest.raises(ConfigError, match="needs shadow models"):
        attacks.membership_scores("lira_online", d)


# ------------------------------------------------------------------------------ metrics
def test_roc_and_metrics_known_answers():
    r = attacks.mia_metrics([4, 3, 2, 1], [True, False, True, False])
    np.testing.assert_allclose(r.fpr, [0, 0, .5, .5, 1])
    np.testing.assert_allclose(r.tpr, [0, .5, .5, 1, 1])
    assert r.auc == pytest.approx(0.75) and r.balanced_accuracy == pytest.approx(0.75)
    assert r.tpr_at_fpr == {0.001: 0.5, 0.01: 0.5}
    perfect = attacks.mia_metrics([9, 8, 1, 0], [1, 1, 0, 0])
    assert perfect.auc == 1 and perfect.balanced_accuracy == 1 and perfect.tpr_at_fpr[0.001] == 1
    reverse = attacks.mia_metrics([0, 1, 8, 9], [1, 1, 0, 0])
    assert reverse.auc == 0 and reverse.tpr_at_fpr[0.01] == 0 and reverse.balanced_accuracy == 0.5
    ties = attacks.mia_metrics(np.ones(6), [1, 0, 1, 0, 1, 0])  # tied scores move together
    np.testing.assert_allclose(ties.fpr, [0, 1]) and np.testing.assert_allclose(ties.tpr, [0, 1])
    assert ties.auc == 0.5 and ties.summary()["min_measurable_fpr"] == pytest.approx(1 / 3)


def test_signals_match_their_definitions():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(5, 3, 7)), np.array([0, 1, 2, 3, 6])
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    py = p[np.arange(5), :, y]
    np.testing.assert_allclose(attacks.logit_confidence(z, y), np.log(py / (1 - py)))
    np.testing.assert_allclose(attacks.cross_entropy(z, y), -np.log(py))


@pytest.mark.parametrize("call, field", [
    (lambda: attacks.mia_metrics([1.0, 2.0], []), "members is empty"),
    (lambda: attacks.mia_metrics([1.0, 2.0], [False, False]), "member set is empty"),
    (lambda: attacks.mia_metrics([1.0, 2.0], [True, True]), "non-member set is empty"),
    (lambda: attacks.mia_metrics([1.0, 2.0, 3.0], [True, False]), "mismatched lengths: members"),
    (lambda: attacks.mia_metrics([1.0, np.nan], [True, False]), "scores contain NaN"),
    (lambda: MIAData(np.zeros((3, 1, 7)), np.zeros(4, int)), "target_logits has 3, labels has 4"),
    (lambda: MIAData(np.zeros((3, 1, 7)), np.array([0, 1, 7])), "labels must be in"),
    (lambda: MIAData(np.zeros((3, 1, 7)), np.zeros(3, int), np.zeros((2, 3, 1, 7))), "given together"),
    (lambda: MIAData(np.zeros((3, 1, 7)), np.zeros(3, int), np.zeros((2, 4, 1, 7)),
                     np.zeros((2, 4), bool)), "shadow_logits has shape"),
    (lambda: attacks.half_masks(1, 10, np.random.default_rng(0)), "n_shadows must be >= 2"),
    (lambda: attacks.fidelity([1, 2], [1]), "pred_a has 2, pred_b has 1"),
])
def test_bad_input_raises_config_error_naming_the_field(call, field):
    with pytest.raises(ConfigError, match=field):
        call()


# ------------------------------------------------------------------------------ LiRA, known answer
def test_lira_recovers_per_example_calibration_on_gaussian_signals():
    """Confidences conf = hardness_i + d * member + N(0, 1), hardness ~ N(0, 3^2).

    A global threshold (the loss attack) fights the hardness spread: AUC = Phi(d / sqrt(2 *
    10)) = 0.59. LiRA subtracts each example's own OUT median (from 8 OUT shadows):
    AUC ~ Phi(d / sqrt(2 * (1 + pi / 16))) = 0.74 for offline (median noise pi/2/8).
    """
    rng = np.random.default_rng(0)
    n, s, d = 4000, 16, 1.0
    hard = rng.normal(0, 3, n)
    labels = rng.integers(0, 7, n)
    members = rng.random(n) < 0.5
    shadow_in = attacks.half_masks(s, n, rng)
    target = hard + d * members + rng.normal(size=n)
    shadow = hard + d * shadow_in + rng.normal(size=(s, n))
    data = MIAData(logits_from_conf(target[:, None], labels), labels,
                   logits_from_conf(shadow[:, :, None], labels), shadow_in)
    auc = {a: attacks.mia_metrics(attacks.membership_scores(a, data), members).auc
           for a in attacks.attack_names("membership")}
    assert auc["loss_threshold"] == pytest.approx(norm.cdf(d / np.sqrt(20)), abs=0.03)
    assert auc["lira_offline"] == pytest.approx(norm.cdf(d / np.sqrt(2 * (1 + np.pi / 16))), abs=0.03)
    assert auc["lira_online"] > auc["lira_offline"] - 0.02
    assert auc["lira_online"] > auc["loss_threshold"] + 0.1


def test_lira_per_example_variance_and_missing_sides():
    rng = np.random.default_rng(1)
    n, s = 2000, 8
    labels, members = rng.integers(0, 7, n), rng.random(n) < 0.5
    shadow_in = rng.random((s, n)) < 0.5  # random masks: some examples lack IN or OUT shadows
    assert (shadow_in.all(0) | ~shadow_in.any(0)).any()
    conf = rng.normal(size=(s, n)) + 2 * shadow_in
    d = MIAData(logits_from_conf((rng.normal(size=n) + 2 * members)[:, None], labels), labels,
                logits_from_conf(conf[:, :, None], labels), shadow_in)
    for a in ("lira_offline", "lira_online"):
        for fix in (True, False):
            sc = attacks.membership_scores(a, d, fix_variance=fix)
            # Phi(2 / sqrt(2)) = 0.92 with exact Gaussians; per-example std from ~4 draws is worse
            assert np.isfinite(sc).all() and attacks.mia_metrics(sc, members).auc > 0.8, (a, fix)
    # an example without OUT shadows falls back to the median over the others
    mask = np.array([[True, True], [False, False], [True, True]])  # (examples, shadows)
    mu, sd = membership._gaussian_fit(np.arange(6.0).reshape(3, 2, 1), mask, True)
    assert mu[:, 0].tolist() == [0.5, 2.5, 4.5] and sd[:, 0] == pytest.approx([np.sqrt(0.5)] * 3)
    one = np.array([[True, False], [False, True], [True, False]])  # one shadow each: no dof
    mu, sd = membership._gaussian_fit(np.arange(6.0).reshape(3, 2, 1), one, True)
    assert mu[:, 0].tolist() == [0, 3, 4] and sd[0, 0] == pytest.approx(np.std([0, 3, 4]))


# ------------------------------------------------------------------------------ through run()
@pytest.mark.slow  # trains 1 small model to memorise (~4 s)
def test_memorising_model_gives_auc_near_one(tmp_path):
    x, y = blocks(128)
    members = np.arange(128) < 64
    res, model = attacks.train_on(RunConfig(**MEMORISE), attacks.with_train(random_bundle(), x[members],
                                                                            y[members]), tmp_path)
    r = attacks.mia_metrics(attacks.loss_threshold(MIAData(model.view_logits(x), y)), members)
    assert r.auc > 0.95 and r.tpr_at_fpr[0.01] > 0.5
    assert res.meta["n_train"] == 64


@pytest.mark.parametrize("seeds", [(0, 1, 2)])
def test_model_never_trained_on_members_gives_auc_half(seeds):
    """Members and non-members both unseen by the model: AUC ~ 0.5 (sd ~0.04 per seed)."""
    torch.manual_seed(0)
    model = TrainedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7)), RunConfig(image_size=16))
    aucs = []
    for seed in seeds:
        x, y = blocks(240, seed=seed + 10)
        members = np.random.default_rng(seed).random(240) < 0.5
        aucs.append(attacks.mia_metrics(attacks.loss_threshold(MIAData(model.view_logits(x, 2), y)),
                                        members).auc)
    assert abs(np.mean(aucs) - 0.5) < 0.06 and max(abs(np.array(aucs) - 0.5)) < 0.15


@pytest.mark.slow  # trains 3 small models (~6-10 s)
def test_membership_experiment_end_to_end(tmp_path):
    x, y = blocks(96)
    data = attacks.with_train(random_bundle(), x, y, "pool")
    exp = attacks.membership_experiment(RunConfig(**MEMORISE), data, tmp_path, n_shadows=2, views=2)
    assert exp.members.sum() == 48 and exp.shadow_in.shape == (2, 96)
    assert (exp.shadow_in.sum(0) == 1).all()  # each example IN for exactly half the shadows
    assert exp.data.shadow_logits.shape == (2, 96, 2, 7)
    dirs = {exp.target_result.run_dir, *(r.run_dir for r in exp.shadow_results)}
    assert len(dirs) == 3  # same recipe, different data: never one reused folder
    for a, r in exp.results.items():
        assert r.auc > 0.9, (a, r.auc)
    assert set(exp.table()["attack"]) == {"loss_threshold", "lira_offline", "lira_online"}
    mx, my = exp.member_images(data)  # the target's training set, for reconstruction attacks
    np.testing.assert_array_equal(mx, x[exp.members])
    np.testing.assert_array_equal(my, y[exp.members])
    again = attacks.membership_experiment(RunConfig(**MEMORISE), data, tmp_path, n_shadows=2, views=2,
                                          attacks=("lira_online",))
    assert again.target_result.reused and all(r.reused for r in again.shadow_results)
    np.testing.assert_allclose(again.scores["lira_online"], exp.scores["lira_online"])


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9}, {"backbone": "resnet18", "norm": "batch"}])
def test_load_trained_reproduces_the_runs_predictions(tmp_path, extra):
    data = random_bundle(n_train=120, n_val=35, n_test=35, size=16)
    res = attacks.train_on(RunConfig(**{**FAST, "epochs": 2, **extra}), data, tmp_path)[0]
    model = attacks.load_trained(res.run_dir)
    # the run's own network: a BatchNorm run reloads with its BatchNorm and running statistics
    assert has_batchnorm(model.model) == (extra.get("norm") == "batch")
    pred = records.load_predictions(res.run_dir)
    np.testing.assert_allclose(model.predict_proba(data.x_test), pred.filter(like="prob_").to_numpy(),
                               atol=1e-5)
    if "ema_decay" in extra:  # the released model is the EMA, not the last iterate
        last = attacks.load_trained(res.run_dir, "last").predict_proba(data.x_test)
        assert np.abs(last - pred.filter(like="prob_").to_numpy()).max() > 1e-4
    with pytest.raises(ConfigError, match="not a run folder"):
        attacks.load_trained(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint='final'"):
        attacks.load_trained(res.run_dir, "final")


# ------------------------------------------------------------------------------ extraction
def _victim(seed=0, scale=10.0):
    """Logits linear in the mean colour (1x1 conv + average pool), weights scaled up so
    that several classes are predicted on random-colour images."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 7, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.mul_(scale)
    return TrainedModel(net, RunConfig(image_size=16))


def test_extraction_of_a_victim_by_itself_gives_fidelity_one():
    victim = _victim()
    data = random_bundle(n_train=60, n_val=60, n_test=70, size=16)
    assert attacks.fidelity(victim.predict(data.x_test), victim.predict(data.x_test)) == 1.0
    out = attacks.extract_model(victim, data.x_val, data.x_test, data.y_test, budgets=[10, 60],
                                attacker_factory=lambda: copy.deepcopy(victim.model), epochs=0,
                                progress=False)
    assert list(out.table["fidelity"]) == [1.0, 1.0]
    assert (out.table["balanced_accuracy"] == out.table["victim_balanced_accuracy"]).all()
    other = attacks.extract_model(victim, data.x_val, data.x_test, data.y_test, budgets=[10],
                                  attacker_factory=lambda: _victim(5).model, epochs=0, progress=False)
    assert other.table["fidelity"][0] < 1.0  # a different model does not agree everywhere


@pytest.mark.parametrize("mode", ["probs", "labels"])
def test_extraction_learns_the_victim(mode):
    """Attacker architecture = victim's (fresh weights), queries from a disjoint pool."""
    victim = _victim()
    x, _ = blocks(700, seed=3)
    majority = np.bincount(victim.predict(x[600:])).max() / 100  # constant-guess fidelity
    out = attacks.extract_model(victim, x[:600], x[600:], np.zeros(100, int), budgets=[20, 600],
                                mode=mode, attacker_factory=lambda: _victim(1, 1.0).model,
                                epochs=30, lr=3e-2, progress=False)
    fid = out.table["fidelity"].to_numpy()
    assert fid[-1] > max(0.8, majority + 0.1) and fid[-1] > fid[0] + 0.1, (fid, majority)
    with pytest.raises(ConfigError, match="budgets must be in 1..600"):
        attacks.extract_model(victim, x[:600], x[600:], np.zeros(100, int), budgets=[700])
    with pytest.raises(ConfigError, match="mode="):
        attacks.extract_model(victim, x[:600], x[600:], np.zeros(100, int), mode="logits")
    with pytest.raises(ConfigError, match="test_x has 100, test_y has 3"):
        attacks.extract_model(victim, x[:600], x[600:], np.zeros(3, int))


def test_synthetic_query_pool(tmp_path):
    x = attacks.synthetic_pool(60, 16, cache_dir=str(tmp_path))
    assert x.dtype == np.uint8 and x.shape == (60, 16, 16, 3)
    np.testing.assert_array_equal(attacks.synthetic_pool(60, 16, cache_dir=str(tmp_path)), x)
    # seed 0 is the embedded dataset's: the default pool shares no image with it
    embedded = attacks.synthetic_pool(60, 16, cache_dir=str(tmp_path), seed=0)
    assert not (x.reshape(60, 1, -1) == embedded.reshape(1, 60, -1)).all(-1).any()


def test_subsample_train_keeps_val_and_test():
    data = random_bundle(n_train=120, n_val=35, n_test=35, size=16)
    sub = attacks.subsample_train(data, 50, seed=3)
    assert len(sub.y_train) == 50 and (sub.meta["split"] == "train").sum() == 50
    assert sub.x_val is data.x_val and sub.x_test is data.x_test
    rows = {r.tobytes() for r in data.x_train}
    assert all(r.tobytes() in rows for r in sub.x_train)
    assert attacks.subsample_train(data, None) is data and attacks.subsample_train(data, 500) is data
    with pytest.raises(ConfigError, match="n must be a positive int"):
        attacks.subsample_train(data, 0)


# ------------------------------------------------------------------------------ privacy card
def test_privacy_card_reads_the_guarantee_and_keeps_attacks(tmp_path):
    data = random_bundle(n_train=120, n_val=35, n_test=35, size=16)
    cfg = RunConfig(**FAST, epochs=1, dp=True, target_epsilon=3.0, delta=1e-3, accountant="rdp")
    res = attacks.train_on(cfg, data, tmp_path)[0]
    mia = attacks.mia_metrics([4, 3, 2, 1], [1, 0, 1, 0], "loss_threshold")
    path = cards.write_privacy_card(res.run_dir, {"loss_threshold": mia})
    card = json.loads(path.read_text())
    meta = res.meta
    assert card["epsilon"] == pytest.approx(res.epsilon) and card["epsilon"] <= 3.0
    assert card["delta"] == 1e-3 and card["accountant"] == "rdp" and card["dp"] is True
    assert card["noise_multiplier"] == pytest.approx(meta["noise_multiplier"])
    assert card["sample_rate"] == pytest.approx(meta["sample_rate"]) and card["steps"] == meta["steps"]
    assert card["attacks"]["loss_threshold"]["auc"] == pytest.approx(0.75)
    cards.write_privacy_card(res.run_dir, {"audit": {"eps_lower_bound": 0.0}})
    card = json.loads(path.read_text())
    assert set(card["attacks"]) == {"loss_threshold", "audit"}  # merged, not replaced
    np_res = attacks.train_on(cfg.replace(dp=False), data, tmp_path)[0]
    np_card = cards.privacy_card(np_res.run_dir)
    assert np_card["epsilon"] is None and np_card["guarantee"].startswith("none")
    with pytest.raises(ConfigError, match="not a run folder"):
        cards.privacy_card(tmp_path)


def test_card_summary_takes_the_strongest_attack_and_the_table_round_trips(tmp_path):
    from dpskin_core.book.runner import runs_fingerprint

    card = {"name": "x", "method": "dp-sgd", "dp": True, "epsilon": 2.9, "delta": 1e-5,
            "balanced_accuracy": 0.4, "run_id": "abc", "attacks": {
                "loss_threshold": {"auc": 0.6, "tpr_at_fpr_0.001": 0.05, "tpr_at_fpr_0.01": 0.1,
                                   "min_measurable_fpr": 0.01},
                "lira_offline": {"auc": 0.7, "tpr_at_fpr_0.001": 0.02, "tpr_at_fpr_0.01": 0.2,
                                 "min_measurable_fpr": 0.01},
                "one_run_audit": {"eps_lower_bound": 0.8},
                "copycat_synthetic_probs": {"mode": "probs", "rows": []}}}
    row = cards.card_summary(card, model="DP-SGD, eps = 3")
    assert row["model"] == "DP-SGD, eps = 3" and row["epsilon"] == 2.9 and row["delta"] == 1e-5
    assert row["mia_auc"] == 0.7 and row["mia_attack"] == "lira_offline"
    assert row["mia_tpr_at_fpr_0.001"] == 0.05 and row["mia_tpr_at_fpr_0.01"] == 0.2  # each max
    assert row["eps_lower_bound"] == 0.8 and row["mia_min_measurable_fpr"] == 0.01
    bare = cards.card_summary({"name": "n", "dp": False, "attacks": {}})
    assert bare["model"] == "n" and bare["mia_auc"] is None and bare["eps_lower_bound"] is None

    assert cards.read_attack_summary(tmp_path) is None
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "meta.json").write_text(json.dumps({"status": "complete"}))
    assert runs_fingerprint(tmp_path) == ["r1"]
    path = cards.write_attack_summary(pd.DataFrame([row, bare]), tmp_path)
    assert path == tmp_path / "attacks" / "summary.csv"
    back = cards.read_attack_summary(tmp_path)
    assert list(back["model"]) == ["DP-SGD, eps = 3", "n"] and back["mia_auc"].iloc[0] == 0.7
    # the summary chapter re-executes when the privacy table changes
    fp = runs_fingerprint(tmp_path)
    assert fp[0] == "r1" and fp[1].startswith("attacks/summary.csv@")
    cards.write_attack_summary(pd.DataFrame([row]), tmp_path)
    assert runs_fingerprint(tmp_path) != fp
