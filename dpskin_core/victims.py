"""Trained models as attack targets ("victims"): a finished run reloaded with its input
pipeline, and training on chosen data (targets, shadows, canary sets) through the project's
entry point :func:`dpskin_core.run`.

Shared by every attack module (:mod:`~dpskin_core.attacks`, :mod:`~dpskin_core.extraction`,
:mod:`~dpskin_core.reconstruct`, :mod:`~dpskin_core.audit`); every name is also importable
from :mod:`dpskin_core.attacks`::

    from dpskin_core.victims import load_trained, train_on, with_train
    victim = load_trained("runs/smoke/0123456789abcdef")
    victim.predict_proba(x_uint8)          # the black-box API of a deployed model
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp
from torch import nn

from . import results
from .config import RunConfig
from .constants import CLASSES
from .data import DataBundle
from .errors import ConfigError

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------
# validation helpers (shared by the attack modules): bad input raises ConfigError naming it
# --------------------------------------------------------------------------------------
def _array(name: str, a: Any, ndim: int, dtype: Any = None, nonempty: bool = True) -> np.ndarray:
    arr = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if arr.ndim != ndim:
        raise ConfigError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if nonempty and arr.shape[0] == 0:
        raise ConfigError(f"{name} is empty")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError("mismatched lengths: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))


# --------------------------------------------------------------------------------------
# a trained model and its input pipeline
# --------------------------------------------------------------------------------------
#: the 8 symmetries of the square as (transpose, flip rows, flip columns), identity first
DIHEDRAL = [(False, False, False), (False, False, True), (False, True, False), (True, False, False),
            (False, True, True), (True, False, True), (True, True, False), (True, True, True)]


def dihedral_view(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-th dihedral view (0 = identity) of uint8 images (N, S, S, 3)."""
    t, fr, fc = DIHEDRAL[k]
    x = x.transpose(0, 2, 1, 3) if t else x
    x = x[:, ::-1] if fr else x
    return np.ascontiguousarray(x[:, :, ::-1] if fc else x)


@dataclass
class TrainedModel:
    """A model with the input pipeline of its run, queried on uint8 images (N, S, S, 3).

    The pipeline mirrors :class:`dpskin_core.augment.Inputs` at evaluation time: pixels are
    normalised with the run's fixed public constants, or replaced by the run's
    data-independent front end (colour histograms, scattering coefficients).
    """

    model: nn.Module
    config: RunConfig
    meta: Dict[str, Any] = field(default_factory=dict)
    run_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        self.model.eval()
        self.device = next(self.model.parameters()).device

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (N, 3, S, S) -> model inputs; differentiable (pixels only)."""
        if self.config.features != "pixels":
            raise ConfigError(f"features={self.config.features!r}: only pixel models take "
                              "differentiable image inputs (needed by inversion attacks)")
        from .augment import normaliser

        mean, std = normaliser(self.config.normalisation, x01.device)
        return (x01 - mean) / std

    def encode(self, x: np.ndarray) -> torch.Tensor:
        """uint8 images (N, S, S, 3) -> model inputs (as ``Inputs.eval`` builds them)."""
        x = _array("x", x, 4, nonempty=False)
        if x.dtype != np.uint8 or x.shape[-1] != 3:
            raise ConfigError(f"x must be uint8 images (N, S, S, 3), got {x.dtype} {x.shape}")
        if self.config.features == "colour":
            from .technique import colour_features

            return torch.from_numpy(colour_features(x)).to(self.device)
        if self.config.features == "scatter":
            from .imagecache import cache_root
            from .technique import scatter_features

            return torch.from_numpy(scatter_features(x, cache_root(self.config.cache_dir),
                                                     progress=False)).to(self.device)
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(self.device)
        return self.normalise(t.float() / 255.0)

    @torch.no_grad()
    def logits(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        """Raw outputs (N, C) as float64."""
        out = [self.model(self.encode(x[i:i + batch])).double().cpu() for i in range(0, len(x), batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)))

    def view_logits(self, x: np.ndarray, views: int = 1) -> np.ndarray:
        """Outputs on the first ``views`` dihedral views of each image: (N, V, C)."""
        if not 1 <= views <= len(DIHEDRAL):
            raise ConfigError(f"views must be in 1..{len(DIHEDRAL)}, got {views!r}")
        return np.stack([self.logits(dihedral_view(x, k)) for k in range(views)], axis=1)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C): the black-box API of a deployed model."""
        z = self.logits(x)
        return np.exp(z - logsumexp(z, axis=1, keepdims=True))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels (N,): the label-only black-box API."""
        return self.logits(x).argmax(1)


def load_trained(run_dir: PathLike, checkpoint: str = "released",
                 device: str = "cpu") -> TrainedModel:
    """Reload the model of a finished run folder (see :mod:`dpskin_core.results`).

    ``checkpoint``: ``"released"`` (default) is the model the run evaluated and reported,
    as :func:`dpskin_core.train.run` chose it: ``best.pt`` under early stopping, else the EMA
    weights when the run kept an EMA, else the last iterate; ``"last"`` / ``"best"`` force one.
    """
    from . import technique  # noqa: F401  (registers the feature heads in BACKBONES)
    from .models import build_backbone

    d = Path(run_dir)
    for f in ("config.json", "meta.json"):
        if not (d / f).is_file():
            raise ConfigError(f"run_dir {d}: no {f} (not a run folder)")
    if checkpoint not in ("released", "last", "best"):
        raise ConfigError(f"checkpoint={checkpoint!r}; expected released, last or best")
    cfg = RunConfig.from_dict(results.read_json(d / "config.json"))
    meta = results.read_json(d / "meta.json")
    ck = d / "checkpoints"
    use_best = checkpoint == "best" or (checkpoint == "released" and cfg.early_stopping_patience
                                        is not None and (ck / "best.pt").is_file())
    path = ck / ("best.pt" if use_best else "last.pt")
    if not path.is_file():
        raise ConfigError(f"run_dir {d}: checkpoint {path.name} not found")
    state = results.load_checkpoint(path)
    weights = state["model"]
    if not use_best and checkpoint == "released" and state.get("ema") is not None:
        weights = state["ema"]
    model = build_backbone(cfg.backbone, num_classes=len(CLASSES))
    model.load_state_dict(weights)
    return TrainedModel(model.to(device), cfg, meta, d)


# --------------------------------------------------------------------------------------
# training on chosen data, through the project's entry point
# --------------------------------------------------------------------------------------
def with_train(data: DataBundle, x_train: np.ndarray, y_train: np.ndarray,
               tag: str = "attack") -> DataBundle:
    """``data`` with its training split replaced by ``(x_train, y_train)``; val/test kept.

    Image ids of the new training rows are ``<tag>_<i>`` (they appear only in the record).
    """
    x_train = _array("x_train", x_train, 4)
    y_train = _array("y_train", y_train, 1).astype(np.int64)
    _same_length(x_train=x_train, y_train=y_train)
    held = data.meta[data.meta["split"] != "train"]
    train_meta = pd.DataFrame({"image": [f"{tag}_{i}" for i in range(len(y_train))], "label": y_train,
                               "lesion_id": [f"{tag}_{i}" for i in range(len(y_train))],
                               "split": "train"})
    meta = pd.concat([train_meta, held], ignore_index=True)
    return DataBundle(x_train, y_train, data.x_val, data.y_val, data.x_test, data.y_test, meta,
                      data.classes, {**data.info, "train_override": tag})


def subsample_train(data: DataBundle, n: Optional[int], seed: int = 0,
                    tag: str = "subset") -> DataBundle:
    """``data`` with its training split cut to a seeded random ``n`` of its images (``None``
    or ``n`` >= the split: unchanged); val/test kept. For attack runs sized like the
    membership targets (trained on half a pool) without training on the whole split."""
    if n is None or n >= len(data.y_train):
        return data
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive int or None, got {n!r}")
    idx = np.sort(np.random.default_rng([seed, 17]).permutation(len(data.y_train))[:n])
    return with_train(data, data.x_train[idx], data.y_train[idx], tag)


def data_digest(data: DataBundle) -> str:
    """12 hex digits of sha256 over every array of ``data`` (pixels and labels)."""
    h = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def train_on(cfg: RunConfig, data: DataBundle, runs_root: PathLike):
    """Train ``cfg`` on ``data`` with :func:`dpskin_core.run`; returns ``(RunResult, TrainedModel)``.

    A run folder is keyed by the config only, so runs of one config on different data
    (target, shadows, canary sets) are kept apart under ``<runs_root>/data-<digest>/``; the
    same config on the same data is reused, as any run is.
    """
    from . import run

    res = run(cfg, Path(runs_root) / f"data-{data_digest(data)}", data=data)
    return res, load_trained(res.run_dir)


__all__ = ["DIHEDRAL", "TrainedModel", "data_digest", "dihedral_view", "load_trained",
           "subsample_train", "train_on", "with_train"]
