"""Recipes: every named way of training a model, built in one place from a profile's parameters.

A recipe turns the typed parameters of a profile (:class:`Params`, one per profile of
``experiments.yml``) into a :class:`RunConfig`; the notebooks, the benchmarks and the attacks
chapter ask for recipes by name instead of typing config fields, so two chapters that mean the
same recipe build the same config and share its run::

    p = Params.from_mapping(load_registry().parameters_for("02_dp_sgd", "cpu"))
    cfgs = RECIPES.get("dp-sgd").configs(p)          # backbones x epsilons x seeds of p
    cfg = RECIPES.get("proposed").config(p, target_epsilon=3.0, seed=0)

The recipe's name is recorded in the config (``RunConfig.recipe``) but not hashed: a run is
identified by what it computes.
"""
from __future__ import annotations

import itertools
import inspect
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError, check_flag, check_number
from ..registry import Registry
from .augment import COLOUR_CONSTANCY, MIXINGS
from .backbones import BACKBONES
from .config import NORMS, RunConfig

#: the optimisers of the end-to-end DP recipes, as keys of ``Params.lr_dp_by_backbone``
DP_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Params:
    """The parameters of a profile (``experiments.yml``), typed; unknown keys are rejected.

    Grid axes (``backbones``, ``seeds``, ``epsilons``), the data, and the hyperparameters of
    every recipe. The ``attack_*`` / ``overfit_*`` fields size the attacked models of the
    attacks chapter (None: the plain recipe's value). Every field is required.
    """

    profile: str
    runs_root: str
    dataset: str
    data_root: Optional[str]
    synth_n: int
    image_size: int
    backbones: Tuple[str, ...]
    seeds: Tuple[int, ...]
    epsilons: Tuple[float, ...]
    lesion_epsilons: Tuple[float, ...]  # budgets of the lesion-level (user-level) DP comparison
    epochs: int                       # end-to-end non-private recipes: at most this many
    batch_size: int                   # their batch size
    patience: Optional[int]           # their early stopping (epochs without validation gain)
    warmup_epochs: float              # their linear learning-rate warm-up (epochs)
    lr_schedule: str                  # their schedule after warm-up: constant | cosine
    augment_color: float              # their colour jitter (data-independent)
    dp_epochs: int                    # end-to-end DP recipes (DP-SGD / DP-Adam)
    dp_batch_size: int                # their expected (Poisson) batch size
    dp_logit_adjust: bool             # their class-imbalance remedy: noisy-histogram prior
    dp_la_tau: float                  # its strength tau (logits shifted by tau log prior)
    dp_ema: Optional[float]           # their EMA of the weights (decay per step; None: off)
    dp_aug_mult: int                  # their augmentation multiplicity (views per image)
    lr_sgd: float
    lr_adam: float
    lr_dp_sgd: float
    lr_dp_adam: float
    max_grad_norm: float              # per-sample clipping bound C
    delta: float
    num_threads: Optional[int]
    nproc: int                        # training processes per run (torchrun); 0: one per GPU
    class_weights: str                # non-private recipes only (reads private class counts)
    proposed_lr: float
    proposed_batch_size: int
    proposed_epochs: int
    proposed_ema: float
    # the attacked models (chapter 05_attacks); None: as the plain recipe
    attack_epochs: Optional[int]
    attack_pool_size: Optional[int]   # images of the membership game (None: the whole split)
    attack_accountant: str
    overfit_epochs: Optional[int]
    overfit_batch_size: Optional[int]
    overfit_optimizer: str
    loso_sites: Tuple[str, ...] = ()  # leave-one-site-out: each site held out as the test split
    #: the networks the private recipes sweep (a subset of ``backbones``; None: all of them):
    #: a profile can afford converged non-private references of more networks than DP grids
    dp_backbones: Optional[Tuple[str, ...]] = None
    #: the learning rate, epochs and EMA decay of the technique's first generation
    #: (``proposed-colour``), where they differ from the second's (None: ``proposed_lr``,
    #: ``proposed_epochs``, ``proposed_ema``)
    proposed_colour_lr: Optional[float] = None
    proposed_colour_epochs: Optional[int] = None
    proposed_colour_ema: Optional[float] = None
    #: the side (px) of the images the second generation's front end describes (None:
    #: ``image_size``): its features cost the same at any size, and are richer above 32 px
    proposed_image_size: Optional[int] = None
    #: a network's own learning rates for the end-to-end DP recipes, where the profile's
    #: ``lr_dp_sgd`` / ``lr_dp_adam`` do not suit it (one rate does not fit every network: a
    #: DP-SGD rate that trains the small CNN collapses MobileNetV3 to one class):
    #: ``{backbone: {"sgd": lr, "adam": lr}}``, either optimiser may be left out
    lr_dp_by_backbone: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: the end-to-end DP recipes' epochs at a privacy budget where they differ from
    #: ``dp_epochs`` (``{eps: epochs}``): at a fixed budget more steps mean more noise per step,
    #: so the best number of steps depends on eps (De et al. 2022 tune it per budget)
    dp_epochs_by_epsilon: Mapping[float, int] = field(default_factory=dict)
    #: the largest random shift (px, per axis, reflected border) of the non-private references'
    #: training images, and of the end-to-end DP recipes' (data-independent: free under DP)
    augment_translate: int = 0
    dp_augment_translate: int = 0
    #: random rotation by any angle and random scale in [1 - zoom, 1 + zoom] (one resampling,
    #: reflected border; ``RunConfig.augment_rotate`` / ``augment_zoom``) of the non-private
    #: references' training images, and of the end-to-end DP recipes' (data-independent)
    augment_rotate: bool = False
    augment_zoom: float = 0.0
    dp_augment_rotate: bool = False
    dp_augment_zoom: float = 0.0
    #: the non-private references' L2 weight decay (the optimiser's own ``weight_decay``,
    #: coupled to the gradient, on every parameter); the DP recipes keep none
    weight_decay: float = 0.0
    #: the non-private references' remedy for class imbalance: 0 weights the loss by the
    #: class weights (``class_weights``); > 0 trains by the logit-adjusted loss at this
    #: strength tau on the exact class counts instead (Menon et al. 2021; tau = 1 is the
    #: balanced-error loss), predicting by the plain logits
    reference_la_tau: float = 0.0
    #: the non-private references' EMA of the weights (decay per optimiser step; None: off):
    #: the released and evaluated weights are the average (``RunConfig.ema_decay``)
    reference_ema: Optional[float] = None
    #: the non-private references' per-image colour constancy (``augment.COLOUR_CONSTANCY``:
    #: each image divided by its own illuminant estimate, before the network; reads no other
    #: image and no label)
    reference_colour_constancy: str = "none"
    #: the non-private references' batch mixing (``RunConfig.mixing``: none | mixup | cutmix)
    #: and its Beta(alpha, alpha) parameter; refused under DP (one image in two inputs)
    reference_mixing: str = "none"
    reference_mixing_alpha: float = 1.0
    #: the non-private references' normalisation layers (``RunConfig.norm``: group, the DP
    #: runs' GroupNorm, or batch, torchvision's BatchNorm kept; not for the small CNNs)
    reference_norm: str = "group"
    #: the end-to-end DP recipes' prior strength kept at prediction (``RunConfig.la_tau_kept``:
    #: the released predictor's logits are f(x) + this * log(noisy prior); post-processing)
    dp_la_tau_kept: float = 0.0

    def __post_init__(self) -> None:
        for name in ("backbones", "seeds", "epsilons", "lesion_epsilons", "loso_sites"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("backbones", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"profile parameter {name} is empty")
        for name in ("augment_translate", "dp_augment_translate"):
            check_number(getattr(self, name), f"profile parameter {name} (px)", integer=True,
                         nonnegative=True)
        for name in ("augment_zoom", "dp_augment_zoom"):
            check_number(getattr(self, name), f"profile parameter {name}", nonnegative=True,
                         below=1)
        for name in ("augment_rotate", "dp_augment_rotate"):
            check_flag(getattr(self, name), f"profile parameter {name}")
        check_number(self.dp_la_tau_kept, "profile parameter dp_la_tau_kept", nonnegative=True)
        check_number(self.weight_decay, "profile parameter weight_decay", nonnegative=True)
        check_number(self.reference_la_tau, "profile parameter reference_la_tau", nonnegative=True)
        # every EMA decay is per step, in (0, 1): checked here, before any run of the profile
        for name in ("reference_ema", "dp_ema", "proposed_ema", "proposed_colour_ema"):
            check_number(getattr(self, name), f"profile parameter {name}", positive=True,
                         optional=True, below=1)
        check_number(self.reference_mixing_alpha, "profile parameter reference_mixing_alpha",
                     positive=True)
        if self.reference_mixing not in MIXINGS:
            raise ConfigError(f"profile parameter reference_mixing={self.reference_mixing!r}; "
                              f"known: {', '.join(MIXINGS)}")
        if self.reference_norm not in NORMS:
            raise ConfigError(f"profile parameter reference_norm={self.reference_norm!r}; "
                              f"known: {', '.join(NORMS)}")
        if self.reference_colour_constancy not in COLOUR_CONSTANCY.names():
            raise ConfigError(f"profile parameter reference_colour_constancy="
                              f"{self.reference_colour_constancy!r}; known: "
                              f"{', '.join(COLOUR_CONSTANCY.names())}")
        for name in ("proposed_image_size", "proposed_colour_epochs"):
            check_number(getattr(self, name), f"profile parameter {name}", integer=True,
                         positive=True, optional=True)
        if self.dp_backbones is not None:
            object.__setattr__(self, "dp_backbones", tuple(self.dp_backbones))
            extra = [b for b in self.dp_backbones if b not in self.backbones]
            if extra or not self.dp_backbones:
                raise ConfigError(f"profile parameter dp_backbones must be a non-empty subset of "
                                  f"backbones {list(self.backbones)}; got {list(self.dp_backbones)}")
        object.__setattr__(self, "lr_dp_by_backbone", _checked_rates(self.lr_dp_by_backbone))
        object.__setattr__(self, "dp_epochs_by_epsilon", _checked_epochs(self.dp_epochs_by_epsilon))

    def dp_epochs_at(self, epsilon: float) -> int:
        """The end-to-end DP recipes' epochs at target ``epsilon``: its own in
        ``dp_epochs_by_epsilon``, else ``dp_epochs``."""
        return self.dp_epochs_by_epsilon.get(float(epsilon), self.dp_epochs)

    def dp_lr(self, backbone: str, optimizer: str) -> float:
        """The learning rate of ``backbone`` trained end to end by DP-SGD (``optimizer="sgd"``)
        or DP-Adam (``"adam"``): its own in ``lr_dp_by_backbone``, else the profile's."""
        if optimizer not in DP_OPTIMIZERS:
            raise ConfigError(f"DP optimizer must be one of {list(DP_OPTIMIZERS)}, got {optimizer!r}")
        default = self.lr_dp_sgd if optimizer == "sgd" else self.lr_dp_adam
        return self.lr_dp_by_backbone.get(backbone, {}).get(optimizer, default)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str = "profile parameters") -> "Params":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{where}: unknown parameter(s) {', '.join(unknown)}; known: "
                              f"{', '.join(cls.field_names())}")
        required = [f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ConfigError(f"{where}: missing parameter(s) {', '.join(missing)}")
        return cls(**dict(d))

    @classmethod
    def from_namespace(cls, ns: Mapping[str, Any]) -> "Params":
        """The parameters a notebook received: the names of :class:`Params` in ``ns`` (its
        globals after papermill's injected cell)."""
        return cls.from_mapping({k: ns[k] for k in cls.field_names() if k in ns},
                                "notebook parameters")


def _checked_rates(rates: Any) -> Dict[str, Dict[str, float]]:
    """``lr_dp_by_backbone`` checked (known networks, known optimisers, finite positive rates)
    and copied into plain dicts."""
    where = "profile parameter lr_dp_by_backbone"
    if not isinstance(rates, Mapping):
        raise ConfigError(f"{where} must be a mapping {{backbone: {{optimizer: lr}}}}, got {rates!r}")
    out: Dict[str, Dict[str, float]] = {}
    for net, by_opt in rates.items():
        if net not in BACKBONES:
            raise ConfigError(f"{where}: unknown backbone {net!r}; known: {', '.join(BACKBONES.names())}")
        if not isinstance(by_opt, Mapping) or not by_opt:
            raise ConfigError(f"{where}.{net} must be a non-empty mapping {{optimizer: lr}}, "
                              f"got {by_opt!r}")
        out[net] = {}
        for opt, lr in by_opt.items():
            if opt not in DP_OPTIMIZERS:
                raise ConfigError(f"{where}.{net}: unknown optimizer {opt!r}; known: "
                                  f"{', '.join(DP_OPTIMIZERS)}")
            check_number(lr, f"{where}.{net}.{opt}", positive=True)
            out[net][opt] = float(lr)
    return out


def _checked_epochs(by_eps: Any) -> Dict[float, int]:
    """``dp_epochs_by_epsilon`` checked (finite positive budgets, positive integer epochs) and
    copied into a plain dict keyed by float."""
    where = "profile parameter dp_epochs_by_epsilon"
    if not isinstance(by_eps, Mapping):
        raise ConfigError(f"{where} must be a mapping {{eps: epochs}}, got {by_eps!r}")
    out: Dict[float, int] = {}
    for eps, n in by_eps.items():
        check_number(eps, f"{where}: budget {eps!r}", positive=True)
        check_number(n, f"{where}.{eps}: epochs", integer=True, positive=True)
        out[float(eps)] = n
    return out


@dataclass(frozen=True)
class Recipe:
    """A named way of training: ``build(p)`` is its config; ``axes`` the grid it is swept over
    (a subset of backbone, target_epsilon, site, seed; ``site`` sets ``split="site:<site>"``)."""

    name: str
    label: str                        # for tables and figures
    build: Callable[..., RunConfig]
    axes: Tuple[str, ...]
    description: str = ""

    @property
    def private(self) -> bool:
        return "target_epsilon" in self.axes

    def config(self, p: Params, *, n_train: Optional[int] = None, **point: Any) -> RunConfig:
        """The config of one grid point (e.g. ``seed=1, target_epsilon=3.0``). ``n_train``
        (images of the training split) goes to the recipes that scale with it, the point's
        ``backbone`` and ``target_epsilon`` to the recipes whose hyperparameters depend on the
        network or the budget."""
        extra = set(point) - set(self.axes)
        if extra:
            raise ConfigError(f"recipe {self.name!r} is not swept over {', '.join(sorted(extra))}; "
                              f"its axes: {', '.join(self.axes)}")
        takes = inspect.signature(self.build).parameters
        kw: Dict[str, Any] = {"n_train": n_train} if "n_train" in takes else {}
        for axis in ("backbone", "target_epsilon"):
            if axis in takes and axis in point:
                kw[axis] = point[axis]
        base = self.build(p, **kw)
        if "site" in point:
            point["split"] = f"site:{point.pop('site')}"
        return base.replace(recipe=self.name, name=self.name, **point)

    def configs(self, p: Params, *, backbones: Optional[Sequence[str]] = None,
                epsilons: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None,
                sites: Optional[Sequence[str]] = None,
                n_train: Optional[int] = None) -> List[RunConfig]:
        """One config per point of the recipe's grid (the profile's lists unless given; a
        private recipe's networks are the profile's ``dp_backbones`` when set)."""
        nets = p.dp_backbones if self.private and p.dp_backbones is not None else p.backbones
        values = {"backbone": list(backbones or nets),
                  "target_epsilon": list(epsilons or p.epsilons), "seed": list(seeds or p.seeds),
                  "site": list(sites or p.loso_sites)}
        return [self.config(p, n_train=n_train, **dict(zip(self.axes, combo)))
                for combo in itertools.product(*(values[a] for a in self.axes))]


#: name -> Recipe
RECIPES: Registry[Recipe] = Registry("recipe")
E2E, DP, PROPOSED = ("backbone", "seed"), ("backbone", "target_epsilon", "seed"), ("target_epsilon", "seed")
LOSO = ("backbone", "site", "seed")


def _recipe(name: str, label: str, axes: Tuple[str, ...]) -> Callable[[Callable[..., RunConfig]], Callable[..., RunConfig]]:
    def deco(build: Callable[..., RunConfig]) -> Callable[..., RunConfig]:
        RECIPES.register(name)(Recipe(name, label, build, axes, (build.__doc__ or "").strip()))
        return build
    return deco


def common(p: Params) -> Dict[str, Any]:
    """The data and execution fields every recipe shares."""
    return dict(dataset=p.dataset, data_root=p.data_root, synth_n=p.synth_n,
                image_size=p.image_size, progress=False, num_threads=p.num_threads,
                delta=p.delta, max_grad_norm=p.max_grad_norm)


def _end_to_end(p: Params, **over: Any) -> RunConfig:
    return RunConfig(**{"backbone": p.backbones[0], "epochs": p.epochs, "batch_size": p.batch_size,
                        **common(p), **over})


def _reference(p: Params, **over: Any) -> RunConfig:
    """Non-private training to convergence: warm-up, then the profile's schedule over at most
    ``epochs``, stopped when validation balanced accuracy has not improved for ``patience``
    epochs (the best epoch is released); loss weighted by the (private) class counts, or
    logit-adjusted by them (``reference_la_tau``)."""
    imbalance = (dict(class_weights="none", logit_adjust=True, la_tau=p.reference_la_tau)
                 if p.reference_la_tau > 0 else dict(class_weights=p.class_weights))
    return _end_to_end(p, **imbalance, early_stopping_patience=p.patience,
                       warmup_epochs=p.warmup_epochs, lr_schedule=p.lr_schedule,
                       augment_color=p.augment_color, augment_translate=p.augment_translate,
                       augment_rotate=p.augment_rotate, augment_zoom=p.augment_zoom,
                       weight_decay=p.weight_decay, ema_decay=p.reference_ema,
                       colour_constancy=p.reference_colour_constancy,
                       mixing=p.reference_mixing, mixing_alpha=p.reference_mixing_alpha,
                       norm=p.reference_norm, **over)


def _dp(p: Params, optimizer: str, backbone: Optional[str] = None,
        target_epsilon: Optional[float] = None, **over: Any) -> RunConfig:
    """An end-to-end DP run of ``backbone`` (None: the profile's first) by ``optimizer`` at
    ``target_epsilon`` (None: the profile's first budget), at the DP schedule (its epochs at
    that budget, :meth:`Params.dp_epochs_at`) and the network's DP learning rate
    (:meth:`Params.dp_lr`), with the profile's DP levers (noisy class prior, EMA, augmentation
    multiplicity); the last iterate (or its EMA) is released."""
    net, eps = backbone or p.backbones[0], p.epsilons[0] if target_epsilon is None else target_epsilon
    return _end_to_end(p, backbone=net, dp=True, target_epsilon=eps,
                       epochs=p.dp_epochs_at(eps), batch_size=p.dp_batch_size,
                       logit_adjust=p.dp_logit_adjust, la_tau=p.dp_la_tau,
                       la_tau_kept=p.dp_la_tau_kept if p.dp_logit_adjust else 0.0, ema_decay=p.dp_ema,
                       aug_mult=p.dp_aug_mult, augment_translate=p.dp_augment_translate,
                       augment_rotate=p.dp_augment_rotate, augment_zoom=p.dp_augment_zoom,
                       optimizer=optimizer, lr=p.dp_lr(net, optimizer), **over)


# --------------------------------------------------------------------------- end to end
@_recipe("nonprivate-sgd", "non-private SGD", E2E)
def nonprivate_sgd(p: Params) -> RunConfig:
    """The backbone trained without privacy to convergence by SGD (momentum 0.9)."""
    return _reference(p, optimizer="sgd", lr=p.lr_sgd)


@_recipe("nonprivate-adam", "non-private Adam", E2E)
def nonprivate_adam(p: Params) -> RunConfig:
    """The backbone trained without privacy to convergence by Adam."""
    return _reference(p, optimizer="adam", lr=p.lr_adam)


@_recipe("loso-adam", "non-private Adam, one site held out", LOSO)
def loso_adam(p: Params) -> RunConfig:
    """The non-private Adam reference trained on all HAM10000 acquisition sites but one and
    tested on that one (``split="site:<site>"``): generalisation to other acquisition
    conditions."""
    return nonprivate_adam(p)


@_recipe("dp-sgd", "DP-SGD", DP)
def dp_sgd(p: Params, backbone: Optional[str] = None,
           target_epsilon: Optional[float] = None) -> RunConfig:
    """The backbone trained by DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)."""
    return _dp(p, "sgd", backbone, target_epsilon)


@_recipe("dp-adam", "DP-Adam", DP)
def dp_adam(p: Params, backbone: Optional[str] = None,
            target_epsilon: Optional[float] = None) -> RunConfig:
    """The backbone trained by DP-Adam (Adam's update on DP-SGD's noisy gradient)."""
    return _dp(p, "adam", backbone, target_epsilon)


@_recipe("dp-sgd-lesion", "DP-SGD, lesion-level", DP)
def dp_sgd_lesion(p: Params, backbone: Optional[str] = None,
                  target_epsilon: Optional[float] = None) -> RunConfig:
    """DP-SGD whose privacy unit is a lesion (all its images): lesions are Poisson-sampled and
    each lesion's mean gradient is clipped (user-level DP-SGD)."""
    return dp_sgd(p, backbone, target_epsilon).replace(privacy_unit="lesion")


@_recipe("dp-adam-lesion", "DP-Adam, lesion-level", DP)
def dp_adam_lesion(p: Params, backbone: Optional[str] = None,
                   target_epsilon: Optional[float] = None) -> RunConfig:
    """DP-Adam with a lesion as the privacy unit (see dp-sgd-lesion)."""
    return dp_adam(p, backbone, target_epsilon).replace(privacy_unit="lesion")


# --------------------------------------------------------------------------- the proposed technique
def _technique(p: Params, **over: Any) -> RunConfig:
    """The levers every generation of the technique shares: a data-independent front end, a
    linear head by DP-SGD (momentum 0.9), logit adjustment by a noisy class histogram
    (counted in eps), EMA of the weights."""
    return RunConfig(**{"dp": True, "target_epsilon": p.epsilons[0], "logit_adjust": True,
                        "ema_decay": p.proposed_ema, "optimizer": "sgd", "lr": p.proposed_lr,
                        "momentum": 0.9, "batch_size": p.proposed_batch_size,
                        "epochs": p.proposed_epochs, "augment_flips": False,
                        "augment_rot90": False, **common(p), **over})


@_recipe("proposed", "proposed (dermoscopy features, private normalisation, DP-SGD)", PROPOSED)
def proposed(p: Params) -> RunConfig:
    """Shades of Gray colour constancy per image, then the dermoscopy front end (colour and hue
    histograms, colour moments, texture; each block of unit norm), standardised by privately
    released feature statistics (counted in eps), linear head by DP-SGD, logit adjustment by a
    noisy class histogram (counted in eps), EMA."""
    return _technique(p, features="derm", backbone="derm_linear", feature_norm="private",
                      colour_constancy="shades-of-gray",
                      image_size=p.proposed_image_size or p.image_size)


@_recipe("proposed-colour", "first generation (colour histograms, DP-SGD)", PROPOSED)
def proposed_colour(p: Params) -> RunConfig:
    """The technique's first generation: colour-histogram front end, linear head by DP-SGD,
    logit adjustment by a noisy class histogram (counted in eps), EMA of the weights."""
    def own(name: str) -> Any:
        v = getattr(p, f"proposed_colour_{name}")
        return getattr(p, f"proposed_{name}") if v is None else v

    return _technique(p, features="colour", backbone="colour_linear", lr=own("lr"),
                      epochs=own("epochs"), ema_decay=own("ema"))


@_recipe("proposed-nonprivate", "proposed recipe, non-private", ("seed",))
def proposed_nonprivate(p: Params) -> RunConfig:
    """The proposed recipe without privacy (exact class prior and feature statistics): its
    ceiling."""
    return proposed(p).replace(dp=False, target_epsilon=None, feature_norm="exact")


@_recipe("proposed-colour-nonprivate", "first generation, non-private", ("seed",))
def proposed_colour_nonprivate(p: Params) -> RunConfig:
    """The first generation without privacy (exact class prior)."""
    return proposed_colour(p).replace(dp=False, target_epsilon=None)


@_recipe("ablation/no-logit-adjustment", "without logit adjustment", PROPOSED)
def ablation_no_logit_adjustment(p: Params) -> RunConfig:
    """Plain cross-entropy, no histogram release: more of the budget for the other releases."""
    return proposed(p).replace(logit_adjust=False)


@_recipe("ablation/no-colour-constancy", "without colour constancy", PROPOSED)
def ablation_no_colour_constancy(p: Params) -> RunConfig:
    """The images as stored, not divided by their Shades of Gray illuminant estimate: the
    descriptor then also sees each acquisition site's colour cast."""
    return proposed(p).replace(colour_constancy="none")


@_recipe("ablation/no-ema", "without EMA", PROPOSED)
def ablation_no_ema(p: Params) -> RunConfig:
    """The last iterate instead of the EMA of the weights."""
    return proposed(p).replace(ema_decay=None)


@_recipe("ablation/no-private-normalisation", "without private normalisation", PROPOSED)
def ablation_no_private_normalisation(p: Params) -> RunConfig:
    """The dermoscopy features as the front end gives them (unit-norm blocks), no statistics
    released: the whole budget goes to the histogram and the gradient steps."""
    return proposed(p).replace(feature_norm="none")


@_recipe("ablation/profile-resolution", "front end at the profile's image size", PROPOSED)
def ablation_profile_resolution(p: Params) -> RunConfig:
    """The dermoscopy features of the images at the profile's ``image_size`` instead of
    ``proposed_image_size`` (the same recipe where the two are equal)."""
    return proposed(p).replace(image_size=p.image_size)


@_recipe("ablation/no-front-end", "without front end (pixels)", PROPOSED)
def ablation_no_front_end(p: Params, target_epsilon: Optional[float] = None) -> RunConfig:
    """The end-to-end backbone on pixels at the DP-SGD schedule (its rate, batch, epochs and
    EMA decay) and the profile's image size (as the DP baselines; a network's step costs ~4x at
    twice the side), keeping the technique's logit adjustment."""
    base = dp_sgd(p, None, target_epsilon)  # the DP-SGD baseline at this budget
    return proposed(p).replace(features="pixels", backbone=base.backbone, feature_norm="none",
                               image_size=base.image_size, lr=base.lr,
                               batch_size=base.batch_size, epochs=base.epochs,
                               ema_decay=base.ema_decay, augment_translate=base.augment_translate,
                               augment_rotate=base.augment_rotate,
                               augment_zoom=base.augment_zoom,
                               augment_flips=True, augment_rot90=True)


@_recipe("ablation/scatter-front-end", "scattering front end instead", PROPOSED)
def ablation_scatter_front_end(p: Params) -> RunConfig:
    """Wavelet scattering coefficients (kymatio) and their linear head instead of the
    dermoscopy features, with dihedral views in feature space, at the profile's image size
    (81 (S/4)^2 coefficients: they grow with the side; compare with
    ``ablation/profile-resolution``)."""
    return proposed(p).replace(features="scatter", backbone="scatter_linear", feature_norm="none",
                               image_size=p.image_size,
                               augment_flips=True, augment_rot90=True)


#: every resampling of the image off (shift, rotation, zoom): for the runs that see their
#: images as they are (MpLe's, below) or as the attacks chapter has measured them
_NO_RESAMPLING = dict(augment_translate=0, augment_rotate=False, augment_zoom=0.0)


# --------------------------------------------------------------------------- MpLe (chapter 08)
#: a morphed sample cannot be flipped, rotated or colour-jittered without the key: the MpLe
#: runs, and the plain run they are compared with, see each image as it is
_NO_AUGMENTATION = dict(augment_flips=False, augment_rot90=False, augment_color=0.0,
                        **_NO_RESAMPLING, mixing="none")


@_recipe("mple/plain-no-augmentation", "plain, no augmentation", E2E)
def mple_plain_no_augmentation(p: Params) -> RunConfig:
    """The non-private Adam reference without augmentation: what MpLe's service provider
    could reach at best (the same images, unaugmented, every layer trained)."""
    return nonprivate_adam(p).replace(**_NO_AUGMENTATION)


@_recipe("mple/nonprivate", "MpLe (morphed data)", E2E)
def mple_nonprivate(p: Params) -> RunConfig:
    """The non-private Adam reference trained by MpLe's service provider on morphed rows
    (``dpskin_core.mple.train``): the first layer frozen in C_ac, the rest trained."""
    return mple_plain_no_augmentation(p).replace(features="given")


@_recipe("mple/dp-sgd", "MpLe + DP-SGD", DP)
def mple_dp_sgd(p: Params, backbone: Optional[str] = None,
                target_epsilon: Optional[float] = None) -> RunConfig:
    """DP-SGD by MpLe's service provider on morphed rows (the privacy unit: one image)."""
    return dp_sgd(p, backbone, target_epsilon).replace(features="given", **_NO_AUGMENTATION)


# --------------------------------------------------------------------------- attacked models
#: the attacked end-to-end models train at a constant rate for a fixed number of epochs,
#: without colour jitter, shifts, rotations or zoom (as the attacks chapter has measured them)
_PLAIN = dict(early_stopping_patience=None, warmup_epochs=0.0, lr_schedule="constant",
              augment_color=0.0, **_NO_RESAMPLING, mixing="none")


def _attack(cfg: RunConfig, p: Params) -> RunConfig:
    return cfg.replace(accountant=p.attack_accountant) if cfg.dp else cfg


@_recipe("attack/nonprivate", "non-private", ("seed",))
def attack_nonprivate(p: Params) -> RunConfig:
    """The non-private SGD recipe for ``attack_epochs`` at a constant rate, without early
    stopping (the attacked model is the last iterate)."""
    return nonprivate_sgd(p).replace(epochs=p.attack_epochs or p.epochs, **_PLAIN)


@_recipe("attack/nonprivate-no-augmentation", "non-private (no augmentation)", ("seed",))
def attack_nonprivate_no_augmentation(p: Params) -> RunConfig:
    """A non-private model that fits its training images: no flips or rotations, and the
    ``overfit_*`` schedule (more, smaller steps; optimiser of choice)."""
    lr = p.lr_adam if p.overfit_optimizer == "adam" else p.lr_sgd
    return nonprivate_sgd(p).replace(
        **_PLAIN,
        optimizer=p.overfit_optimizer, lr=lr, augment_flips=False, augment_rot90=False,
        epochs=p.overfit_epochs or p.attack_epochs or p.epochs,
        batch_size=p.overfit_batch_size or p.batch_size)


def _plain_dp(cfg: RunConfig) -> RunConfig:
    """The plain DP baseline (no levers, no shifts or rotations), as the attacks chapter
    measures it."""
    return cfg.replace(logit_adjust=False, la_tau=1.0, la_tau_kept=0.0, ema_decay=None,
                       aug_mult=1, **_NO_RESAMPLING)


@_recipe("attack/dp-sgd", "DP-SGD", PROPOSED)
def attack_dp_sgd(p: Params) -> RunConfig:
    """DP-SGD for ``attack_epochs`` at the non-private batch size (the attacked models train on
    half the attack pool), noise calibrated by ``attack_accountant``."""
    return _attack(_plain_dp(dp_sgd(p)).replace(epochs=p.attack_epochs or p.epochs,
                                                batch_size=p.batch_size), p)


@_recipe("attack/dp-adam", "DP-Adam", PROPOSED)
def attack_dp_adam(p: Params) -> RunConfig:
    """DP-Adam for ``attack_epochs`` at the non-private batch size, noise calibrated by
    ``attack_accountant``."""
    return _attack(_plain_dp(dp_adam(p)).replace(epochs=p.attack_epochs or p.epochs,
                                                 batch_size=p.batch_size), p)


@_recipe("attack/proposed", "proposed", PROPOSED)
def attack_proposed(p: Params, n_train: Optional[int] = None) -> RunConfig:
    """The proposed recipe with its batch scaled to the attacked model's training set (half the
    attack pool of an ``n_train``-image split): the same sampling rate as the full recipe."""
    if n_train is None:
        raise ConfigError("recipe 'attack/proposed' needs n_train (images in the training split)")
    pool = p.attack_pool_size or n_train
    batch = min(p.proposed_batch_size, max(1, round(p.proposed_batch_size * (pool // 2) / n_train)))
    # at the profile's image size: the chapter attacks every model with the same images
    return _attack(proposed(p).replace(batch_size=batch, image_size=p.image_size), p)


#: the attacked models of chapter 05, by the label its tables use
ATTACK_MODELS = {"non-private": "attack/nonprivate",
                 "non-private (no augmentation)": "attack/nonprivate-no-augmentation",
                 "DP-SGD": "attack/dp-sgd", "DP-Adam": "attack/dp-adam",
                 "proposed": "attack/proposed"}


def recipe_label(name: Optional[str]) -> str:
    """Human label of a recipe name (the name itself when unknown)."""
    return RECIPES.get(name).label if name in RECIPES else str(name)


__all__ = ["ATTACK_MODELS", "DP_OPTIMIZERS", "Params", "RECIPES", "Recipe", "common", "recipe_label"]
