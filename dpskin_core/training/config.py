"""Run configuration: one frozen dataclass that rejects unknown keys.

A config states the *target* privacy budget (``target_epsilon``, ``delta``); the noise
multiplier is derived from it at run time (:func:`.privacy.noise_multiplier_for`) and recorded
with the run, never typed in by hand. Name-valued fields are checked against the registry that
builds them (optimizers, accountants, front ends, backbones), so a name list cannot drift.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from ..constants import NORMALISATIONS
from ..data import DATASETS
from ..errors import ConfigError, UnknownNameError, check_flag, check_number
from .augment import COLOUR_CONSTANCY, MIXINGS
from .backbones import BACKBONES
from .frontends import FRONT_ENDS
from .optim import OPTIMIZERS
from .persample import GRAD_SAMPLE_MODES, MODE_CHOICES
from .privacy import TRAINING_ACCOUNTANTS, check_epsilon_delta

#: Fields that do not change what a run computes; they are left out of the run hash.
NON_SEMANTIC_FIELDS = frozenset({"name", "recipe", "device", "num_threads", "progress",
                                 "cache_dir"})
#: Fields read only under DP; a non-private run ignores them, so they are not hashed there.
DP_ONLY_FIELDS = ("target_epsilon", "delta", "max_grad_norm", "accountant",
                  "max_physical_batch_size", "hist_noise", "dp_noise", "privacy_unit",
                  "grad_sample_mode", "stats_noise")
#: Fields read only by the logit-adjusted loss.
LOGIT_ADJUST_FIELDS = ("la_tau", "la_tau_kept", "hist_noise")
#: how a standardising head's features are normalised: ``none`` (as the front end gives them),
#: ``private`` (from a Gaussian release of their count, sum and sum of squares, counted in eps;
#: DP only), ``exact`` (from the training rows themselves; non-private only)
FEATURE_NORMS = ("none", "private", "exact")
#: the heads that standardise their inputs (a ``standardise(mean, std)`` method)
STANDARDISING_HEADS = ("derm_linear",)

LR_SCHEDULES = ("constant", "cosine")
#: the normalisation layers of a torchvision backbone: ``group`` (BatchNorm replaced by
#: GroupNorm, per example: the only choice under DP) or ``batch`` (torchvision's BatchNorm
#: kept, batch statistics: non-private only)
NORMS = ("group", "batch")
CLASS_WEIGHTS = ("none", "balanced", "sqrt-resampled")
EVAL_SPLITS = ("val", "test")
SPLITS = ("lesion", "official")
#: where the DP randomness (Poisson sampling, gradient noise, noisy releases) comes from:
#: ``secret`` a seed drawn from OS entropy, kept only with the run's private checkpoints (the
#: default: nothing published regenerates the noise; resume stays bit-exact); ``seeded`` derived
#: from the public ``seed`` (research reproducibility only: anyone with the config can
#: regenerate the noise and undo it); ``secure`` Opacus' secure_mode (a cryptographic RNG from
#: torchcsprng; not bit-exact on resume)
DP_NOISE_MODES = ("secret", "seeded", "secure")
#: the privacy unit: one training ``image``, or one ``lesion`` (all its images: user-level DP)
PRIVACY_UNITS = ("image", "lesion")
DEVICES = ("auto", "cpu", "cuda")
#: every value of :attr:`RunConfig.method`
METHODS = ("nonprivate-sgd", "nonprivate-adam", "dp-sgd", "dp-adam", "nonprivate-proposed-sgd",
           "nonprivate-proposed-adam", "proposed-sgd", "proposed-adam")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. See the field comments for units."""

    name: str = "run"                       # human label; not part of the hash
    recipe: Optional[str] = None            # recipe that built it (training.recipes); not hashed
    seed: int = 0
    # --- data -------------------------------------------------------------------------
    dataset: str = "synthetic"              # registry name: synthetic | isic2018 | dermamnist
    data_root: Optional[str] = None         # folder in the official layout (None: dataset default)
    image_size: int = 32                    # px, side after centre crop + resize
    split: str = "lesion"                   # lesion (seeded, grouped by lesion_id) | official |
    #                                         site:<site> (leave that HAM10000 site out as test)
    val_frac: float = 0.15
    test_frac: float = 0.15
    split_seed: int = 0                     # the split is shared across training seeds
    synth_n: int = 1200                     # images in the synthetic dataset
    normalisation: str = "imagenet"         # fixed public constants, see constants.NORMALISATIONS
    norm: str = "group"                     # group | batch (non-private only), see NORMS
    augment_flips: bool = True              # random horizontal + vertical flips
    augment_rot90: bool = True              # random multiples of 90 degrees (lesions have no "up")
    augment_color: float = 0.0              # colour jitter strength (0 = off; 0.1 = +-10 %)
    augment_translate: int = 0              # px: random shift in [-t, t] per axis (reflected
    #                                         border; 0 = off); pixel front end only
    augment_rotate: bool = False            # random rotation by any angle (reflected border)
    augment_zoom: float = 0.0               # random scale in [1 - z, 1 + z] (0 = off; < 1)
    mixing: str = "none"                    # none | mixup | cutmix: each batch mixed with a
    #                                         permutation of itself (non-private, pixels only)
    mixing_alpha: float = 1.0               # lam ~ Beta(alpha, alpha), the share of each label
    # --- model ------------------------------------------------------------------------
    backbone: str = "smallcnn"
    pretrained_path: Optional[str] = None   # local state_dict only; nothing is downloaded
    # --- optimisation -----------------------------------------------------------------
    optimizer: str = "sgd"                  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9                   # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"           # constant | cosine (annealed per step to 0)
    warmup_epochs: float = 0.0              # linear learning-rate warm-up first (epochs)
    epochs: int = 10
    batch_size: int = 128                   # expected (logical) batch size; Poisson under DP
    max_physical_batch_size: Optional[int] = None  # split logical batches to bound memory
    class_weights: str = "none"             # none | balanced | sqrt-resampled: the loss weighted
    #                                         by N / (K n_c), or batches drawn with replacement
    #                                         in proportion to n_c^-1/2 and the loss weighted by
    #                                         n_c^-1/2 (non-private only: both read the counts)
    early_stopping_patience: Optional[int] = None  # epochs without val improvement
    eval_split: str = "test"                # split whose predictions are the run's result
    # --- the proposed technique (training.technique, training.frontends); all off by default
    colour_constancy: str = "none"          # per-image illuminant correction before the front end
    #                                         (training.augment.COLOUR_CONSTANCY): none | grey-world
    #                                         | shades-of-gray | max-rgb
    features: str = "pixels"                # front end (training.frontends): pixels | colour | derm | scatter
    #                                         | given (rows encoded by the caller; run(model_factory=))
    logit_adjust: bool = False              # logit-adjusted loss with a (noisy under dp) class prior
    la_tau: float = 1.0                     # logit-adjustment strength tau
    la_tau_kept: float = 0.0                # prior strength kept at prediction (DP only): the
    #                                         released predictor's logits are f(x) + la_tau_kept
    #                                         log pi (pi: the noisy histogram; post-processing)
    hist_noise: float = 20.0                # std (in images) of the Gaussian noise on the histogram
    ema_decay: Optional[float] = None       # EMA of weights, e.g. 0.99 (per optimizer step)
    aug_mult: int = 1                       # augmentation multiplicity K (views averaged pre-clip)
    feature_norm: str = "none"              # none | private | exact (see FEATURE_NORMS)
    stats_noise: float = 10.0               # noise multiplier of the private feature statistics
    # --- privacy ----------------------------------------------------------------------
    dp: bool = False                        # DP-SGD / DP-Adam through Opacus when True
    target_epsilon: Optional[float] = None  # required when dp
    delta: Optional[float] = 1e-5           # must be < 1/N_train
    max_grad_norm: float = 1.0              # per-sample clipping bound C (L2)
    accountant: str = "prv"                 # prv | rdp (privacy.TRAINING_ACCOUNTANTS)
    dp_noise: str = "secret"                # secret | seeded | secure (see DP_NOISE_MODES)
    privacy_unit: str = "image"             # image | lesion (see PRIVACY_UNITS)
    grad_sample_mode: str = "auto"          # per-sample gradient engine (training.persample)
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

    def inactive_fields(self) -> frozenset:
        """Fields this config never reads: DP-only fields of a non-private run, the logit
        adjustment's fields without it, SGD's momentum under Adam."""
        off = set()
        if not self.dp:
            off.update(DP_ONLY_FIELDS)
        if not self.logit_adjust:
            off.update(LOGIT_ADJUST_FIELDS)
        if self.feature_norm == "none":
            off.add("feature_norm")
        if self.feature_norm != "private":
            off.add("stats_noise")
        if self.optimizer != "sgd":
            off.add("momentum")
        if self.split.startswith("site:"):  # the held-out site is the test split
            off.add("test_frac")
        if self.mixing == "none":  # (so configs without mixing keep their semantic fields)
            off.update(("mixing", "mixing_alpha"))
        if not self.augment_rotate:  # (likewise for configs without the rotation or zoom)
            off.add("augment_rotate")
        if self.augment_zoom == 0:
            off.add("augment_zoom")
        if self.norm == "group":  # (so a config from before this field hashes as before)
            off.add("norm")
        return frozenset(off)

    def semantic_dict(self) -> Dict[str, Any]:
        """The fields that determine the result (hashed into the run id): neither execution
        settings nor fields the run never reads."""
        skip = NON_SEMANTIC_FIELDS | self.inactive_fields()
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @property
    def uses_technique(self) -> bool:
        """True when any lever of the proposed technique is on."""
        return (self.features not in ("pixels", "given") or self.logit_adjust or self.ema_decay is not None
                or self.aug_mult > 1)

    @property
    def method(self) -> str:
        """Short label: nonprivate-sgd, dp-sgd, nonprivate-adam, dp-adam, or proposed-*."""
        prefix = "dp" if self.dp else "nonprivate"
        if self.uses_technique:
            prefix = "proposed" if self.dp else "nonprivate-proposed"
        return f"{prefix}-{self.optimizer}"


def _choice(cfg: RunConfig, field: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if getattr(cfg, field) not in allowed:
        raise ConfigError(f"{field}={getattr(cfg, field)!r}; expected one of {', '.join(allowed)}")


def _number(cfg: RunConfig, field: str, **kw: bool) -> None:
    """:func:`~dpskin_core.errors.check_number` of the field ``field`` of ``cfg``."""
    check_number(getattr(cfg, field), field, **kw)


def _flag(cfg: RunConfig, field: str) -> None:
    """:func:`~dpskin_core.errors.check_flag` of the field ``field`` of ``cfg``."""
    check_flag(getattr(cfg, field), field)


def _text(cfg: RunConfig, field: str, optional: bool = False) -> None:
    v = getattr(cfg, field)
    if not (isinstance(v, str) or (optional and v is None)):
        raise ConfigError(f"{field} must be a string{' or None' if optional else ''}, got {v!r}")


def grad_sample_settings(cfg: RunConfig) -> Dict[str, Any]:
    """The settings a per-sample gradient engine must serve (:meth:`GradSampleMode.refusal`)."""
    return dict(aug_mult=cfg.aug_mult, privacy_unit=cfg.privacy_unit,
                max_physical_batch_size=cfg.max_physical_batch_size,
                logit_adjust=cfg.logit_adjust, backbone=cfg.backbone)


def validate(cfg: RunConfig) -> None:
    """Checks that need no data (checks against N, delta < 1/N and batch <= N, run in the
    trainer's first step). Every field is checked: type, finiteness, range, known names."""
    for f in ("seed", "split_seed"):
        _number(cfg, f, integer=True, nonnegative=True)
    for f in ("image_size", "epochs", "batch_size", "synth_n", "aug_mult"):
        _number(cfg, f, integer=True, positive=True)
    _number(cfg, "augment_translate", integer=True, nonnegative=True)
    if cfg.augment_translate >= cfg.image_size:
        raise ConfigError(f"augment_translate={cfg.augment_translate} px must be smaller than "
                          f"image_size={cfg.image_size}")
    for f in ("max_physical_batch_size", "early_stopping_patience", "num_threads"):
        _number(cfg, f, integer=True, positive=True, optional=True)
    for f in ("lr", "max_grad_norm", "hist_noise", "stats_noise", "mixing_alpha"):
        _number(cfg, f, positive=True)
    for f in ("momentum", "weight_decay", "augment_color", "la_tau", "la_tau_kept",
              "warmup_epochs"):
        _number(cfg, f, nonnegative=True)
    _number(cfg, "augment_zoom", nonnegative=True, below=1)
    if cfg.la_tau_kept > 0 and not (cfg.logit_adjust and cfg.dp):
        # the shift is built from the prior of the logit-adjusted loss; only a DP run's prior is
        # a release (its noisy histogram): a non-private run would publish exact class counts
        raise ConfigError(f"la_tau_kept={cfg.la_tau_kept} needs dp=True and logit_adjust=True "
                          f"(got dp={cfg.dp}, logit_adjust={cfg.logit_adjust})")
    for f in ("val_frac", "test_frac"):
        _number(cfg, f, positive=True)
    _number(cfg, "ema_decay", positive=True, optional=True, below=1)
    _number(cfg, "target_epsilon", positive=True, optional=True)
    _number(cfg, "delta", positive=True, optional=True)
    for f in ("augment_flips", "augment_rot90", "augment_rotate", "logit_adjust", "dp", "progress"):
        _flag(cfg, f)
    for f in ("name", "dataset", "normalisation", "backbone"):
        _text(cfg, f)
    for f in ("recipe", "data_root", "pretrained_path", "cache_dir"):
        _text(cfg, f, optional=True)
    _choice(cfg, "dataset", DATASETS.names())
    _choice(cfg, "device", DEVICES)
    _choice(cfg, "dp_noise", DP_NOISE_MODES)
    _choice(cfg, "privacy_unit", PRIVACY_UNITS)
    _choice(cfg, "grad_sample_mode", MODE_CHOICES)
    _choice(cfg, "optimizer", OPTIMIZERS.names())
    _choice(cfg, "accountant", TRAINING_ACCOUNTANTS)
    _choice(cfg, "lr_schedule", LR_SCHEDULES)
    _choice(cfg, "class_weights", CLASS_WEIGHTS)
    _choice(cfg, "eval_split", EVAL_SPLITS)
    _choice(cfg, "feature_norm", FEATURE_NORMS)
    _choice(cfg, "colour_constancy", COLOUR_CONSTANCY.names())
    _choice(cfg, "mixing", MIXINGS)
    _choice(cfg, "norm", NORMS)
    if cfg.norm == "batch" and cfg.dp:
        raise ConfigError("norm='batch': BatchNorm mixes the examples of a batch, so one "
                          "example's gradient is not its own and DP-SGD's clipping bounds "
                          "nothing; under dp use norm='group'")
    if cfg.mixing != "none" and cfg.dp:
        raise ConfigError(f"mixing={cfg.mixing!r} puts two training images into one input, so "
                          "one image would reach two per-sample gradients: the DP guarantee "
                          "(clipping per image) would not hold; use mixing='none' under dp")
    if cfg.mixing != "none" and cfg.features != "pixels":
        raise ConfigError(f"mixing={cfg.mixing!r} mixes images; features={cfg.features!r} "
                          "gives no images (use features='pixels')")
    if cfg.colour_constancy != "none" and cfg.features == "given":
        raise ConfigError(f"colour_constancy={cfg.colour_constancy!r} corrects images; "
                          "features='given' takes rows encoded by the caller")
    if not (isinstance(cfg.split, str) and cfg.split.startswith("site:") and len(cfg.split) > 5):
        _choice(cfg, "split", SPLITS)  # or site:<name>: the site is checked against the data
    if not (0 < cfg.val_frac < 1 and 0 < cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise ConfigError(f"val_frac={cfg.val_frac}, test_frac={cfg.test_frac}: need 0 < each, sum < 1")
    try:
        front = FRONT_ENDS.get(cfg.features)
    except UnknownNameError as e:
        raise ConfigError(f"features: {e}") from None
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"backbone: {BACKBONES.kind} {cfg.backbone!r} unknown; known: "
                          f"{', '.join(BACKBONES.names())}")
    front.check(cfg)  # the front end's own constraints, e.g. which backbones take it
    if cfg.feature_norm != "none":
        if cfg.backbone not in STANDARDISING_HEADS:
            raise ConfigError(f"feature_norm={cfg.feature_norm!r} needs a standardising head "
                              f"({', '.join(STANDARDISING_HEADS)}); backbone={cfg.backbone!r}")
        if cfg.feature_norm == "private" and not cfg.dp:
            raise ConfigError("feature_norm='private' is a DP release; a non-private run uses "
                              "feature_norm='exact'")
        if cfg.feature_norm == "exact" and cfg.dp:
            raise ConfigError("feature_norm='exact' reads the private training rows, which the DP "
                              "guarantee does not cover; use feature_norm='private' under dp")
        if cfg.feature_norm == "private" and cfg.privacy_unit != "image":
            raise ConfigError("feature_norm='private' bounds the contribution of one image; "
                              f"privacy_unit={cfg.privacy_unit!r} is not supported")
        if cfg.feature_norm == "private" and front.norm_bound is None:
            raise ConfigError(f"feature_norm='private' needs rows of bounded norm; front end "
                              f"features={cfg.features!r} gives none")
    if cfg.normalisation not in NORMALISATIONS:
        raise ConfigError(f"normalisation={cfg.normalisation!r}; expected one of "
                          f"{', '.join(NORMALISATIONS)}")
    if cfg.dp:
        if cfg.grad_sample_mode != "auto":  # the settings it cannot serve; the layers in the trainer
            why = GRAD_SAMPLE_MODES.get(cfg.grad_sample_mode).refusal(**grad_sample_settings(cfg))
            if why:
                raise ConfigError(why)
        if cfg.target_epsilon is None:
            raise ConfigError("target_epsilon is required when dp=True")
        check_epsilon_delta(cfg.target_epsilon, cfg.delta)
        if cfg.class_weights != "none":
            # Class weights from the training labels are a release of private data; the
            # proposed technique spends budget on a noisy histogram instead.
            raise ConfigError(
                f"class_weights={cfg.class_weights!r} reads class counts of the private "
                "training data, which is not covered by the DP guarantee; use "
                "class_weights='none' under dp"
            )
        if cfg.dp_noise == "secure" and importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError("dp_noise='secure' (Opacus secure_mode) needs the torchcsprng "
                              "package, which is not installed; use dp_noise='secret' (an "
                              "OS-entropy seed kept with the private checkpoints)")
    elif cfg.privacy_unit != "image":
        raise ConfigError(f"privacy_unit={cfg.privacy_unit!r} is a DP setting; a non-private "
                          "run has no privacy unit (leave it at 'image')")
