"""The proposed technique: histogram release, composed accounting, front ends, end to end."""
import numpy as np
import pandas as pd
import pytest
import torch

from dpskin_core.training import privacy
from dpskin_core.training.config import RunConfig
from dpskin_core.errors import ConfigError
from dpskin_core.training.frontends import (DERM_DIM, DERM_NORM, colour_features, derm_features,
                                            hsv_features, orientation_permutation)
from dpskin_core.training.technique import (VAR_FLOOR, LogitAdjustedLoss, average_grad_samples,
                                            exact_feature_stats, log_prior, noisy_class_histogram,
                                            noisy_feature_stats, stats_sensitivity)
from dpskin_core.training.trainer import run

from test_train import BASE, random_bundle


def test_histogram_noise_matches_stated_sigma():
    labels = np.repeat(np.arange(7), [50, 400, 30, 20, 60, 5, 8])
    counts = np.bincount(labels, minlength=7)
    g = torch.Generator().manual_seed(0)
    draws = np.stack([noisy_class_histogram(labels, 20.0, g) for _ in range(4000)])
    noise = draws - counts
    assert np.allclose(noise.mean(0), 0, atol=1.5)          # unbiased (4000 draws: se 0.32)
    assert np.allclose(noise.std(0), 20.0, rtol=0.05)       # std = the stated noise multiplier
    assert not np.allclose(noisy_class_histogram(labels, 20.0, g), counts)


def test_composed_epsilon_matches_dp_accounting():
    from dp_accounting import dp_event, pld

    hist, sigma, q, steps = 20.0, 1.2, 1 / 7, 210
    history = [(hist, 1.0, 1), (sigma, q, steps)]
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.GaussianDpEvent(hist))  # the histogram: one Gaussian release
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    ref = acc.get_epsilon(1e-5)
    ours = privacy.epsilon(history, 1e-5, "prv")
    assert ref * (1 - 1e-3) <= ours <= ref * 1.10
    assert ours > privacy.epsilon([(sigma, q, steps)], 1e-5, "prv")  # the release is counted
    # sigma derived with the release in the budget meets the total target
    s = privacy.noise_multiplier_for(3.0, 1e-5, q, steps, "prv", prefix=((hist, 1.0, 1),))
    assert privacy.epsilon([(hist, 1.0, 1), (s, q, steps)], 1e-5, "prv") <= 3.0
    assert s > privacy.noise_multiplier_for(3.0, 1e-5, q, steps, "prv")


def test_logit_adjustment_prefers_rare_classes_at_equal_logits():
    prior = log_prior(np.array([900.0, 100.0]))
    loss = LogitAdjustedLoss(prior)
    logits = torch.zeros(2, 2, requires_grad=True)
    loss(logits, torch.tensor([1, 1])).backward()
    # the rare class is pushed up harder than under plain cross-entropy (grad -0.5)
    assert logits.grad[0, 1] < -0.5 / 2
    assert np.isfinite(log_prior(np.array([-5.0, 10.0]))).all()  # negative noisy counts floored


def test_colour_features_invariant_to_dihedral_ops():
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    f = colour_features(x)
    assert f.shape == (3, 128) and np.allclose((f ** 2)[:, :64].sum(1), 1)
    for t in (x[:, ::-1], x[:, :, ::-1], x.transpose(0, 2, 1, 3)):
        assert np.allclose(colour_features(np.ascontiguousarray(t)), f)


def test_orientation_permutations_are_bijections():
    for op in "hvt":
        p = orientation_permutation(op)
        assert sorted(p.tolist()) == list(range(243))


def test_average_grad_samples_groups_views():
    m = torch.nn.Linear(2, 1)
    m.weight.grad_sample = torch.arange(8.0).view(4, 1, 2)
    m.bias.grad_sample = torch.arange(4.0).view(4, 1)
    average_grad_samples(m, 2)
    assert torch.equal(m.bias.grad_sample, torch.tensor([[0.5], [2.5]]))
    assert m.weight.grad_sample.shape == (2, 1, 2)


def test_head_and_front_end_must_match():
    with pytest.raises(ConfigError, match="features"):
        RunConfig(features="colour")  # smallcnn takes pixels
    with pytest.raises(ConfigError, match="pixels"):
        RunConfig(backbone="colour_linear")


def test_derm_features_bounded_and_invariant_to_dihedral_ops():
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    f = derm_features(x)
    assert f.shape == (4, DERM_DIM) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), DERM_NORM, rtol=1e-5)  # the stated bound
    for view in (x[:, ::-1], x[:, :, ::-1], np.rot90(x, 1, (1, 2))):
        np.testing.assert_allclose(derm_features(np.ascontiguousarray(view)), f, atol=1e-5)
    assert np.allclose(derm_features(x[:1]), f[:1])  # per image: no batch statistics


@pytest.mark.parametrize("name,p", [("grey-world", 1.0), ("shades-of-gray", 6.0),
                                    ("max-rgb", float("inf"))])
def test_colour_constancy_undoes_a_colour_cast_per_image(name, p):
    from dpskin_core.training.augment import COLOUR_CONSTANCY, shades_of_gray

    rng = np.random.default_rng(2)
    x = rng.integers(20, 180, (3, 16, 16, 3), dtype=np.uint8)
    correct = COLOUR_CONSTANCY.get(name)
    assert np.array_equal(correct(x), shades_of_gray(x, p))
    assert np.array_equal(shades_of_gray(x, p, chunk=2), shades_of_gray(x, p))  # chunks agree
    cast = np.array([1.0, 0.8, 0.6])  # a warm illuminant, per channel
    tinted = np.round(x * cast).astype(np.uint8)
    a, b = correct(x).astype(float), correct(tinted).astype(float)
    # the same image under either light, up to its brightness (one number per image) and rounding
    k = (a * b).sum((1, 2, 3), keepdims=True) / (a * a).sum((1, 2, 3), keepdims=True)
    assert np.abs(b - k * a).max() <= 3
    assert np.abs(tinted.astype(int) - x).max() > 60  # ...which the cast had moved a lot
    grey = np.full((1, 8, 8, 3), 120, np.uint8)
    assert np.array_equal(correct(grey), grey)  # a neutral image is left as it is
    assert np.array_equal(correct(x[:1]), correct(x)[:1])  # per image: no batch statistics
    assert correct(np.zeros((1, 4, 4, 3), np.uint8)).max() == 0  # black stays black, no NaN


def test_colour_constancy_names_are_checked():
    from dpskin_core.training.augment import COLOUR_CONSTANCY

    assert COLOUR_CONSTANCY.names() == sorted(["none", "grey-world", "shades-of-gray", "max-rgb"])
    with pytest.raises(ConfigError, match="colour_constancy='gray'"):
        RunConfig(colour_constancy="gray")
    with pytest.raises(ConfigError, match="colour_constancy='max-rgb' corrects images"):
        RunConfig(colour_constancy="max-rgb", features="given")


def test_hsv_histograms_match_matplotlibs_conversion():
    import matplotlib.colors as mcolors

    x = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    hsv = mcolors.rgb_to_hsv(x / 255.0)
    bins = np.array([8, 4, 4])
    idx = np.minimum((hsv * bins).astype(int), bins - 1)
    code = ((idx[..., 0] * 4 + idx[..., 1]) * 4 + idx[..., 2]).reshape(2, -1)
    expected = np.stack([np.sqrt(np.bincount(c, minlength=128) / c.size) for c in code])
    np.testing.assert_allclose(hsv_features(x)[:, :128], expected, atol=1e-6)


def test_feature_stats_release_has_the_stated_noise_and_sensitivity():
    rows = torch.randn(500, 6, dtype=torch.float64) * 3  # norms above the bound: clipped
    bound = 2.0
    clipped = rows * torch.clamp(bound / rows.norm(dim=1, keepdim=True), max=1.0)
    assert stats_sensitivity(bound) == pytest.approx(np.sqrt(1 + 4 + 16))
    # the sensitivity bounds ||(1, x, x*x)|| for every row of norm <= bound
    v = torch.cat([torch.ones(500, 1, dtype=torch.float64), clipped, clipped ** 2], 1)
    assert v.norm(dim=1).max() <= stats_sensitivity(bound) + 1e-9
    exact_mean = clipped.mean(0)
    g = torch.Generator().manual_seed(0)
    means = torch.stack([noisy_feature_stats(rows, 2.0, bound, g)[0] for _ in range(400)]).double()
    # the noise on a mean is sigma * sensitivity / N (through the noisy count, approximately)
    expected_sd = 2.0 * stats_sensitivity(bound) / 500
    assert means.mean(0).sub(exact_mean).abs().max() < 4 * expected_sd / np.sqrt(400) + 1e-3
    assert means.std(0).numpy() == pytest.approx(np.full(6, expected_sd), rel=0.2)
    mean, std = exact_feature_stats(torch.zeros(10, 3))
    np.testing.assert_allclose(std.numpy(), np.sqrt(VAR_FLOOR), rtol=1e-6)  # constant: floored
    assert torch.all(mean == 0)


def test_feature_norm_refusals():
    derm = dict(features="derm", backbone="derm_linear")
    with pytest.raises(ConfigError, match="non-private run uses feature_norm='exact'"):
        RunConfig(**derm, feature_norm="private")
    with pytest.raises(ConfigError, match="use feature_norm='private' under dp"):
        RunConfig(**derm, feature_norm="exact", dp=True, target_epsilon=3.0)
    with pytest.raises(ConfigError, match="standardising head"):
        RunConfig(features="colour", backbone="colour_linear", feature_norm="exact")
    with pytest.raises(ConfigError, match="privacy_unit='lesion' is not supported"):
        RunConfig(**derm, feature_norm="private", dp=True, target_epsilon=3.0,
                  privacy_unit="lesion")
    with pytest.raises(ConfigError, match="feature_norm"):
        RunConfig(**derm, feature_norm="batch")
    with pytest.raises(ConfigError, match="stats_noise"):
        RunConfig(**derm, feature_norm="private", dp=True, target_epsilon=3.0, stats_noise=0.0)
    # the fields a run does not read are not hashed
    assert RunConfig(**derm).semantic_dict() == RunConfig(**derm, stats_noise=3.0).semantic_dict()


def test_private_feature_stats_are_counted_and_released_in_the_model(tmp_path):
    kw = dict(BASE, lr=2.0, batch_size=64, epochs=2, features="derm", backbone="derm_linear")
    cfg = RunConfig(**kw, dp=True, target_epsilon=3.0, delta=1e-4, logit_adjust=True,
                    feature_norm="private", stats_noise=4.0)
    res = run(cfg, tmp_path / "runs", data=random_bundle())
    assert res.meta["prefix_history"] == [
        {"noise_multiplier": 20.0, "sample_rate": 1.0, "steps": 1},
        {"noise_multiplier": 4.0, "sample_rate": 1.0, "steps": 1}]
    expected = privacy.epsilon([(20.0, 1.0, 1), (4.0, 1.0, 1),
                                (res.noise_multiplier, res.meta["sample_rate"], res.meta["steps"])],
                               1e-4, "prv")
    assert res.epsilon == pytest.approx(expected, rel=1e-6) and res.epsilon <= 3.0
    stats = res.meta["released_before_training"]["feature_stats"]
    assert stats["noise_multiplier"] == 4.0 and stats["norm_bound"] == DERM_NORM
    from dpskin_core.attacks import load_trained

    head = load_trained(res.run_dir).model
    exact_mean, _ = exact_feature_stats(torch.from_numpy(derm_features(random_bundle().x_train)))
    assert not torch.allclose(head.shift, torch.zeros_like(head.shift))  # standardised ...
    assert not torch.allclose(head.shift, exact_mean)                    # ... by noisy statistics
    probs = pd.read_csv(res.run_dir / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, load_trained(res.run_dir).predict_proba(random_bundle().x_test),
                               atol=1e-5)
    # the same secret gives the same release: a second run of the same config reuses the record,
    # and the non-private ceiling reads the exact statistics
    plain = run(RunConfig(**kw, logit_adjust=True, feature_norm="exact"), tmp_path / "runs",
                data=random_bundle())
    head = load_trained(plain.run_dir).model
    assert torch.allclose(head.shift, exact_mean, atol=1e-6)


@pytest.mark.parametrize("extra", [
    dict(features="colour", backbone="colour_linear", aug_mult=2),
    dict(features="scatter", backbone="scatter_linear", image_size=16),
    dict(features="derm", backbone="derm_linear", colour_constancy="max-rgb"),
])
def test_technique_end_to_end(tmp_path, extra):
    kw = dict(BASE, lr=2.0, batch_size=64, epochs=2, cache_dir=str(tmp_path / "cache"))
    kw.update(extra)
    cfg = RunConfig(**kw, dp=True, target_epsilon=3.0, delta=1e-4, logit_adjust=True, ema_decay=0.9)
    res = run(cfg, tmp_path / "runs", data=random_bundle())
    assert res.meta["method"] == "proposed-sgd"
    assert res.epsilon <= 3.0
    hist = res.meta["prefix_history"]
    assert hist == [{"noise_multiplier": 20.0, "sample_rate": 1.0, "steps": 1}]
    assert len(res.meta["released_before_training"]["class_histogram"]) == 7
    steps = res.meta["steps"]
    q = res.meta["sample_rate"]
    expected = privacy.epsilon([(20.0, 1.0, 1), (res.noise_multiplier, q, steps)], 1e-4, "prv")
    assert res.epsilon == pytest.approx(expected, rel=1e-6)
    # the EMA weights are the released ones: the model reloaded from the run reproduces its
    # recorded predictions
    from dpskin_core.attacks import load_trained

    probs = pd.read_csv(res.run_dir / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, load_trained(res.run_dir).predict_proba(random_bundle().x_test),
                               atol=1e-5)


def test_a_colour_corrected_pixel_model_is_attacked_on_corrected_inputs(tmp_path):
    """A pixel network trained on colour-corrected images: the reloaded model corrects the
    images it encodes (its recorded predictions are reproduced), and the inversion attacks'
    differentiable ``normalise``, which cannot model the correction, refuses it by name."""
    from dpskin_core.attacks import load_trained

    cfg = RunConfig(**dict(BASE, epochs=1), backbone="smallcnn_fast",
                    colour_constancy="grey-world", cache_dir=str(tmp_path / "cache"))
    res = run(cfg, tmp_path / "runs", data=random_bundle())
    victim = load_trained(res.run_dir)
    probs = pd.read_csv(res.run_dir / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, victim.predict_proba(random_bundle().x_test), atol=1e-5)
    with pytest.raises(ConfigError, match="colour_constancy='grey-world'"):
        victim.normalise(torch.rand(2, 3, 16, 16))
    # the same network trained on uncorrected images takes differentiable inputs
    plain = load_trained(run(cfg.replace(colour_constancy="none"), tmp_path / "runs",
                             data=random_bundle()).run_dir)
    assert plain.normalise(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_a_given_prior_replaces_the_release_but_not_its_accounting():
    """build_criterion(prior_counts=...): the loss shifts by the given prior (a federation's
    summed histograms), the run's own noisy histogram is still recorded and counted."""
    from dpskin_core.training.trainer import build_criterion

    data = random_bundle()
    cfg = RunConfig(**BASE, dp=True, target_epsilon=8.0, logit_adjust=True, hist_noise=5.0)
    given = np.array([100.0, 50, 20, 10, 5, 2, 1])
    loss, prefix, released = build_criterion(cfg, data, torch.device("cpu"), 7, prior_counts=given)
    assert torch.allclose(loss.shift, torch.tensor(log_prior(given), dtype=torch.float32) * cfg.la_tau)
    assert prefix == ((5.0, 1.0, 1),) and len(released["class_histogram"]) == 7
    assert released["prior"]["counts"] == given.tolist()
    own, _, _ = build_criterion(cfg, data, torch.device("cpu"), 7)
    assert not torch.allclose(own.shift, loss.shift)
    with pytest.raises(ConfigError, match="logit_adjust is off"):
        build_criterion(cfg.replace(logit_adjust=False), data, torch.device("cpu"), 7, prior_counts=given)
    with pytest.raises(ConfigError, match="7 finite class counts"):
        build_criterion(cfg, data, torch.device("cpu"), 7, prior_counts=[1.0, float("nan")])


def test_a_kept_prior_shifts_the_released_predictor_and_nothing_else(tmp_path):
    """la_tau_kept: the same DP training (noise from the seed, so both runs draw the same
    histogram and steps) released with logits + la_tau_kept * log(noisy prior). The shift is
    recorded, the reloaded model applies it, and eps is unchanged (post-processing)."""
    from dpskin_core.attacks import load_trained

    data = random_bundle()
    cfg = RunConfig(**BASE, dp=True, target_epsilon=8.0, logit_adjust=True, la_tau=2.0,
                    dp_noise="seeded")
    plain = run(cfg, tmp_path / "runs", data=data)
    kept = run(cfg.replace(la_tau_kept=0.5), tmp_path / "runs", data=data)
    assert kept.run_dir != plain.run_dir and kept.epsilon == plain.epsilon
    released = kept.meta["released_before_training"]
    shift = np.asarray(released["prediction_logit_shift"]["shift"])
    assert "prediction_logit_shift" not in plain.meta["released_before_training"]
    assert np.ptp(shift) > 0.05  # a shift that is the same for every class would change nothing
    np.testing.assert_allclose(shift, 0.5 * log_prior(released["class_histogram"]), atol=1e-3)
    p0, p1 = (pd.read_csv(r.run_dir / "predictions.csv").filter(like="prob_").to_numpy()
              for r in (plain, kept))
    expected = p0 * np.exp(shift)
    np.testing.assert_allclose(p1, expected / expected.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(load_trained(kept.run_dir).predict_proba(data.x_test), p1, atol=1e-5)
    for bad, match in [(dict(la_tau_kept=0.5, dp=False, target_epsilon=None), "needs dp=True"),
                       (dict(la_tau_kept=0.5, logit_adjust=False), "and logit_adjust=True"),
                       (dict(la_tau_kept=float("nan")), "la_tau_kept"),
                       (dict(la_tau_kept=-0.5), "la_tau_kept")]:
        with pytest.raises(ConfigError, match=match):
            cfg.replace(**bad)


def test_prior_loss_is_the_logit_adjusted_loss_of_the_floored_prior():
    from dpskin_core.training.technique import log_prior, prior_loss

    counts = np.array([120.4, 0.0, -3.0, 15.0, 7.5, 2.0, 40.0])  # noisy: a zero and a negative
    loss = prior_loss(counts, 2.0)
    assert isinstance(loss, LogitAdjustedLoss) and loss.tau == 2.0
    assert torch.allclose(loss.shift, torch.tensor(2.0 * log_prior(counts), dtype=torch.float32))
    assert loss.shift[1] == loss.shift[2]  # both floored at one image
    logits, y = torch.zeros(4, 7), torch.tensor([0, 1, 3, 6])
    expect = torch.nn.functional.cross_entropy(logits + loss.shift, y)
    assert torch.allclose(loss(logits, y), expect)
