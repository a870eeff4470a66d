"""Client-level DP: DP-FedAvg (McMahan et al. 2018) with Flower's server-side clipping wrapper.

Each round the server samples every client independently with probability ``q`` (Poisson,
from the server's secret seed), asks the sampled ones for an update, clips each update
``w_k - w`` to L2 norm ``C`` and adds Gaussian noise of std ``sigma * C`` to their sum, then
divides by the *expected* number of sampled clients ``q N`` (the fixed-denominator estimator:
dividing by the number actually sampled would release that number, which depends on whether
a client took part). Clipping and noise are Flower's own
(``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` around a FedAvg
whose every client has weight 1: FedAvg's example-count weighting would let one client's
share exceed ``C / m`` and break the calibration); the rescaling to ``q N`` and the
accountant are this module's. Flower draws its noise from NumPy's global generator: here that
generator is set, for the call only, from the server's secret and the round, so the noise is
not derivable from anything published and a resumed round repeats it exactly.

Privacy: the unit is one client (all its images), adjacency add/remove one client, each
round one subsampled Gaussian mechanism with (sigma, q); eps over the rounds by the project's
accountant (:func:`dpskin_core.training.privacy.epsilon`, RDP by default), sigma calibrated
from the target before the first round. Which clients were sampled is part of the secret
(the amplification by sampling assumes it): the record does not say who trained when.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..training import privacy
from ..training.checkpoint import StateDict

History = List[Tuple[float, float, int]]


@dataclass(frozen=True)
class ClientDP:
    """The client-level guarantee a federation targets, and its mechanism's knobs."""

    target_epsilon: float
    delta: float = 1e-5
    clipping_norm: float = 1.0     # C: L2 norm of one client's update w_k - w (all weights)
    sample_rate: float = 1.0       # q: each client's probability of taking part in a round
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        for name in ("target_epsilon", "delta", "clipping_norm", "sample_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise ConfigError(f"client_dp {name} must be a finite number > 0, got {v!r}")
        if self.sample_rate > 1:
            raise ConfigError(f"client_dp sample_rate must be in (0, 1], got {self.sample_rate!r}")
        privacy.check_epsilon_delta(self.target_epsilon, self.delta)
        privacy.ACCOUNTANTS.get(self.accountant)


def noise_multiplier(dp: ClientDP, rounds: int) -> float:
    """sigma reaching ``dp.target_epsilon`` after ``rounds`` rounds (one sampled Gaussian
    mechanism each, sample rate q)."""
    return privacy.noise_multiplier_for(dp.target_epsilon, dp.delta, dp.sample_rate, int(rounds),
                                        dp.accountant)


def history(dp: ClientDP, sigma: float, rounds_done: int) -> History:
    """The accountant's history after ``rounds_done`` rounds."""
    return [(float(sigma), float(dp.sample_rate), int(rounds_done))]


def epsilon(dp: ClientDP, sigma: float, rounds_done: int) -> float:
    """eps per client after ``rounds_done`` rounds."""
    return float(privacy.epsilon(history(dp, sigma, rounds_done), dp.delta, dp.accountant))


def _round_seed(secret: int, rnd: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(secret), int(rnd), int(stream)])


def sample_clients(names: Sequence[str], q: float, secret: int, rnd: int) -> List[str]:
    """Round ``rnd``'s clients: each of ``names`` (sorted) independently with probability q."""
    u = np.random.default_rng(_round_seed(secret, rnd, 0)).random(len(names))
    return [n for n, x in zip(sorted(names), u) if x < q]


@contextmanager
def _numpy_global(seed: np.random.SeedSequence) -> Iterator[None]:
    """NumPy's global generator set from ``seed`` for the block, then put back as it was."""
    saved = np.random.get_state()
    np.random.set_state(np.random.RandomState(np.random.MT19937(seed)).get_state())
    try:
        yield
    finally:
        np.random.set_state(saved)


def _replies(updates: Sequence[StateDict]):
    from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

    def meta(i: int) -> Metadata:  # replies built in process: Flower's fields, none read here
        return Metadata(run_id=0, message_id=str(i), src_node_id=i + 1, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9,
                        message_type=MessageType.TRAIN)
    return [Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=u),
                                "metrics": MetricRecord({"weight": 1})}), metadata=meta(i))
            for i, u in enumerate(updates)]


def aggregate(global_weights: StateDict, updates: Sequence[StateDict], dp: ClientDP, sigma: float,
              n_clients: int, secret: int, rnd: int) -> StateDict:
    """The DP-FedAvg release of round ``rnd``: ``w + (sum_k clip_C(w_k - w) + N(0, (sigma C)^2))
    / (q n_clients)``, clipping and noise by Flower's wrapper, noise from the secret."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

    if n_clients < 1:
        raise ConfigError("client-level DP needs at least one client")
    expected = dp.sample_rate * n_clients
    keys = list(global_weights)
    for k in keys:
        if not global_weights[k].dtype.is_floating_point:
            raise ConfigError(f"client-level DP: weight {k!r} is not floating point (a BatchNorm "
                              "counter?); only float weights can be clipped and noised")
    w = {k: v.detach().cpu().float() for k, v in global_weights.items()}
    ups = [{k: u[k].detach().cpu().float() for k in keys} for u in updates]
    # an update equal to the global model adds nothing to the sum, and Flower's clipping
    # divides by its norm (ZeroDivisionError): leave it out, the sum is the same
    ups = [u for u in ups if any(bool((u[k] != w[k]).any()) for k in keys)]
    m = len(ups)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower logs every clip and noise draw at INFO
    try:
        with _numpy_global(_round_seed(secret, rnd, 1)):
            if m == 0:  # nobody sampled: the release is the noise alone
                noise = [np.zeros(tuple(v.shape), np.float32) for v in w.values()]
                add_gaussian_noise_inplace(noise, sigma * dp.clipping_norm)
                delta = {k: torch.from_numpy(z) / expected for k, z in zip(keys, noise)}
            else:
                strategy = DifferentialPrivacyServerSideFixedClipping(
                    FedAvg(weighted_by_key="weight"), sigma, dp.clipping_norm, m)
                strategy.current_arrays = ArrayRecord(torch_state_dict=w)
                arrays, _ = strategy.aggregate_train(rnd, _replies(ups))
                if arrays is None:
                    raise ConfigError(f"round {rnd}: Flower's DP wrapper refused the updates")
                out = arrays.to_torch_state_dict()
                # mean over m (Flower's, noise sigma C / m) -> sum over q N, the fixed denominator
                delta = {k: (out[k].float() - w[k]) * (m / expected) for k in keys}
    finally:
        flwr_log.setLevel(level)
    return {k: (w[k] + delta[k]).to(global_weights[k].dtype) for k in keys}


__all__ = ["ClientDP", "aggregate", "epsilon", "history", "noise_multiplier", "sample_clients"]
