"""Tests of dpskin_core.metrics: hand-computed cases and cross-checks against sklearn and
the official ISIC challenge scorer (isic-challenge-scoring)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics as skm

from dpskin_core.constants import CLASSES
from dpskin_core.training.metrics import (
    accuracy, balanced_accuracy, binary_auc, confusion_matrix, evaluate,
    expected_calibration_error, macro_auc_ovr, per_class_auc,
    per_class_precision, per_class_recall,
)


def _random_predictions(n: int = 200, seed: int = 0, num_classes: int = 7):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    probs = rng.dirichlet(np.ones(num_classes), n)
    # make the scores informative (a better-than-chance classifier), so the AUCs are not ~0.5
    probs[np.arange(n), y] += rng.uniform(0, 0.5, n)
    return y, probs / probs.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- hand-computed examples
def test_label_metrics_hand_computed():
    # 3 classes: class 0 has 2 samples (1 right), class 1 has 3 (3 right), class 2 has 1 (0 right)
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 1, 1])
    cm = confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 3, 0], [0, 1, 0]])
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    np.testing.assert_allclose(per_class_recall(y_true, y_pred, 3), [0.5, 1.0, 0.0])
    prec = per_class_precision(y_true, y_pred, 3)
    np.testing.assert_allclose(prec[:2], [1.0, 3 / 5])
    assert math.isnan(prec[2])  # class 2 never predicted: precision undefined
    assert balanced_accuracy(y_true, y_pred, 3) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_balanced_accuracy_ignores_absent_classes():
    # 7 classes but only 0 and 1 in y_true: the mean is over those two (ISIC definition)
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 5, 1, 1])
    rec = per_class_recall(y_true, y_pred)
    assert np.isnan(rec[2:]).all()
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((0.5 + 1.0) / 2)


def test_auc_hand_computed_with_ties():
    # positives score 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4)(0.8>0.1)(0.4=0.4)(0.4>0.1)
    assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(3.5 / 4)
    assert math.isnan(binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_macro_auc_skips_undefined_classes():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.45, 0.55, 0.0]])
    aucs = per_class_auc(y, probs)
    assert aucs[0] == pytest.approx(1.0) and aucs[1] == pytest.approx(1.0)
    assert math.isnan(aucs[2])  # class 2 has no positives
    assert macro_auc_ovr(y, probs) == pytest.approx(1.0)


def test_ece_hand_computed():
    # two bins used (n_bins=10): conf 0.95 (correct), 0.95 (wrong) -> |0.5-0.95| * 2/4;
    # conf 0.55 (correct) x2 -> |1-0.55| * 2/4
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    expected = 0.5 * 0.45 + 0.5 * 0.45
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(expected)


def test_ece_calibrated_small_overconfident_large():
    rng = np.random.default_rng(1)
    n, c = 20000, 7
    # perfectly calibrated by construction: labels are drawn from the predicted distribution
    probs = rng.dirichlet(np.ones(c) * 0.5, n)
    y = np.minimum((rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1), c - 1)
    ece_cal = expected_calibration_error(y, probs)
    assert ece_cal < 0.02
    # overconfident: the same labels, probabilities sharpened towards the argmax
    sharp = probs ** 4
    sharp /= sharp.sum(axis=1, keepdims=True)
    ece_over = expected_calibration_error(y, sharp)
    assert ece_over > 0.1
    assert ece_over > 5 * ece_cal


# ---------------------------------------------------------------- cross-checks
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_matches_sklearn(seed):
    y, probs = _random_predictions(seed=seed)
    y_pred = probs.argmax(axis=1)
    assert balanced_accuracy(y, y_pred) == pytest.approx(
        skm.balanced_accuracy_score(y, y_pred), abs=1e-12)
    assert accuracy(y, y_pred) == pytest.approx(skm.accuracy_score(y, y_pred), abs=1e-12)
    np.testing.assert_array_equal(confusion_matrix(y, y_pred),
                                  skm.confusion_matrix(y, y_pred, labels=range(7)))
    assert macro_auc_ovr(y, probs) == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)


def _isic_frames(y: np.ndarray, probs: np.ndarray):
    """Ground truth, predictions and weights in the layout the ISIC scorer parses from CSV."""
    images = [f"ISIC_{i:07d}" for i in range(len(y))]
    truth = pd.DataFrame(np.eye(len(CLASSES))[y], index=images, columns=list(CLASSES))
    pred = pd.DataFrame(probs, index=images, columns=list(CLASSES))
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=images)
    for df in (truth, pred, weights):
        df.index.name = "image"
    return truth, pred, weights


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside the scorer, pandas 3.1
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_isic_scorer(seed):
    isic = pytest.importorskip("isic_challenge_scoring")
    y, probs = _random_predictions(n=200, seed=seed)
    truth, pred, weights = _isic_frames(y, probs)
    # ClassificationScore.from_stream uses DataFrame.applymap (removed in pandas 3), so the
    # parsed frames are passed to the constructor that from_stream calls
    score = isic.ClassificationScore(truth, pred, weights, isic.ClassificationMetric.BALANCED_ACCURACY)
    ours = evaluate(y, probs)
    assert ours["balanced_accuracy"] == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-9)
    assert score.overall == pytest.approx(ours["balanced_accuracy"], abs=1e-9)
    np.testing.assert_allclose(per_class_auc(y, probs),
                               score.per_category.loc[list(CLASSES), "auc"].to_numpy(), atol=1e-9)
    assert ours["auc_macro"] == pytest.approx(score.macro_average["auc"], abs=1e-9)
    assert 0.3 < ours["balanced_accuracy"] < 1.0  # the informative scores did their job


def test_absent_class_matches_official_isic_definition():
    isic_metrics = pytest.importorskip("isic_challenge_scoring.metrics")
    y, probs = _random_predictions(n=200, seed=3)
    keep = y != CLASSES.index("DF")  # a split without any DF image
    y, probs = y[keep], probs[keep]
    truth, pred, weights = _isic_frames(y, probs)
    official = isic_metrics.balanced_multiclass_accuracy(truth, pred, weights["score_weight"])
    assert balanced_accuracy(y, probs.argmax(axis=1)) == pytest.approx(official, abs=1e-9)


# ---------------------------------------------------------------- evaluate / table / errors
def test_evaluate_keys_and_table():
    y, probs = _random_predictions()
    m = evaluate(y, probs)
    expected = {"balanced_accuracy", "accuracy", "auc_macro", "ece", "nll", "predicted_classes"}
    expected |= {f"recall_{c}" for c in CLASSES} | {f"precision_{c}" for c in CLASSES}
    assert set(m) == expected
    assert all(isinstance(v, float) for v in m.values())
    assert m["balanced_accuracy"] == pytest.approx(np.mean([m[f"recall_{c}"] for c in CLASSES]))
    assert m["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])))
    assert m["predicted_classes"] == len(np.unique(probs.argmax(axis=1)))
    assert evaluate(y, np.eye(7)[np.zeros(len(y), dtype=int)])["predicted_classes"] == 1.0


def test_perfect_predictions():
    y = np.arange(7).repeat(3)
    m = evaluate(y, np.eye(7)[y])
    assert m["balanced_accuracy"] == m["accuracy"] == m["auc_macro"] == 1.0
    assert m["ece"] == 0.0


@pytest.mark.parametrize("y_true, probs, match", [
    (np.zeros((3, 1), int), np.full((3, 7), 1 / 7), "y_true"),       # 2-D labels
    (np.zeros(3, int), np.full(7, 1 / 7), "probs"),                    # 1-D probs
    (np.zeros(4, int), np.full((3, 7), 1 / 7), "rows"),                # length mismatch
    (np.zeros(3, int), np.full((3, 5), 1 / 5), "columns"),             # wrong number of classes
    (np.array([0, 1, 7]), np.full((3, 7), 1 / 7), "y_true"),           # label out of range
    (np.zeros(3, int), np.full((3, 7), 3.0), "softmax"),               # logits, not probs
    (np.array([0.5, 1, 2]), np.full((3, 7), 1 / 7), "y_true"),         # non-integer labels
])
def test_shape_errors_name_the_argument(y_true, probs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(y_true, probs)


def test_label_length_mismatch():
    with pytest.raises(ValueError, match="y_pred"):
        balanced_accuracy(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(np.zeros(2, int), np.full((2, 7), 1 / 7), n_bins=0)
