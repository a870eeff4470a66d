"""Per-example signals of a model's outputs that attacks score: the logit-scaled confidence of
the true class and the cross-entropy loss (pure functions of logits)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.special import logsumexp

from ..errors import ConfigError


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence of the true class, ``log(p_y / (1 - p_y))`` (Carlini et al. 2022).

    Computed stably as ``z_y - logsumexp_{j != y} z_j``. ``logits`` (N, ..., C), labels (N,).
    """
    z, y = _logits_labels(logits, labels)
    zy = np.take_along_axis(z, y, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(y, z.shape[:-1] + (1,)).copy(), -np.inf, axis=-1)
    return zy - logsumexp(others, axis=-1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy loss (nats) of the true class: (N, ...)."""
    z, y = _logits_labels(logits, labels)
    return logsumexp(z, axis=-1) - np.take_along_axis(z, y, axis=-1)[..., 0]


def _logits_labels(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, ..., C) float64 logits and labels shaped (N, 1, ..., 1) to index their last axis."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim < 2 or y.ndim != 1 or len(y) != len(z):
        raise ConfigError(f"logits {z.shape} and labels {y.shape}: need (N, ..., C) and (N,)")
    return z, np.broadcast_to(y.reshape((-1,) + (1,) * (z.ndim - 1)), z.shape[:-1] + (1,))
