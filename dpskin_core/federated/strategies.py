"""Server strategies: how the clients' updated weights become the next global model.

Pure functions of state dicts, shared by the in-process federation and Flower's ServerApp
(:mod:`.app`), so both compute the same global model. Weighting: FedAvg weights each client
by its number of training images when those are known to the server; a client that trains
with DP reports none (its image count is private data the accountant does not cover) and is
weighted like every other (:func:`weights`).

- ``fedavg`` (McMahan et al. 2017): the weighted mean of the clients' weights;
- ``fedadam`` (Reddi et al. 2021, "Adaptive federated optimization"): Adam on the server with
  the pseudo-gradient ``mean(w_k) - w``: ``m = b1 m + (1 - b1) D``, ``v = b2 v + (1 - b2) D^2``,
  ``w += lr m / (sqrt(v) + tau)`` (no bias correction, as the paper).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import Registry

StateDict = Dict[str, torch.Tensor]


def weights(n_examples: Sequence[Optional[int]]) -> np.ndarray:
    """Normalised client weights: by example counts when every client reported one, else equal."""
    if len(n_examples) == 0:
        raise ConfigError("aggregation needs at least one client update")
    if any(n is None for n in n_examples):
        return np.full(len(n_examples), 1.0 / len(n_examples))
    n = np.asarray(n_examples, dtype=np.float64)
    if (n <= 0).any():
        raise ConfigError(f"client example counts must be positive, got {list(n_examples)}")
    return n / n.sum()


def weighted_mean(updates: Sequence[StateDict], w: np.ndarray) -> StateDict:
    """Entry-wise weighted mean of state dicts (integer buffers: the first client's)."""
    keys = list(updates[0])
    for u in updates[1:]:
        if list(u) != keys:
            raise ConfigError("client updates have different parameter names")
    out = {}
    for k in keys:
        if updates[0][k].dtype.is_floating_point:
            out[k] = sum(float(wi) * u[k].to(torch.float64) for wi, u in zip(w, updates)).to(updates[0][k].dtype)
        else:
            out[k] = updates[0][k].clone()
    return out


@dataclass
class Strategy:
    """A server strategy: ``step(global, updates, n_examples) -> new global``."""

    name: str = "fedavg"
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: Dict[str, torch.Tensor] = field(default_factory=dict)
    v: Dict[str, torch.Tensor] = field(default_factory=dict)

    def step(self, global_weights: StateDict, updates: Sequence[StateDict],
             n_examples: Sequence[Optional[int]]) -> StateDict:
        return self.update(global_weights, weighted_mean(updates, weights(n_examples)))

    def update(self, global_weights: StateDict, avg: StateDict) -> StateDict:
        """The new global model from an aggregate of the clients' weights (their weighted
        mean, or client-level DP's noisy estimate of it: the server optimiser post-processes it)."""
        return STRATEGIES.get(self.name)(self, global_weights, avg)

    def state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The server optimiser's state (for a resumed federation)."""
        return {"m": self.m, "v": self.v}


#: name -> f(strategy, global weights, weighted mean of the updates) -> new global weights
STRATEGIES: Registry = Registry("strategy")


@STRATEGIES.register("fedavg")
def _fedavg(s: Strategy, w: StateDict, avg: StateDict) -> StateDict:
    return avg


@STRATEGIES.register("fedadam")
def _fedadam(s: Strategy, w: StateDict, avg: StateDict) -> StateDict:
    out = {}
    for k, wk in w.items():
        if not wk.dtype.is_floating_point:
            out[k] = avg[k]
            continue
        d = avg[k].to(torch.float64) - wk.to(torch.float64)
        m = s.m.get(k, torch.zeros_like(d)).mul(s.beta1).add(d, alpha=1 - s.beta1)
        v = s.v.get(k, torch.zeros_like(d)).mul(s.beta2).add(d * d, alpha=1 - s.beta2)
        s.m[k], s.v[k] = m, v
        out[k] = (wk.to(torch.float64) + s.server_lr * m / (v.sqrt() + s.tau)).to(wk.dtype)
    return out


__all__ = ["STRATEGIES", "Strategy", "weighted_mean", "weights"]
