"""Federated recipes: the named federations of the chapter, built in one place from a profile.

Each builds an :class:`~.federation.FLConfig` from the profile's typed parameters
(:class:`dpskin_core.training.recipes.Params`): the clients' local recipe is the profile's
end-to-end recipe (non-private SGD, or DP-SGD with its levers) on the profile's first network,
the partition the four HAM10000 sites (four synthetic sites on the embedded data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..registry import Registry
from ..training.recipes import RECIPES, Params
from .federation import FLConfig
from .partitions import Partition


@dataclass(frozen=True)
class FLPlan:
    """The chapter's federation settings (experiment parameters of ``09_federated``)."""

    rounds: int = 3
    local_epochs: int = 1
    server_lr: float = 0.01      # fedadam's server step


@dataclass(frozen=True)
class FLRecipe:
    name: str
    label: str
    private: bool
    build: Callable[..., FLConfig]

    def config(self, p: Params, plan: FLPlan, *, seed: int = 0,
               target_epsilon: Optional[float] = None) -> FLConfig:
        cfg = self.build(p, plan)
        run = cfg.run.replace(seed=seed, **({"target_epsilon": target_epsilon} if self.private else {}))
        return FLConfig.from_dict({**cfg.to_dict(), "run": run.to_dict(),
                                   "name": f"{self.name} seed {seed}"})


FL_RECIPES: Registry[FLRecipe] = Registry("federated recipe")


def _register(name: str, label: str, private: bool):
    def deco(build: Callable[..., FLConfig]) -> Callable[..., FLConfig]:
        FL_RECIPES.register(name)(FLRecipe(name, label, private, build))
        return build
    return deco


def _base(p: Params, plan: FLPlan, recipe: str, **over) -> FLConfig:
    run = RECIPES.get(recipe).config(p, backbone=p.backbones[0], seed=0,
                                     **({"target_epsilon": p.epsilons[0]} if RECIPES.get(recipe).private else {}))
    return FLConfig(run=run, partition=Partition("site"), rounds=plan.rounds,
                    local_epochs=plan.local_epochs, **over)


@_register("fedavg", "FedAvg", False)
def fedavg(p: Params, plan: FLPlan) -> FLConfig:
    """FedAvg of the profile's non-private SGD recipe."""
    return _base(p, plan, "nonprivate-sgd")


@_register("fedadam", "FedAdam", False)
def fedadam(p: Params, plan: FLPlan) -> FLConfig:
    """FedAdam (server-side Adam) of the same clients."""
    return _base(p, plan, "nonprivate-sgd", strategy="fedadam", server_lr=plan.server_lr)


@_register("fedavg-dp", "FedAvg, record-level DP-SGD", True)
def fedavg_dp(p: Params, plan: FLPlan) -> FLConfig:
    """FedAvg of DP-SGD clients (the profile's DP recipe, its noisy class prior included)."""
    return _base(p, plan, "dp-sgd")


__all__ = ["FLPlan", "FLRecipe", "FL_RECIPES"]
