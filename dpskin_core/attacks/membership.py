"""Membership inference: was this image in the model's training set?

An *experiment* trains the target and the shadow models (all through
:func:`dpskin_core.training.run`, so shadows follow the target's recipe exactly, DP or not)
and queries them once into a :class:`MIAData` of logits; the attacks are then pure functions
of those arrays (``loss_threshold``, ``lira_offline``, ``lira_online``: :data:`MEMBERSHIP_ATTACKS`),
scored by :func:`mia_metrics`. Scores are oriented so that higher means "member"::

    exp = membership_experiment(cfg, data, "runs/mia", n_shadows=8)
    exp.results["lira_offline"].auc, exp.results["lira_offline"].tpr_at_fpr[0.001]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from scipy.special import log_ndtr
from tqdm.auto import tqdm

from ..data import DataBundle
from ..errors import ConfigError
from ..registry import Registry
from ..training import RunConfig
from ..training.metrics import binary_auc
from .arrays import as_array, same_length
from .signals import cross_entropy, logit_confidence
from .victims import TrainedModel, train_on, with_train

PathLike = Union[str, Path]

#: name -> f(MIAData, **params) -> per-example scores (higher = member)
MEMBERSHIP_ATTACKS: Registry[Callable[..., np.ndarray]] = Registry("membership attack")


# --------------------------------------------------------------------------------------
# validation: every bad input raises ConfigError naming the field
# --------------------------------------------------------------------------------------
def _membership_mask(members: Any, n: Optional[int] = None) -> np.ndarray:
    m = as_array("members", members, 1)
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ConfigError("members must be booleans (or 0/1): True for training members")
        m = m.astype(bool)
    if n is not None and len(m) != n:
        raise ConfigError(f"mismatched lengths: members has {len(m)}, scores have {n}")
    if not m.any():
        raise ConfigError("members has no member (True) entries: the member set is empty")
    if m.all():
        raise ConfigError("members has no non-member (False) entries: the non-member set is empty")
    return m


# --------------------------------------------------------------------------------------
# membership inference: signals and attacks (pure functions of logits)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MIAData:
    """What a membership attacker observes on a pool of N labelled examples.

    target_logits: (N, V, C) outputs of the target on V query views of each example;
    labels: (N,); shadow_logits: (S, N, V, C) outputs of S shadow models on the same
    queries; shadow_in: (S, N) bool, True where example n was in shadow s's training set.
    """

    target_logits: np.ndarray
    labels: np.ndarray
    shadow_logits: Optional[np.ndarray] = None
    shadow_in: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        t = as_array("target_logits", self.target_logits, 3, np.float64)
        y = as_array("labels", self.labels, 1)
        same_length(target_logits=t, labels=y)
        if y.min() < 0 or y.max() >= t.shape[2]:
            raise ConfigError(f"labels must be in [0, {t.shape[2]}), got {y.min()}..{y.max()}")
        if (self.shadow_logits is None) != (self.shadow_in is None):
            raise ConfigError("shadow_logits and shadow_in must be given together")
        if self.shadow_logits is not None:
            s = as_array("shadow_logits", self.shadow_logits, 4, np.float64)
            m = as_array("shadow_in", self.shadow_in, 2).astype(bool)
            if s.shape[1:] != t.shape:
                raise ConfigError(f"shadow_logits has shape {s.shape}; expected (S, {t.shape[0]}, "
                                  f"{t.shape[1]}, {t.shape[2]}) to match target_logits")
            if m.shape != s.shape[:2]:
                raise ConfigError(f"shadow_in has shape {m.shape}; expected {s.shape[:2]}")


def _shadow_confidences(d: MIAData, attack: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if d.shadow_logits is None:
        raise ConfigError(f"attack {attack!r} needs shadow models: MIAData.shadow_logits is None")
    target = logit_confidence(d.target_logits, d.labels)                     # (N, V)
    shadow = logit_confidence(np.moveaxis(d.shadow_logits, 0, 1), d.labels)  # (N, S, V)
    return target, shadow, np.asarray(d.shadow_in, bool).T                  # (N, S)


def _gaussian_fit(conf: np.ndarray, mask: np.ndarray, fix_variance: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Per-example, per-view median and std of ``conf`` (N, S, V) over shadows where ``mask``.

    Examples without any such shadow fall back to the median over all examples. With
    ``fix_variance`` (Carlini et al.'s choice below ~64 shadows) one std is pooled over the
    examples' deviations from their own medians (n_i - 1 degrees of freedom each); with a
    single shadow per example there are none, and the std of all the confidences is used,
    as Carlini et al.'s code does. Without it, each example's own std (pooled if n_i < 2).
    """
    if not mask.any():
        raise ConfigError("no shadow model has this side (IN or OUT) for any example")
    c = np.where(mask[:, :, None], conf, np.nan)
    has = mask.any(1)
    mu = np.full((conf.shape[0], conf.shape[2]), np.nan)
    mu[has] = np.nanmedian(c[has], axis=1)
    mu[~has] = np.nanmedian(c[has].reshape(-1, conf.shape[2]), axis=0)
    dev = c - mu[:, None, :]
    n = mask.sum(1)[:, None]                                # shadows per example
    dof = np.maximum(n - 1, 0).sum()
    pooled = (np.sqrt(np.nansum(dev ** 2, axis=(0, 1)) / dof) if dof > 0
              else np.nanstd(c.reshape(-1, conf.shape[2]), axis=0))  # (V,)
    if fix_variance:
        sd = np.broadcast_to(pooled, mu.shape).copy()
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.sqrt(np.nansum(dev ** 2, axis=1) / np.maximum(n - 1, 1))
        sd = np.where(n >= 2, sd, pooled)
    return mu, np.maximum(sd, 1e-6)  # a degenerate fit must not divide by zero


@MEMBERSHIP_ATTACKS.register("loss_threshold")
def loss_threshold(d: MIAData) -> np.ndarray:
    """Yeom et al. (2018): members have lower loss. Score = -cross-entropy, averaged over views.

    Yeom's fixed threshold (the mean training loss) is one point of the ROC curve that
    :func:`mia_metrics` sweeps; its best point is the balanced attack accuracy.
    """
    return -cross_entropy(d.target_logits, d.labels).mean(axis=1)


@MEMBERSHIP_ATTACKS.register("lira_offline")
def lira_offline(d: MIAData, fix_variance: bool = True) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): only OUT shadows, one-sided Gaussian test.

    Per example and view, fit N(mu_out, sd_out) to the logit-scaled confidences of the
    shadows that did not train on it; score = mean over views of log P[Z <= conf_target].
    """
    target, shadow, shadow_in = _shadow_confidences(d, "lira_offline")
    mu, sd = _gaussian_fit(shadow, ~shadow_in, fix_variance)
    return log_ndtr((target - mu) / sd).mean(axis=1)


@MEMBERSHIP_ATTACKS.register("lira_online")
def lira_online(d: MIAData, fix_variance: bool = True) -> np.ndarray:
    """Online LiRA: likelihood ratio of Gaussians fitted to IN and to OUT shadows' confidences,
    log N(conf; mu_in, sd_in) - log N(conf; mu_out, sd_out), averaged over views."""
    target, shadow, shadow_in = _shadow_confidences(d, "lira_online")
    mu_in, sd_in = _gaussian_fit(shadow, shadow_in, fix_variance)
    mu_out, sd_out = _gaussian_fit(shadow, ~shadow_in, fix_variance)

    def logpdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
        return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)

    return (logpdf(target, mu_in, sd_in) - logpdf(target, mu_out, sd_out)).mean(axis=1)


def membership_scores(name: str, d: MIAData, **params: Any) -> np.ndarray:
    """Scores (N,) of the membership attack ``name`` (higher = more likely a member)."""
    if name not in MEMBERSHIP_ATTACKS:
        raise ConfigError(f"attack {name!r} is not a membership attack; membership attacks: "
                          f"{', '.join(MEMBERSHIP_ATTACKS.names())}")
    return np.asarray(MEMBERSHIP_ATTACKS.get(name)(d, **params), dtype=np.float64)


# --------------------------------------------------------------------------------------
# membership inference: metrics
# --------------------------------------------------------------------------------------
def roc_curve(scores: np.ndarray, members: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of "member if score >= t" over all thresholds t: (fpr, tpr, thresholds).

    Starts at (0, 0) (threshold +inf) and ends at (1, 1); tied scores move together.
    """
    s = as_array("scores", scores, 1, np.float64)
    m = _membership_mask(members, len(s))
    if not np.isfinite(s).all():
        raise ConfigError("scores contain NaN or infinite values")
    order = np.argsort(-s, kind="mergesort")
    s, m = s[order], m[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each tie run
    tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
    tpr = np.r_[0.0, tp / m.sum()]
    fpr = np.r_[0.0, fp / (~m).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


@dataclass
class MIAResult:
    """Metrics of one membership attack; ``fpr``/``tpr`` is the ROC curve (log-log plots)."""

    attack: str
    auc: float
    balanced_accuracy: float          # best threshold: max over the ROC of (TPR + 1 - FPR) / 2
    tpr_at_fpr: Dict[float, float]    # {0.001: TPR at FPR <= 0.1 %, 0.01: ...}
    fpr: np.ndarray
    tpr: np.ndarray
    n_members: int
    n_nonmembers: int

    def summary(self) -> Dict[str, Any]:
        """JSON-ready scalars (no curve)."""
        out: Dict[str, Any] = {"attack": self.attack, "auc": self.auc,
                               "balanced_accuracy": self.balanced_accuracy,
                               "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
                               # below this FPR the curve has no resolution (one false positive)
                               "min_measurable_fpr": 1.0 / self.n_nonmembers}
        out.update({f"tpr_at_fpr_{f:g}": t for f, t in self.tpr_at_fpr.items()})
        return out


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR <= ``target`` (Carlini et al.'s convention)."""
    return float(tpr[fpr <= target + 1e-12].max())


def mia_metrics(scores: np.ndarray, members: np.ndarray, attack: str = "",
                fprs: Sequence[float] = (0.001, 0.01)) -> MIAResult:
    """AUC, balanced attack accuracy, TPR at each FPR in ``fprs`` and the ROC curve."""
    fpr, tpr, _ = roc_curve(scores, members)
    m = _membership_mask(members)
    return MIAResult(attack, binary_auc(m, np.asarray(scores, np.float64)),
                     float(np.max((tpr + 1 - fpr) / 2)),
                     {float(f): tpr_at_fpr(fpr, tpr, f) for f in fprs}, fpr, tpr,
                     int(m.sum()), int((~m).sum()))


# --------------------------------------------------------------------------------------
# membership inference: the experiment (target + shadows on random halves of a pool)
# --------------------------------------------------------------------------------------
def half_masks(n_models: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n_models, n) bool: each example IN for exactly floor(n_models / 2) models, chosen at
    random (Carlini et al.'s design), so every model trains on about half the pool and every
    example has both IN and OUT shadows."""
    if n_models < 2:
        raise ConfigError(f"n_shadows must be >= 2 (IN and OUT models per example), got {n_models}")
    return np.argsort(rng.random((n_models, n)), axis=0) < n_models // 2


@dataclass
class MembershipExperiment:
    """A trained target, its shadows, the attacker's view (``data``) and the attacks' results."""

    target: TrainedModel
    target_result: Any                 # RunResult of the target
    members: np.ndarray                # (N,) bool: target's training set within the pool
    shadow_in: np.ndarray              # (S, N) bool
    data: MIAData
    scores: Dict[str, np.ndarray]
    results: Dict[str, MIAResult]
    shadow_results: List[Any] = field(default_factory=list)
    pool_index: Optional[np.ndarray] = None  # (N,) rows of data.x_train forming the pool

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([r.summary() for r in self.results.values()])

    def member_images(self, data: DataBundle) -> Tuple[np.ndarray, np.ndarray]:
        """The target's training images and labels (``data``: the bundle of the experiment)."""
        if self.pool_index is None:
            raise ConfigError("this experiment did not record its pool (pool_index is None)")
        idx = self.pool_index[self.members]
        return data.x_train[idx], data.y_train[idx]


def membership_experiment(
    cfg: RunConfig, data: DataBundle, runs_root: PathLike, *, n_shadows: int = 8,
    attacks: Sequence[str] = ("loss_threshold", "lira_offline", "lira_online"),
    views: int = 1, pool_size: Optional[int] = None, seed: int = 0,
    attack_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> MembershipExperiment:
    """Train a target on a random half of the pool and ``n_shadows`` shadows on random halves,
    all with ``cfg`` (shadow s with seed ``cfg.seed + 1 + s``), and run the ``attacks``.

    The pool is the training split of ``data`` (a seeded random ``pool_size`` subset of it
    if given); val/test keep their role (model selection, reporting). Members are the pool
    examples in the target's half, non-members the rest: a balanced 50/50 prior.
    """
    for a in attacks:
        if a not in MEMBERSHIP_ATTACKS:
            raise ConfigError(f"attacks: {a!r} is not a membership attack; membership attacks: "
                              f"{', '.join(MEMBERSHIP_ATTACKS.names())}")
    rng = np.random.default_rng([seed, 5])
    n_all = len(data.y_train)
    if pool_size is not None and not 2 <= pool_size <= n_all:
        raise ConfigError(f"pool_size must be in 2..{n_all}, got {pool_size!r}")
    idx = np.sort(rng.permutation(n_all)[:pool_size]) if pool_size else np.arange(n_all)
    x, y = data.x_train[idx], data.y_train[idx]
    members = rng.permutation(len(y)) < len(y) // 2
    shadow_in = half_masks(n_shadows, len(y), rng)
    target_res, target = train_on(cfg.replace(name=f"{cfg.name} mia-target"),
                                  with_train(data, x[members], y[members], "target"), runs_root)
    shadow_logits, shadow_results = [], []
    for s in tqdm(range(n_shadows), desc="shadow models", disable=not cfg.progress):
        keep = shadow_in[s]
        res, model = train_on(cfg.replace(seed=cfg.seed + 1 + s, name=f"{cfg.name} shadow {s}"),
                              with_train(data, x[keep], y[keep], f"shadow{s}"), runs_root)
        shadow_results.append(res)
        shadow_logits.append(model.view_logits(x, views))
    d = MIAData(target.view_logits(x, views), y, np.stack(shadow_logits), shadow_in)
    params = attack_params or {}
    scores = {a: membership_scores(a, d, **params.get(a, {})) for a in attacks}
    res = {a: mia_metrics(s, members, a) for a, s in scores.items()}
    return MembershipExperiment(target, target_res, members, shadow_in, d, scores, res,
                                shadow_results, idx)


# --------------------------------------------------------------------------------------
# a released model against its own training and held-out data (no shadow models)
# --------------------------------------------------------------------------------------
def heldout_members(n_train: int, n_heldout: int, seed: int) -> np.ndarray:
    """As many training indices (random, from the public ``seed``) as held-out examples: the
    members of a balanced game whose non-members are the first ``len`` held-out ones."""
    return np.random.default_rng(seed).choice(n_train, min(n_train, n_heldout), replace=False)


def loss_threshold_game(logits_members: np.ndarray, y_members: np.ndarray,
                        logits_out: np.ndarray, y_out: np.ndarray) -> Dict[str, Any]:
    """Loss-threshold membership inference (Yeom et al. 2018) on a released model's logits
    (N, C), members against non-members: :meth:`MIAResult.summary`."""
    d = MIAData(np.concatenate([logits_members, logits_out])[:, None, :], np.r_[y_members, y_out])
    members = np.r_[np.ones(len(y_members), bool), np.zeros(len(y_out), bool)]
    return mia_metrics(membership_scores("loss_threshold", d), members, "loss_threshold").summary()


__all__ = ["MEMBERSHIP_ATTACKS", "MIAData", "MIAResult", "MembershipExperiment", "half_masks",
           "heldout_members", "loss_threshold_game",
           "lira_offline", "lira_online", "loss_threshold", "membership_experiment",
           "membership_scores", "mia_metrics", "roc_curve", "tpr_at_fpr"]
