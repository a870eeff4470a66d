"""The privacy cost of choosing hyperparameters: private selection with a random number of
trials (Papernot & Steinke 2022, "Hyperparameter tuning with Renyi differential privacy").

A search that trains K candidates (each a DP run with accountant history ``h``), scores each
on data outside the training split, and releases only the best one, is itself DP when K is
drawn at random from the truncated negative binomial distribution D(eta, gamma) (eta = 0: the
logarithmic distribution; eta = 1: the geometric one). Their Theorem 2: if one trial is
(lam, e(lam))-RDP for every order lam, the selection is (lam, e'(lam))-RDP with

    e'(lam) = e(lam) + min over lam2 >= 1 of [(1 + eta) (1 - 1/lam2) e(lam2)
              + (1 + eta) log(1/gamma) / lam2] + log(E[K]) / (lam - 1),

converted to (eps, delta) as any RDP curve. Releasing the best of a *fixed* number of trials
would cost K times a trial; the random K costs about log E[K] / (lam - 1) plus a constant.
Pure functions only; the search that draws K and trains the trials lives with the studies.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from ..errors import ConfigError

History = Sequence[Tuple[float, float, int]]
#: RDP orders (Opacus' default grid, plus the orders near 1 the second term may want)
ORDERS: Tuple[float, ...] = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                  + [64.0, 128.0, 256.0])


def _check(eta: float, gamma: float) -> None:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > -1):
        raise ConfigError(f"eta must be a finite number > -1, got {eta!r}")
    if not (isinstance(gamma, (int, float)) and 0 < gamma < 1):
        raise ConfigError(f"gamma must be in (0, 1), got {gamma!r}")


def expected_trials(eta: float, gamma: float) -> float:
    """E[K] for K ~ D(eta, gamma) (Papernot & Steinke 2022, Definition 1)."""
    _check(eta, gamma)
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma ** eta))


def trial_probabilities(eta: float, gamma: float, k_max: int) -> np.ndarray:
    """P[K = k] for k = 1 .. k_max (the tail beyond k_max is left out)."""
    _check(eta, gamma)
    k = np.arange(1, k_max + 1, dtype=np.float64)
    if eta == 0:
        return (1 - gamma) ** k / (k * math.log(1 / gamma))
    # (1 - gamma)^k / (gamma^-eta - 1) * prod_{l=0}^{k-1} (l + eta) / (l + 1), in logs
    log_prod = np.cumsum(np.log((k - 1 + eta) / k))
    return np.exp(k * math.log(1 - gamma) + log_prod) / (gamma ** -eta - 1)


def draw_trials(eta: float, gamma: float, rng: np.random.Generator) -> int:
    """A draw of K ~ D(eta, gamma): how many candidates a private search trains. The draw
    must stay secret (it is part of the mechanism); ``rng`` should come from OS entropy."""
    mean = expected_trials(eta, gamma)
    k_max = int(max(1000, 200 * mean))
    p = trial_probabilities(eta, gamma, k_max)
    u = rng.random() * p.sum()
    return int(min(np.searchsorted(np.cumsum(p), u) + 1, k_max))


def gamma_for(expected: float, eta: float = 1.0) -> float:
    """The gamma for which E[K] = ``expected`` (bisection; E[K] decreases in gamma)."""
    if not (isinstance(expected, (int, float)) and expected > 1):
        raise ConfigError(f"the expected number of trials must be > 1, got {expected!r}")
    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(200):
        mid = (lo + hi) / 2
        if expected_trials(eta, mid) > expected:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def rdp_of(history: History, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP epsilon of ``history`` (Poisson-subsampled Gaussian steps) at each order."""
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        if steps > 0:
            total += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=int(steps),
                                            orders=list(orders)))
    return total


def selection_rdp(rdp: np.ndarray, eta: float, gamma: float,
                  orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of releasing the best of K ~ D(eta, gamma) trials, each with RDP curve ``rdp``
    (Theorem 2 of Papernot & Steinke 2022), at each order (inf at order 1)."""
    _check(eta, gamma)
    orders_arr, rdp = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    # the order lam2 of the second term is free: take the best
    # (lam2 = 1 leaves (1 + eta) log(1/gamma): the trial's KL divergence is finite)
    second = min(float(np.min((1 + eta) * (1 - 1 / orders_arr) * rdp
                              + (1 + eta) * math.log(1 / gamma) / orders_arr)),
                 (1 + eta) * math.log(1 / gamma))
    with np.errstate(divide="ignore"):
        return rdp + second + math.log(expected_trials(eta, gamma)) / (orders_arr - 1)


def selection_epsilon(history: History, delta: float, eta: float, gamma: float,
                      orders: Sequence[float] = ORDERS) -> float:
    """(eps at ``delta``) of a private search whose every trial has accountant ``history``."""
    return space_selection_epsilon([history], delta, eta, gamma, orders)


def space_selection_epsilon(histories: Sequence[History], delta: float, eta: float,
                            gamma: float, orders: Sequence[float] = ORDERS) -> float:
    """(eps at ``delta``) of a private search whose trial draws its hyperparameters at random
    from a space whose candidates have accountant ``histories``: one trial (draw, then train)
    is a mixture of the candidates, and the Renyi divergence of two mixtures with the same
    weights is at most the largest of the candidates' (joint quasi-convexity), so the trial's
    RDP curve is bounded by the pointwise maximum over the whole space (drawn or not)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not histories:
        raise ConfigError("a search space needs at least one candidate")
    keep = [i for i, a in enumerate(orders) if a > 1]
    trial = np.max(np.stack([rdp_of(h, orders) for h in histories]), axis=0)
    curve = selection_rdp(trial, eta, gamma, orders)
    eps, _ = get_privacy_spent(orders=[orders[i] for i in keep], rdp=curve[keep], delta=delta)
    return float(eps)


def single_run_epsilon(history: History, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """(eps at ``delta``) of one trial by the same RDP conversion (for comparison)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp_of(history, orders), delta=delta)
    return float(eps)


__all__ = ["ORDERS", "draw_trials", "expected_trials", "gamma_for", "rdp_of", "selection_epsilon",
           "selection_rdp", "single_run_epsilon", "space_selection_epsilon", "trial_probabilities"]
