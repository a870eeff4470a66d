"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023,
"Privacy auditing with one (1) training run", arXiv:2305.08846).

The experiment: draw m canaries and a secret sign S_i in {-1, +1} for each, uniformly and
independently; train once on the data plus the canaries with S_i = +1. Score every canary
on the trained model, guess "+1" (included) for the k+ highest scores, "-1" for the k-
lowest and abstain on the rest (r = k+ + k- guesses). Let v be the number of correct
guesses. Their Theorem 3.1 / Corollary 5.4: if training is (eps, delta)-DP (each canary a
record), then for every v

    P[V >= v] <= f(v) + 2 m delta * max_{i=1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

i.e. the guesser does no better than r coin flips of eps-randomized response, up to a
delta term. The right-hand side is the p-value of the hypothesis "(eps, delta)-DP" given v;
the audit reports the largest eps it rejects at level beta: a lower bound on the true eps
that holds with probability >= 1 - beta. A valid DP model gives a bound <= its eps; a
memorising non-private model gives a large one, though never above
:func:`max_lower_bound` (r, beta) (3.5 for r = 100 guesses at beta = 0.05): the number of
canaries caps what one run can show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from scipy.stats import binom

from ..constants import CLASSES
from ..data import DataBundle
from ..errors import ConfigError
from ..training import RunConfig
from .signals import logit_confidence
from .victims import TrainedModel, train_on, with_train

PathLike = Union[str, Path]


def _check_counts(m: int, r: int, v: int) -> None:
    for name, val in (("m", m), ("r", r), ("v", v)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
            raise ConfigError(f"{name} must be an int, got {val!r}")
    if not 0 <= v <= r <= m or m < 1:
        raise ConfigError(f"need 0 <= v <= r <= m and m >= 1 (v correct of r guesses, m canaries); "
                          f"got v={v}, r={r}, m={m}")


def _check_level(name: str, x: float, lo_open: bool = True) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not (
            (0 < x if lo_open else 0 <= x) and x < 1):
        raise ConfigError(f"{name} must be in {'(0' if lo_open else '[0'}, 1), got {x!r}")


def p_value_one_run(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of "the training run is (epsilon, delta)-DP" after v correct of r guesses on m
    canaries: the right-hand side of Steinke et al.'s bound above (capped at 1)."""
    _check_counts(m, r, v)
    _check_level("delta", delta, lo_open=False)
    if not epsilon >= 0:
        raise ConfigError(f"epsilon must be >= 0, got {epsilon!r}")
    q = 1.0 / (1.0 + math.exp(-epsilon))      # accuracy of eps-randomized response
    tail = float(binom.sf(v - 1, r, q))        # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # f(v - i) - f(v) = P[v - i <= W < v]
    return float(min(tail + 2 * m * delta * np.max(window / i), 1.0))


def eps_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05,
                    tol: float = 1e-6) -> float:
    """Largest eps such that (eps, delta)-DP is rejected at level ``beta`` by v correct of r
    guesses on m canaries (Steinke et al. 2023): with probability >= 1 - beta over the
    canaries' inclusion, the run's true eps is >= this value. 0 when nothing is rejected.

    The p-value grows with eps, so the rejected set is [0, eps*); bisection on eps returns
    the low end of the final bracket (conservative, within ``tol``).
    """
    _check_counts(m, r, v)
    _check_level("beta", beta)
    if p_value_one_run(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_one_run(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # unreachable for finite r: q^r < beta needs eps ~ log(r / beta)
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value_one_run(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_lower_bound(r: int, beta: float = 0.05) -> float:
    """The bound when all r guesses are right (delta = 0): log(q / (1 - q)), q = beta^(1/r).

    No model, however leaky, can be audited above this with r guesses: it sizes m and k.
    """
    q = beta ** (1.0 / r)
    return math.log(q / (1 - q))


def guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 (abstain) else."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ConfigError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ConfigError("scores contain NaN or infinite values")
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {k!r}")
    if k_pos + k_neg > s.size or k_pos + k_neg == 0:
        raise ConfigError(f"k_pos + k_neg = {k_pos + k_neg} must be in 1..{s.size} (the canaries)")
    order = np.argsort(-s, kind="mergesort")
    g = np.zeros(s.size, dtype=np.int8)
    g[order[:k_pos]] = 1
    g[order[s.size - k_neg:]] = -1
    return g


@dataclass
class AuditResult:
    """Outcome of a one-run audit (the best of the tried (k_pos, k_neg), Bonferroni-corrected)."""

    eps_lower_bound: float
    m: int                      # canaries
    r: int                      # guesses made
    v: int                      # correct guesses
    k_pos: int
    k_neg: int
    delta: float
    beta: float                 # overall confidence is 1 - beta
    n_tried: int = 1            # (k_pos, k_neg) pairs tried; each tested at beta / n_tried
    theoretical_epsilon: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("eps_lower_bound", "m", "r", "v", "k_pos", "k_neg",
                                               "delta", "beta", "n_tried", "theoretical_epsilon")}


def audit_scores(scores: np.ndarray, included: np.ndarray, k_pos: Union[int, Sequence[int]],
                 k_neg: Union[int, Sequence[int]], delta: float = 0.0,
                 beta: float = 0.05) -> AuditResult:
    """eps lower bound from canary ``scores`` (higher = "was trained on") and the secret
    ``included`` (bool, S_i = +1). Several ``k_pos``/``k_neg`` may be given: every pair is
    tested at level beta / (number of pairs) (Bonferroni), so the best bound stays valid."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included)
    if inc.ndim != 1 or inc.size == 0:
        raise ConfigError(f"included must be a non-empty 1-D array, got shape {inc.shape}")
    if inc.dtype != bool:
        if not np.isin(inc, (0, 1)).all():
            raise ConfigError("included must be booleans (or 0/1)")
        inc = inc.astype(bool)
    if s.shape != inc.shape:
        raise ConfigError(f"mismatched lengths: scores has {s.size}, included has {inc.size}")
    _check_level("beta", beta)
    pairs = [(int(a), int(b)) for a in np.atleast_1d(k_pos) for b in np.atleast_1d(k_neg)]
    sign = np.where(inc, 1, -1)
    best: Optional[AuditResult] = None
    for kp, kn in pairs:
        g = guesses(s, kp, kn)
        r, v = int((g != 0).sum()), int((g * sign > 0).sum())
        eps = eps_lower_bound(s.size, r, v, delta, beta / len(pairs))
        if best is None or eps > best.eps_lower_bound:
            best = AuditResult(eps, s.size, r, v, kp, kn, delta, beta, len(pairs))
    assert best is not None
    return best


# --------------------------------------------------------------------------------------
# canaries and the audit of a real training run
# --------------------------------------------------------------------------------------
def make_canaries(m: int, image_size: int, kind: str = "noise", seed: int = 0,
                  pool_x: Optional[np.ndarray] = None, pool_y: Optional[np.ndarray] = None):
    """m canary images (uint8, (m, S, S, 3)) and labels.

    ``kind="noise"``: random colours on a grid of 4 x 4 px cells, with uniform random labels
    (out of distribution, so a model fits them only by memorising; cells rather than single
    pixels because pooling averages pixel noise away, and a small CNN could not tell such
    canaries apart); ``"mislabel"``: images of ``pool_x`` (held out from training) with a
    uniformly drawn *wrong* label.
    """
    if not isinstance(m, int) or m < 2:
        raise ConfigError(f"m (number of canaries) must be an int >= 2, got {m!r}")
    rng = np.random.default_rng([seed, 11])
    c = len(CLASSES)
    if kind == "noise":
        cells = -(-image_size // 4)
        x = rng.integers(0, 256, (m, cells, cells, 3), dtype=np.uint8)
        x = x.repeat(4, axis=1).repeat(4, axis=2)[:, :image_size, :image_size]
        return np.ascontiguousarray(x), rng.integers(0, c, m).astype(np.int64)
    if kind == "mislabel":
        if pool_x is None or pool_y is None or len(pool_x) < m:
            raise ConfigError(f"kind='mislabel' needs pool_x/pool_y with >= m = {m} images")
        idx = rng.permutation(len(pool_x))[:m]
        y = (np.asarray(pool_y)[idx] + rng.integers(1, c, m)) % c  # never the true label
        return np.asarray(pool_x)[idx], y.astype(np.int64)
    raise ConfigError(f"kind={kind!r}; expected noise or mislabel")


@dataclass
class CanaryAudit:
    """A one-run audit of a real training run: the run, its canaries and the bound."""

    audit: AuditResult
    run_result: Any
    model: TrainedModel
    scores: np.ndarray
    included: np.ndarray

    def summary(self) -> Dict[str, Any]:
        return self.audit.summary()


def canary_audit(cfg: RunConfig, data: DataBundle, runs_root: PathLike, *, m: int = 500,
                 k_pos: Union[int, Sequence[int], None] = None,
                 k_neg: Union[int, Sequence[int], None] = None, kind: str = "noise",
                 beta: float = 0.05, seed: int = 0, pool_x: Optional[np.ndarray] = None,
                 pool_y: Optional[np.ndarray] = None) -> CanaryAudit:
    """Train ``cfg`` once on ``data``'s training split plus the included half of m canaries
    (through :func:`dpskin_core.run`; under DP each canary is a record like any other), score
    every canary by the logit-scaled confidence of its label, and bound eps.

    Default guesses: k_pos = k_neg = m // 10 (abstaining on most canaries is what makes the
    bound tight, Steinke et al. Sec. 6). The delta of the bound is ``cfg.delta``.
    """
    x_c, y_c = make_canaries(m, cfg.image_size, kind, seed, pool_x, pool_y)
    included = np.random.default_rng([seed, 13]).random(m) < 0.5
    k_pos = max(1, m // 10) if k_pos is None else k_pos
    k_neg = max(1, m // 10) if k_neg is None else k_neg
    bundle = with_train(data, np.concatenate([data.x_train, x_c[included]]),
                        np.concatenate([data.y_train, y_c[included]]), "audit")
    res, model = train_on(cfg.replace(name=f"{cfg.name} canary-audit"), bundle, runs_root)
    scores = logit_confidence(model.logits(x_c)[:, None], y_c)[:, 0]
    out = audit_scores(scores, included, k_pos, k_neg, cfg.delta or 0.0, beta)
    out.theoretical_epsilon = res.epsilon
    out.extra = {"kind": kind, "n_train_with_canaries": len(bundle.y_train)}
    return CanaryAudit(out, res, model, scores, included)


__all__ = ["AuditResult", "CanaryAudit", "audit_scores", "canary_audit", "eps_lower_bound",
           "guesses", "make_canaries", "max_lower_bound", "p_value_one_run"]
