"""Privacy math as pure typed functions.

The training loop composes a Poisson-subsampled Gaussian mechanism ``steps`` times with
sampling rate ``q`` and noise multiplier ``sigma`` (noise std = sigma * C, C the clipping
bound). Accountants turn such a history into an (eps, delta) guarantee:

* ``prv``: Opacus' PRV accountant (Gopi et al. 2021), an upper bound within ``eps_error``;
* ``rdp``: Opacus' RDP accountant (Mironov 2017), looser but classical;
* ``pld``: Google ``dp-accounting``'s privacy-loss-distribution accountant, used as the
  reference the other two are tested against.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` tuples, the format
Opacus accountants keep, so a checkpointed accountant state is just this list.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Sequence, Tuple

from ..errors import ConfigError
from ..registry import Registry

History = Sequence[Tuple[float, float, int]]

#: name -> f(history, delta) -> eps
ACCOUNTANTS: Registry[Callable[[History, float], float]] = Registry("accountant")
#: the accountants a training run may name (Opacus' PrivacyEngine keeps their state); ``pld``
#: is the reference they are tested against
TRAINING_ACCOUNTANTS = ("prv", "rdp")


def check_epsilon_delta(epsilon: float, delta: "float | None", n: "int | None" = None) -> None:
    """Raise :class:`ConfigError` unless 0 < eps < inf and 0 < delta < 1/n (n when known)."""
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not (
        0 < epsilon < math.inf
    ):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {epsilon!r}")
    if delta is None or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if n is not None and delta >= 1.0 / n:
        raise ConfigError(
            f"delta={delta:g} must be < 1/N = {1.0 / n:.3g} (N = {n} training images): a larger "
            "delta allows releasing a whole record"
        )


def sample_rate_for(batch_size: int, n: int) -> float:
    """Poisson sampling rate q, as Opacus derives it: 1 / (batches per epoch)."""
    if batch_size > n:
        raise ConfigError(f"batch_size={batch_size} is larger than the training set (N = {n})")
    return 1.0 / steps_per_epoch(batch_size, n)


def steps_per_epoch(batch_size: int, n: int) -> int:
    """Optimizer steps per epoch: ceil(N / B) (Opacus' DPDataLoader draws this many batches)."""
    return math.ceil(n / batch_size)


@ACCOUNTANTS.register("rdp")
def rdp_epsilon(history: History, delta: float) -> float:
    """eps of ``history`` at ``delta`` by Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@ACCOUNTANTS.register("prv")
def prv_epsilon(history: History, delta: float) -> float:
    """eps of ``history`` at ``delta`` by Opacus' PRV accountant (its upper bound)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@ACCOUNTANTS.register("pld")
def pld_epsilon(history: History, delta: float, value_discretization_interval: float = 1e-4) -> float:
    """eps of ``history`` at ``delta`` by Google dp-accounting's PLD accountant (reference)."""
    from dp_accounting import dp_event, pld

    acc = pld.PLDAccountant(value_discretization_interval=value_discretization_interval)
    for sigma, q, steps in history:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        acc.compose(dp_event.SelfComposedDpEvent(event, int(steps)))
    return float(acc.get_epsilon(delta))


def epsilon(history: History, delta: float, accountant: str = "prv") -> float:
    """eps spent by ``history`` at ``delta`` under the named accountant (0 for no steps)."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    return ACCOUNTANTS.get(accountant)(history, delta)


@functools.lru_cache(maxsize=256)  # pure and slow (~5 s of bisection): cache it
def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = 0.01,
    prefix: Tuple[Tuple[float, float, int], ...] = (),
) -> float:
    """Smallest sigma (to within ``tolerance`` in eps) with eps(sigma) <= target_epsilon.

    Bisection on sigma: eps is decreasing in sigma. The result always satisfies the
    target (we return the upper end of the bracket), so the reported eps is <= target.
    ``prefix`` holds releases made before training (e.g. a noisy class histogram, as
    ``(sigma_h, 1.0, 1)``): they are composed with the training steps, so the total is
    what meets the target.
    """
    check_epsilon_delta(target_epsilon, delta)
    if not 0 < sample_rate <= 1 or steps <= 0:
        raise ConfigError(f"need 0 < sample_rate <= 1 and steps > 0, got {sample_rate}, {steps}")

    def eps_of(sigma: float) -> float:
        return epsilon([*prefix, (sigma, sample_rate, steps)], delta, accountant)

    if prefix and epsilon(list(prefix), delta, accountant) >= target_epsilon:
        raise ConfigError(f"the releases before training already spend eps >= {target_epsilon}")
    lo, hi = 0.0, 1.0
    while eps_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"target_epsilon={target_epsilon} is unreachable (sigma > 1e4)")
    while True:
        mid = (lo + hi) / 2
        e = eps_of(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e < tolerance * target_epsilon:
                return hi
        if hi - lo < 1e-6:
            return hi


def history_summary(history: History) -> List[dict]:
    """JSON-friendly view of a history for run records."""
    return [{"noise_multiplier": float(s), "sample_rate": float(q), "steps": int(t)} for s, q, t in history]
