"""Classification metrics of ISIC 2018 Task 3, as pure functions of numpy arrays.

Conventions: ``y_true``/``y_pred`` are 1-D integer labels in ``[0, C)``; ``probs`` is an
``(N, C)`` array of class probabilities (columns in the order of :data:`CLASSES`). A
prediction is ``argmax(probs)`` (ties go to the lowest class index; the official scorer
calls a tie "undecided" and counts it wrong, which never happens with continuous scores).

Balanced accuracy follows the official ISIC 2018 definition (and
``sklearn.metrics.balanced_accuracy_score``): the mean recall over the classes PRESENT in
``y_true``. A class absent from the evaluated split has no defined recall and is left
out rather than counted as 0 or 1, so a small split without DF images is not penalised
or rewarded for it. Undefined per-class values are NaN, never silently 0.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..constants import CLASSES, NUM_CLASSES


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _labels(y: object, name: str, num_classes: Optional[int] = None) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D labels, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer floats")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class labels, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if num_classes is not None and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} has labels outside [0, {num_classes}): "
                         f"min {a.min()}, max {a.max()}")
    return a


def _probs(p: object, name: str = "probs", num_classes: Optional[int] = None) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an (N, C) array, got shape {a.shape}")
    if num_classes is not None and a.shape[1] != num_classes:
        raise ValueError(f"{name} has {a.shape[1]} columns, expected {num_classes} classes")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    # small tolerance: float32 softmax outputs can overshoot 1 by an ulp
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise ValueError(f"{name} must be probabilities in [0, 1] (apply softmax to logits); "
                         f"got range [{a.min():.4g}, {a.max():.4g}]")
    return a


def _scored(y_true: object, probs: object, num_classes: Optional[int] = None) -> tuple:
    """Validated ``(y_true, probs)``: labels in ``[0, C)`` and one row of probs per label."""
    p = _probs(probs, num_classes=num_classes)
    t = _labels(y_true, "y_true", p.shape[1])
    if p.shape[0] != t.size:
        raise ValueError(f"probs has {p.shape[0]} rows but y_true has {t.size} labels")
    return t, p


def _pair(y_true: object, y_pred: object, num_classes: int) -> tuple:
    t = _labels(y_true, "y_true", num_classes)
    p = _labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    return t, p


# --------------------------------------------------------------------------------------
# label metrics
# --------------------------------------------------------------------------------------
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(C, C)`` int64 counts; row = true class, column = predicted class."""
    t, p = _pair(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions."""
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    return float(np.mean(t == p))


def _diagonal_share(cm: np.ndarray, axis: int) -> np.ndarray:
    """diag(cm) / cm summed over ``axis``; NaN where that sum is 0."""
    total = cm.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.diag(cm) / total, np.nan)


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Recall (sensitivity) of each class; NaN for classes absent from ``y_true``."""
    return _diagonal_share(confusion_matrix(y_true, y_pred, num_classes), axis=1)


def per_class_precision(y_true: np.ndarray, y_pred: np.ndarray,
                        num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Precision (PPV) of each class; NaN for classes never predicted."""
    return _diagonal_share(confusion_matrix(y_true, y_pred, num_classes), axis=0)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray,
                      num_classes: int = NUM_CLASSES) -> float:
    """Mean recall over the classes present in ``y_true`` (official ISIC 2018 metric)."""
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


# --------------------------------------------------------------------------------------
# score metrics
# --------------------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank (as scipy's rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def binary_auc(y_binary: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count 1/2); NaN if one class is empty."""
    pos = np.asarray(y_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of each class (column of ``probs``); NaN where undefined."""
    t, p = _scored(y_true, probs)
    return np.array([binary_auc(t == c, p[:, c]) for c in range(p.shape[1])])


def macro_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUC over classes with both positives and negatives (NaN if none)."""
    aucs = per_class_auc(y_true, probs)
    return float(np.nanmean(aucs)) if np.any(np.isfinite(aucs)) else float("nan")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al., 2017) with equal-width bins.

    The confidence of a sample is its largest probability; bin ``b`` holds confidences in
    ``((b-1)/n_bins, b/n_bins]`` (0 goes to the first bin). ECE = sum over bins of
    ``|bin| / N * |accuracy(bin) - mean confidence(bin)|``, in [0, 1].
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    t, p = _scored(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct - conf, minlength=n_bins)  # sum of (acc - conf)
    return float(np.abs(gap).sum() / t.size)


def log_loss(y_true: np.ndarray, probs: np.ndarray, floor: float = 1e-12) -> float:
    """Mean negative log-likelihood (nats) of the true class, probabilities floored at ``floor``."""
    t, p = _scored(y_true, probs)
    return float(-np.mean(np.log(np.maximum(p[np.arange(t.size), t], floor))))


# --------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------
def evaluate(y_true: np.ndarray, probs: np.ndarray,
             classes: Sequence[str] = CLASSES) -> Dict[str, float]:
    """All scalar metrics of a split: ``balanced_accuracy``, ``accuracy``, ``auc_macro``,
    ``ece``, ``nll`` (mean cross-entropy, nats), ``predicted_classes`` (how many classes the
    model predicts at all: 1 is a collapse to a constant predictor) and ``recall_<CLASS>``,
    ``precision_<CLASS>`` for every class (NaN if undefined).
    """
    classes = tuple(classes)
    t, p = _scored(y_true, probs, len(classes))
    y_pred = p.argmax(axis=1)
    out: Dict[str, float] = {
        "balanced_accuracy": balanced_accuracy(t, y_pred, len(classes)),
        "accuracy": accuracy(t, y_pred),
        "auc_macro": macro_auc_ovr(t, p),
        "ece": expected_calibration_error(t, p),
        "nll": log_loss(t, p),
        "predicted_classes": float(len(np.unique(y_pred))),
    }
    rec = per_class_recall(t, y_pred, len(classes))
    prec = per_class_precision(t, y_pred, len(classes))
    out.update({f"recall_{c}": float(r) for c, r in zip(classes, rec)})
    out.update({f"precision_{c}": float(v) for c, v in zip(classes, prec)})
    return out


__all__ = ["accuracy", "balanced_accuracy", "binary_auc", "confusion_matrix", "evaluate",
           "expected_calibration_error", "log_loss", "macro_auc_ovr", "per_class_auc",
           "per_class_precision", "per_class_recall"]
