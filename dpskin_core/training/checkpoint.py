"""The training state on disk: one schema, and the one rule for which weights a run releases.

``<run>/checkpoints/last.pt`` holds a :class:`Checkpoint` (written atomically after every
epoch); ``best.pt`` the weights of the best validation epoch (written when it improves);
``secret.json`` the root seed of the run's DP randomness (:func:`dp_seed`). The checkpoints
folder is private: it holds the secret and unreleased iterates; everything else in the run
folder is the run's public record.
Training (:mod:`.trainer`) writes and resumes from them; reloading a finished model
(:func:`dpskin_core.attacks.victims.load_trained`) reads them through :func:`released_weights`,
the same function the run used to pick the model it evaluated and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import secrets

import torch

from ..errors import ConfigError
from ..files import read_json, save_torch, write_json

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]
LAST, BEST, SECRET = "last.pt", "best.pt", "secret.json"
CHOICES = ("released", "last", "best")


@dataclass
class Checkpoint:
    """Everything a run needs to resume after ``epoch`` with the same result."""

    epoch: int                                  # last finished epoch (1-based)
    model: StateDict                            # the current iterate
    optimizer: Dict[str, Any]                   # the wrapped optimizer's state
    scheduler: Dict[str, Any]
    accountant: Optional[Dict[str, Any]]        # Opacus accountant state (None: non-private)
    ema: Optional[StateDict]                    # EMA of the weights (None: no EMA)
    rng: Dict[str, Any]                         # generator states, for inspection
    best: Dict[str, Any]                        # best validation score, its epoch, epochs since
    rows: List[Dict[str, Any]] = field(default_factory=list)  # the metric rows so far
    early_stopped: bool = False                 # training ended here: resume goes to finish

    @property
    def evaluated_weights(self) -> StateDict:
        """The weights a run evaluates after this epoch: the EMA when kept, else the iterate."""
        return self.ema if self.ema is not None else self.model

    def save(self, ckpt_dir: PathLike) -> None:
        save_torch(Path(ckpt_dir) / LAST, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, ckpt_dir: PathLike) -> Optional["Checkpoint"]:
        """The checkpoint in ``ckpt_dir``, or None when there is none."""
        path = Path(ckpt_dir) / LAST
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


def dp_seed(ckpt_dir: PathLike, mode: str, public_seed: int) -> int:
    """The root seed of a run's DP randomness (Poisson sampling, gradient noise, noisy releases).

    ``"secret"``: 63 bits from the OS's entropy, written to ``secret.json`` in the private
    checkpoints folder before anything is drawn from it, and read back on resume (so a resumed
    run, and a re-drawn release, repeat the same noise: bit-exact, nothing released twice).
    ``"seeded"``: the public ``seed`` itself (research reproducibility: anyone holding the config
    can regenerate, and subtract, the noise). ``"secure"`` draws from Opacus' cryptographic RNG
    instead; this seed is then unused.
    """
    if mode == "seeded":
        return int(public_seed)
    path = Path(ckpt_dir) / SECRET
    if path.is_file():
        return int(read_json(path)["secret"])
    secret = secrets.randbits(63)
    write_json(path, {"secret": secret, "mode": mode,
                      "note": "PRIVATE: regenerates this run's DP noise; never publish this file"})
    return secret


def save_best(ckpt_dir: PathLike, weights: StateDict, epoch: int) -> None:
    """Record ``weights`` as the best validation epoch so far."""
    save_torch(Path(ckpt_dir) / BEST, {"model": weights, "epoch": epoch})


def released_weights(ckpt_dir: PathLike, early_stopping: bool,
                     which: str = "released") -> Tuple[StateDict, Optional[int], str]:
    """(weights, epoch, file) of the model a run releases -- the rule, in one place.

    ``"released"``: ``best.pt`` when the run selects its model by validation (early stopping)
    and has one, else the evaluated weights of ``last.pt`` (the EMA when kept, else the last
    iterate). ``"last"`` is the last iterate itself (no EMA), ``"best"`` the best validation
    epoch. Raises :class:`ConfigError` when the file is missing.
    """
    if which not in CHOICES:
        raise ConfigError(f"checkpoint={which!r}; expected one of {', '.join(CHOICES)}")
    d = Path(ckpt_dir)
    use_best = which == "best" or (which == "released" and early_stopping and (d / BEST).is_file())
    if use_best:
        if not (d / BEST).is_file():
            raise ConfigError(f"{d}: checkpoint {BEST} not found")
        state = torch.load(d / BEST, map_location="cpu", weights_only=False)
        return state["model"], state.get("epoch"), BEST
    ck = Checkpoint.load(d)
    if ck is None:
        raise ConfigError(f"{d}: checkpoint {LAST} not found")
    return (ck.model if which == "last" else ck.evaluated_weights), ck.epoch, LAST


__all__ = ["BEST", "CHOICES", "Checkpoint", "LAST", "SECRET", "dp_seed", "released_weights",
           "save_best"]
