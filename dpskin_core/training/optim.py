"""Optimizers by name. Under DP, Opacus wraps the one built here (DP-SGD / DP-Adam: the same
clipped, noised gradient fed to SGD's or Adam's update rule)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..registry import Registry

#: name -> factory(params, cfg) -> torch.optim.Optimizer
OPTIMIZERS: Registry[Callable[[Iterable[Any], Any], torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable[Any], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params: Iterable[Any], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optimizer(params: Iterable[Any], cfg: Any) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` (lr, momentum, weight decay of ``cfg``)."""
    return OPTIMIZERS.get(cfg.optimizer)(params, cfg)
