"""Trained models as attack targets ("victims"): a finished run reloaded with its input
pipeline, and training on chosen data (targets, shadows, canary sets) through the project's
entry point :func:`dpskin_core.training.run`.

Shared by every attack module (membership, extraction, reconstruction, audit)::

    from dpskin_core.attacks.victims import load_trained, train_on, with_train
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

from ..constants import CLASSES
from ..data import DataBundle
from ..errors import ConfigError
from ..files import read_json
from ..training import RunConfig, run
from ..training.augment import normaliser
from ..training.trainer import build_network
from ..training.checkpoint import released_weights
from ..training.frontends import FRONT_ENDS
from ..training.records import prediction_shift
from .arrays import as_array, same_length

PathLike = Union[str, Path]


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

    The pipeline is the run's front end (:data:`dpskin_core.training.frontends.FRONT_ENDS`) at
    evaluation time: pixels normalised with the run's fixed public constants, or the run's
    data-independent features (colour histograms, scattering coefficients).
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
        if self.config.colour_constancy != "none":
            raise ConfigError(f"colour_constancy={self.config.colour_constancy!r}: the model sees "
                              "colour-corrected images, which inversion attacks do not model")
        mean, std = normaliser(self.config.normalisation, x01.device)
        return (x01 - mean) / std

    def encode(self, x: np.ndarray) -> torch.Tensor:
        """uint8 images (N, S, S, 3) -> model inputs, by the run's front end (as its
        evaluation built them)."""
        x = as_array("x", x, 4, nonempty=False)
        if x.dtype != np.uint8 or x.shape[-1] != 3:
            raise ConfigError(f"x must be uint8 images (N, S, S, 3), got {x.dtype} {x.shape}")
        front = FRONT_ENDS.get(self.config.features)
        rows = front.rows(x, self.config.replace(progress=False)).to(self.device)
        return front.eval_inputs(rows, normaliser(self.config.normalisation, self.device))

    @torch.no_grad()
    def logits(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        """Outputs (N, C) of the released predictor as float64: the network's, plus the run's
        prediction shift when it kept part of its class prior (``la_tau_kept``)."""
        out = [self.model(self.encode(x[i:i + batch])).double().cpu() for i in range(0, len(x), batch)]
        z = torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)))
        shift = prediction_shift(self.meta)
        return z if shift is None else z + shift

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
    """Reload the model of a finished run folder (see :mod:`dpskin_core.training.records`).

    ``checkpoint``: ``"released"`` (default) is the model the run evaluated and reported, by
    the run's own rule (:func:`dpskin_core.training.checkpoint.released_weights`: ``best.pt``
    under early stopping, else the EMA weights when the run kept an EMA, else the last
    iterate); ``"last"`` / ``"best"`` force one.
    """
    d = Path(run_dir)
    for f in ("config.json", "meta.json"):
        if not (d / f).is_file():
            raise ConfigError(f"run_dir {d}: no {f} (not a run folder)")
    cfg = RunConfig.from_dict(read_json(d / "config.json"))
    meta = read_json(d / "meta.json")
    try:
        weights, _, _ = released_weights(d / "checkpoints", cfg.early_stopping_patience is not None,
                                         checkpoint)
    except ConfigError as e:
        raise ConfigError(f"run_dir {d}: {e}") from None
    model = build_network(cfg)
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
    x_train = as_array("x_train", x_train, 4)
    y_train = as_array("y_train", y_train, 1).astype(np.int64)
    same_length(x_train=x_train, y_train=y_train)
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
    """Train ``cfg`` on ``data`` with :func:`dpskin_core.training.run`; returns ``(RunResult, TrainedModel)``.

    A run folder is keyed by the config only, so runs of one config on different data
    (target, shadows, canary sets) are kept apart under ``<runs_root>/data-<digest>/``; the
    same config on the same data is reused, as any run is.
    """
    res = run(cfg, Path(runs_root) / f"data-{data_digest(data)}", data=data)
    return res, load_trained(res.run_dir)


__all__ = ["DIHEDRAL", "TrainedModel", "data_digest", "dihedral_view", "load_trained",
           "subsample_train", "train_on", "with_train"]
