"""Class weights under per-example clipping (dpskin_core.book.imbalance)."""
import numpy as np
import pytest
import torch
from torch import nn

from dpskin_core.book.imbalance import (clipping_table, effective_class_weights,
                                        per_example_grad_norms, published_balanced_weights)
from dpskin_core.constants import CLASSES, HAM10000_COUNTS
from dpskin_core.errors import ConfigError


def test_published_weights_are_inverse_frequencies_of_the_published_counts():
    w = published_balanced_weights()
    n = np.array([HAM10000_COUNTS[c] for c in CLASSES])
    assert w.shape == (len(CLASSES),)
    # balanced: every class carries the same total weight, and the mean weight per image is 1
    assert np.allclose(w * n, n.sum() / len(CLASSES))
    assert (w * n).sum() == pytest.approx(n.sum())


def test_clipping_undoes_weights_of_long_gradients_and_keeps_those_of_short_ones():
    w = [4.0, 0.25, 1, 1, 1, 1, 1]
    y = np.array([0, 0, 1, 1, 2])
    # class 0: long gradients (clipped with or without its weight 4): undone
    # class 1: gradients of norm 2 weighted 0.25 -> 0.5 < C = 1: the down-weighting survives
    #          partly (clipped unweighted to 1 each, weighted 0.5 each): effective 0.5
    # class 2: one gradient below C, weight 1: 1
    norms = np.array([5.0, 3.0, 2.0, 2.0, 0.5])
    t = effective_class_weights(norms, y, w, max_grad_norm=1.0).set_index("class")
    assert list(t.index) == ["MEL", "NV", "BCC"]        # classes without examples left out
    assert t.loc["MEL", "effective weight"] == pytest.approx(1.0)
    assert t.loc["NV", "effective weight"] == pytest.approx(0.5)
    assert t.loc["BCC", "effective weight"] == pytest.approx(1.0)
    assert t.loc["MEL", "clipped (unweighted)"] == 1.0 and t.loc["NV", "clipped (weighted)"] == 0.0
    # without clipping (C above every weighted norm) the effective weight is the nominal one
    free = effective_class_weights(norms, y, w, max_grad_norm=1e6).set_index("class")
    assert np.allclose(free["effective weight"], free["nominal weight"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[1.0] * 6), "7 finite positive"),
    (dict(weights=[1.0] * 6 + [float("nan")]), "7 finite positive"),
    (dict(weights=[1.0] * 6 + [0.0]), "7 finite positive"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm"),
])
def test_bad_weights_or_bound_are_named(kwargs, match):
    args = dict(norms=np.ones(3), y=np.zeros(3, int), weights=[1.0] * 7, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=match):
        effective_class_weights(**{**args, **kwargs})


def test_per_example_norms_match_one_backward_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, len(CLASSES)))
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 6])
    got = per_example_grad_norms(model, x, y, batch=2)
    for i in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert got[i] == pytest.approx(float(ref), rel=1e-5)
    t = clipping_table({"m": model}, x, y.numpy(), max_grad_norm=1e-3)
    assert set(t["model"]) == {"m"} and np.allclose(t["effective weight"], 1.0)


def test_balanced_weights_give_every_class_the_same_total_weight():
    """One formula serves the non-private runs' loss and the chapter's public weights: each
    class's count times its weight is N / K; an empty class is floored, not divided by."""
    from dpskin_core.training.technique import balanced_weights

    counts = np.array([10.0, 30.0, 60.0])
    np.testing.assert_allclose(balanced_weights(counts) * counts, [100 / 3] * 3)
    w = balanced_weights(np.array([0.0, 50.0, 50.0]))
    assert np.all(np.isfinite(w)) and w[0] == 100 / 3 and w[1] == w[2] == 100 / 150
    from dpskin_core.book.imbalance import published_balanced_weights

    ham = np.array([HAM10000_COUNTS[c] for c in CLASSES], dtype=float)
    np.testing.assert_allclose(published_balanced_weights(), balanced_weights(ham))
    np.testing.assert_allclose(published_balanced_weights() * ham, [ham.sum() / 7] * 7)


def test_sqrt_resampling_gives_every_class_the_same_expected_loss_weight():
    """Drawn in proportion to sqrt(n_c) and weighted by n_c^-1/2, each class carries the same
    expected share of the loss, as with the balanced weights, at sqrt of their spread."""
    from dpskin_core.training.technique import (balanced_weights, class_loss_weights,
                                                class_sampling_weights)

    labels = np.repeat(np.arange(3), [400, 100, 25])
    p = class_sampling_weights(labels, 3)
    assert p.dtype == np.float64 and np.isclose(p.sum(), 1.0)
    share = np.bincount(labels, weights=p, minlength=3)  # each class's chance of a draw
    np.testing.assert_allclose(share / share.sum(), np.sqrt([400, 100, 25]) / np.sqrt(
        [400, 100, 25]).sum())
    counts = np.bincount(labels).astype(float)
    w = class_loss_weights(counts, "sqrt-resampled")
    np.testing.assert_allclose(share * w / (share * w).sum(), [1 / 3] * 3)
    np.testing.assert_allclose(class_loss_weights(counts, "balanced"), balanced_weights(counts))
    np.testing.assert_allclose(w, np.sqrt(balanced_weights(counts)))
    with pytest.raises(ConfigError, match="class_weights='none'"):
        class_loss_weights(counts, "none")
