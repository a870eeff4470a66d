"""Run configuration: one frozen dataclass that rejects unknown keys.

A config states the *target* privacy budget (``target_epsilon``, ``delta``); the noise
multiplier is derived from it at run time (:func:`dpskin_core.privacy.noise_multiplier_for`)
and recorded with the run, never typed in by hand.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .errors import ConfigError

#: Fields that do not change what a run computes; they are left out of the run hash.
NON_SEMANTIC_FIELDS = frozenset({"name", "device", "num_threads", "progress", "cache_dir"})

OPTIMIZER_NAMES = ("sgd", "adam")
ACCOUNTANT_NAMES = ("prv", "rdp")
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")
EVAL_SPLITS = ("val", "test")
#: front end -> heads that take it (None: any image backbone); see technique.py
FEATURE_HEADS = {"pixels": None, "scatter": ("scatter_linear", "scatter_cnn"),
                 "colour": ("colour_linear",)}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. See the field comments for units."""

    name: str = "run"                       # human label; not part of the hash
    seed: int = 0
    # --- data -------------------------------------------------------------------------
    dataset: str = "synthetic"              # registry name: synthetic | isic2018 | dermamnist
    data_root: Optional[str] = None         # folder in the official layout (None: dataset default)
    image_size: int = 32                    # px, side after centre crop + resize
    split: str = "lesion"                   # lesion (seeded, grouped by lesion_id) | official
    val_frac: float = 0.15
    test_frac: float = 0.15
    split_seed: int = 0                     # the split is shared across training seeds
    synth_n: int = 1200                     # images in the synthetic dataset
    normalisation: str = "imagenet"         # fixed public constants, see constants.NORMALISATIONS
    augment_flips: bool = True              # random horizontal + vertical flips
    augment_rot90: bool = True              # random multiples of 90 degrees (lesions have no "up")
    augment_color: float = 0.0              # colour jitter strength (0 = off; 0.1 = +-10 %)
    # --- model ------------------------------------------------------------------------
    backbone: str = "smallcnn"
    pretrained_path: Optional[str] = None   # local state_dict only; nothing is downloaded
    # --- optimisation -----------------------------------------------------------------
    optimizer: str = "sgd"                  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9                   # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"           # constant | cosine (annealed per step to 0)
    epochs: int = 10
    batch_size: int = 128                   # expected (logical) batch size; Poisson under DP
    max_physical_batch_size: Optional[int] = None  # split logical batches to bound memory
    class_weights: str = "none"             # none | balanced (non-private only: uses counts)
    early_stopping_patience: Optional[int] = None  # epochs without val improvement
    eval_split: str = "test"                # split whose predictions are the run's result
    # --- the proposed technique (dpskin_core.technique); all off by default ------------
    features: str = "pixels"                # pixels | colour | scatter (data-independent front ends)
    logit_adjust: bool = False              # logit-adjusted loss with a (noisy under dp) class prior
    la_tau: float = 1.0                     # logit-adjustment strength tau
    hist_noise: float = 20.0                # std (in images) of the Gaussian noise on the histogram
    ema_decay: Optional[float] = None       # EMA of weights, e.g. 0.99 (per optimizer step)
    aug_mult: int = 1                       # augmentation multiplicity K (views averaged pre-clip)
    # --- privacy ----------------------------------------------------------------------
    dp: bool = False                        # DP-SGD / DP-Adam through Opacus when True
    target_epsilon: Optional[float] = None  # required when dp
    delta: Optional[float] = 1e-5           # must be < 1/N_train
    max_grad_norm: float = 1.0              # per-sample clipping bound C (L2)
    accountant: str = "prv"                 # prv | rdp (Opacus accountants)
    # --- execution (not hashed) -------------------------------------------------------
    device: str = "auto"                    # auto | cpu | cuda
    num_threads: Optional[int] = None       # torch CPU threads (None: torch default)
    progress: bool = True                   # tqdm bars
    cache_dir: Optional[str] = None         # decoded-image cache (None: DPSKIN_CACHE or ~/.cache)

    def __post_init__(self) -> None:
        validate(self)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "RunConfig":
        """Load a JSON or YAML config file."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text()
        if p.suffix in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (validated again; unknown keys raise)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def semantic_dict(self) -> Dict[str, Any]:
        """The fields that determine the result (hashed into the run id)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC_FIELDS}

    @property
    def uses_technique(self) -> bool:
        """True when any lever of the proposed technique is on."""
        return (self.features != "pixels" or self.logit_adjust or self.ema_decay is not None
                or self.aug_mult > 1)

    @property
    def method(self) -> str:
        """Short label: nonprivate-sgd, dp-sgd, nonprivate-adam, dp-adam, or proposed-*."""
        prefix = "dp" if self.dp else "nonprivate"
        if self.uses_technique:
            prefix = "proposed" if self.dp else "nonprivate-proposed"
        return f"{prefix}-{self.optimizer}"


def _choice(cfg: RunConfig, field: str, allowed: tuple) -> None:
    if getattr(cfg, field) not in allowed:
        raise ConfigError(f"{field}={getattr(cfg, field)!r}; expected one of {', '.join(allowed)}")


def _positive(cfg: RunConfig, field: str) -> None:
    v = getattr(cfg, field)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ConfigError(f"{field} must be > 0, got {v!r}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no data. Checks against N (delta < 1/N, batch <= N) run in train."""
    for f in ("image_size", "lr", "epochs", "batch_size", "max_grad_norm", "synth_n"):
        _positive(cfg, f)
    _choice(cfg, "optimizer", OPTIMIZER_NAMES)
    _choice(cfg, "accountant", ACCOUNTANT_NAMES)
    _choice(cfg, "lr_schedule", LR_SCHEDULES)
    _choice(cfg, "class_weights", CLASS_WEIGHTS)
    _choice(cfg, "eval_split", EVAL_SPLITS)
    _choice(cfg, "split", ("lesion", "official"))
    if not (0 < cfg.val_frac < 1 and 0 < cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise ConfigError(f"val_frac={cfg.val_frac}, test_frac={cfg.test_frac}: need 0 < each, sum < 1")
    _choice(cfg, "features", FEATURE_HEADS)
    heads = FEATURE_HEADS[cfg.features]
    feature_head = any(cfg.backbone in h for h in FEATURE_HEADS.values() if h)
    if (heads is None and feature_head) or (heads is not None and cfg.backbone not in heads):
        raise ConfigError(f"backbone={cfg.backbone!r} does not take features={cfg.features!r}; "
                          + ("image backbones take features='pixels'" if heads is None else
                             f"use one of {', '.join(heads)}"))
    if cfg.features == "scatter" and cfg.image_size % 4:
        raise ConfigError(f"image_size={cfg.image_size}: features='scatter' needs a multiple of 4")
    if not isinstance(cfg.aug_mult, int) or cfg.aug_mult < 1:
        raise ConfigError(f"aug_mult must be an integer >= 1, got {cfg.aug_mult!r}")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay must be in (0, 1), got {cfg.ema_decay!r}")
    if cfg.logit_adjust and not cfg.hist_noise > 0:
        raise ConfigError(f"hist_noise must be > 0, got {cfg.hist_noise!r}")
    if cfg.max_physical_batch_size is not None and cfg.max_physical_batch_size <= 0:
        raise ConfigError("max_physical_batch_size must be > 0")
    if cfg.dp:
        if cfg.target_epsilon is None:
            raise ConfigError("target_epsilon is required when dp=True")
        from .privacy import check_epsilon_delta

        check_epsilon_delta(cfg.target_epsilon, cfg.delta)
        if cfg.class_weights != "none":
            # Class weights from the training labels are a release of private data; the
            # proposed technique spends budget on a noisy histogram instead.
            raise ConfigError(
                "class_weights='balanced' reads class counts of the private training data, "
                "which is not covered by the DP guarantee; use class_weights='none' under dp"
            )
