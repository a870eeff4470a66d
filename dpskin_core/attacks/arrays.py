"""Validation of the arrays the attacks take: bad input raises ConfigError naming it."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError


def as_array(name: str, a: Any, ndim: int, dtype: Any = None, nonempty: bool = True) -> np.ndarray:
    """``a`` as an ``ndim``-D array (of ``dtype``), non-empty unless ``nonempty=False``."""
    arr = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if arr.ndim != ndim:
        raise ConfigError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if nonempty and arr.shape[0] == 0:
        raise ConfigError(f"{name} is empty")
    return arr


def same_length(**arrays: np.ndarray) -> None:
    """ConfigError naming each array's length unless all are equal."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError("mismatched lengths: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
