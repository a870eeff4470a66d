"""Federated recipes: the named federations of the chapter, built in one place from a profile.

Each builds an :class:`~.federation.FLConfig` from the profile's typed parameters
(:class:`dpskin_core.training.recipes.Params`): the clients' local recipe is the profile's
end-to-end recipe (non-private SGD, or DP-SGD with its levers) on the profile's first network,
or the proposed technique (colour front end, linear head, noisy class prior); the partition
the four HAM10000 sites (four synthetic sites on the embedded data), or each site split into
``FLPlan.groups_per_site`` virtual clients for client-level DP.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

from ..registry import Registry
from ..training.recipes import RECIPES, Params
from .client_level import ClientDP
from .federation import FLConfig
from .partitions import Partition


@dataclass(frozen=True)
class FLPlan:
    """The chapter's federation settings (experiment parameters of ``09_federated``)."""

    rounds: int = 3
    local_epochs: int = 1
    server_lr: float = 0.01      # fedadam's server step
    groups_per_site: int = 10    # client-level DP: virtual clients per site
    client_sample_rate: float = 0.5   # client-level DP: Poisson rate of a client per round
    client_clipping_norm: float = 1.0  # client-level DP: L2 bound of one client's update

    #: the chapter's parameter of a field is the field's name after this prefix (fl_rounds, ...)
    PREFIX = "fl_"

    @classmethod
    def from_chapter(cls, parameters: Mapping[str, Any]) -> "FLPlan":
        """The plan of the chapter's parameters (``fl_<field>``; a field left out keeps its
        default, other keys are ignored): the one mapping of parameters to fields, used by the
        chapter and its benchmark alike."""
        return cls(**{f.name: parameters[cls.PREFIX + f.name] for f in fields(cls)
                      if cls.PREFIX + f.name in parameters})


@dataclass(frozen=True)
class FLRecipe:
    name: str
    label: str
    level: str                   # where its DP sits: "none", "record" (every client's DP-SGD)
    #                              or "client" (DP-FedAvg at the server)
    build: Callable[..., FLConfig]

    @property
    def private(self) -> bool:
        return self.level != "none"

    def config(self, p: Params, plan: FLPlan, *, seed: int = 0,
               target_epsilon: Optional[float] = None) -> FLConfig:
        cfg = self.build(p, plan)
        run = cfg.run.replace(seed=seed, **({"target_epsilon": target_epsilon}
                                            if self.level == "record" else {}))
        d = {**cfg.to_dict(), "run": run.to_dict(), "name": f"{self.name} seed {seed}"}
        if self.level == "client" and target_epsilon is not None:
            d["client_dp"] = {**d["client_dp"], "target_epsilon": target_epsilon}
        return FLConfig.from_dict(d)


FL_RECIPES: Registry[FLRecipe] = Registry("federated recipe")
LEVELS = ("none", "record", "client")


def _register(name: str, label: str, level: str):
    if level not in LEVELS:
        raise ValueError(f"unknown DP level {level!r}")

    def deco(build: Callable[..., FLConfig]) -> Callable[..., FLConfig]:
        FL_RECIPES.register(name)(FLRecipe(name, label, level, build))
        return build
    return deco


def _base(p: Params, plan: FLPlan, recipe: str, **over) -> FLConfig:
    r = RECIPES.get(recipe)
    kw = {"backbone": p.backbones[0]} if "backbone" in r.axes else {}
    run = r.config(p, seed=0, **kw, **({"target_epsilon": p.epsilons[0]} if r.private else {}))
    return FLConfig(run=run, rounds=plan.rounds, local_epochs=plan.local_epochs,
                    **{"partition": Partition("site"), **over})


def _client_dp(p: Params, plan: FLPlan, recipe: str, groups: int, sample_rate: float) -> FLConfig:
    return _base(p, plan, recipe, partition=Partition("site", groups_per_site=groups),
                 client_dp=ClientDP(p.epsilons[0], p.delta, plan.client_clipping_norm, sample_rate))


@_register("fedavg", "FedAvg", "none")
def fedavg(p: Params, plan: FLPlan) -> FLConfig:
    """FedAvg of the profile's non-private SGD recipe."""
    return _base(p, plan, "nonprivate-sgd")


@_register("fedadam", "FedAdam", "none")
def fedadam(p: Params, plan: FLPlan) -> FLConfig:
    """FedAdam (server-side Adam) of the same clients."""
    return _base(p, plan, "nonprivate-sgd", strategy="fedadam", server_lr=plan.server_lr)


@_register("fedavg-dp", "FedAvg, record-level DP-SGD", "record")
def fedavg_dp(p: Params, plan: FLPlan) -> FLConfig:
    """FedAvg of DP-SGD clients (the profile's DP recipe, its noisy class prior included: each
    client adjusts by, and keeps at prediction the profile's share of, its own noisy histogram)."""
    return _base(p, plan, "dp-sgd")


@_register("fedavg-client-dp-sites", "DP-FedAvg, 4 sites", "client")
def fedavg_client_dp_sites(p: Params, plan: FLPlan) -> FLConfig:
    """Client-level DP over the four sites themselves, every site every round: too few
    clients (the noise on the mean is sigma C / 4)."""
    return _client_dp(p, plan, "nonprivate-sgd", 1, 1.0)


@_register("fedavg-client-dp", "DP-FedAvg, virtual clients", "client")
def fedavg_client_dp(p: Params, plan: FLPlan) -> FLConfig:
    """Client-level DP over ``groups_per_site`` virtual clients per site (groups of lesions),
    each taking part with probability ``client_sample_rate``."""
    return _client_dp(p, plan, "nonprivate-sgd", plan.groups_per_site, plan.client_sample_rate)


@_register("fedavg-proposed-dp", "proposed, record-level DP-SGD", "record")
def fedavg_proposed_dp(p: Params, plan: FLPlan) -> FLConfig:
    """The technique's first generation at every site: colour front end (data-independent),
    linear head by DP-SGD, logit adjustment by the federation's class prior: the sum of the
    sites' noisy class histograms (each counted in its site's eps). (The second generation's
    privately standardised head would need one set of feature statistics for the federation.)"""
    return _base(p, plan, "proposed-colour", prior="global")


@_register("fedavg-proposed-dp-local-prior", "proposed, record-level DP-SGD, local priors", "record")
def fedavg_proposed_dp_local_prior(p: Params, plan: FLPlan) -> FLConfig:
    """Its ablation: each site adjusts by its own noisy class histogram instead of the sum."""
    return _base(p, plan, "proposed-colour")


@_register("fedavg-proposed-client-dp", "proposed, DP-FedAvg, virtual clients", "client")
def fedavg_proposed_client_dp(p: Params, plan: FLPlan) -> FLConfig:
    """The proposed technique's linear head (few weights: little noise in total) trained by
    DP-FedAvg over the virtual clients; each client's logit adjustment by its own class counts
    is inside its update, which the clipping and noise cover."""
    return _client_dp(p, plan, "proposed-colour-nonprivate", plan.groups_per_site,
                      plan.client_sample_rate)


__all__ = ["FLPlan", "FLRecipe", "FL_RECIPES", "LEVELS"]
