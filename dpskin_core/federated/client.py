"""A client of the federation: one round of local training on its own images, and evaluation.

Local training is the project's own (:mod:`dpskin_core.training.trainer`'s named steps: the
same backbones, optimizers, Poisson sampling, per-sample clipping and noise), started from the
global weights each round. Under record-level DP (``cfg.dp``) each client is a DP-SGD /
DP-Adam run over the whole federation: its noise multiplier is calibrated once, for its
target (eps, delta) over ``rounds x local_epochs`` epochs of its own data, and its
accountant lives in the client's state folder (``accountant.json``: the (sigma, q, steps) of
every round it trained, written *before* the round's first step, so a client that dies
mid-round is counted, never under-counted; a retried round repeats the same secret noise and
sampling and is counted once). The DP seed is the client's secret (``run/checkpoints/
secret.json``), so a round run by a new process draws the same streams.

A DP client reports no image count (private; the server weights it equally, see
:mod:`.strategies`). Evaluation metrics of the global model on the client's test split are
reported as in every chapter (not counted in eps). A client whose recipe keeps part of its class
prior at prediction (``la_tau_kept``) scores the global model as its released predictor: the
global logits plus ``la_tau_kept`` times the log of the prior it trains with (:func:`kept_shift`),
post-processing of a histogram already counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..files import read_json, write_json
from ..training import RunConfig
from ..training import privacy
from ..training.trainer import build_network
from ..training.checkpoint import StateDict
from ..training.frontends import Inputs
from ..training.metrics import evaluate as classification_metrics
from ..training.technique import kept_prior_shift, prior_loss
from ..training.distributed import unwrap
from ..training.trainer import pick_device, predict_proba, prefix_history, start, train_one_epoch
from .partitions import Client


def client_config(cfg: RunConfig, rounds: int, local_epochs: int) -> RunConfig:
    """The local recipe as the whole federation runs it: ``rounds x local_epochs`` epochs
    (what DP calibrates sigma for), a constant learning rate (each round restarts the
    optimiser), no early stopping and no EMA (the server releases the last global model)."""
    for name, v in (("rounds", rounds), ("local_epochs", local_epochs)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"federation {name} must be a positive integer, got {v!r}")
    return cfg.replace(epochs=int(rounds * local_epochs), lr_schedule="constant", warmup_epochs=0.0,
                       early_stopping_patience=None, ema_decay=None, eval_split="test")


def for_client(cfg: RunConfig, client: Client) -> RunConfig:
    """``cfg`` at a client holding fewer training images than its (expected) batch: the batch
    is all of them (a DP client's sample rate is then 1; its sigma is calibrated for it)."""
    n = client.n_train
    return cfg.replace(batch_size=max(1, n)) if n < cfg.batch_size else cfg


@dataclass
class FitResult:
    """A client's reply to a training round."""

    weights: StateDict
    n_examples: Optional[int]     # None under DP (private)
    epsilon: Optional[float]      # the client's eps after this round (None: non-private)
    history: List[Tuple[float, float, int]]  # its accountant history (sigma, q, steps)


def _accountant(state_dir: Path) -> Dict[str, Any]:
    path = state_dir / "accountant.json"
    return read_json(path) if path.is_file() else {"rounds": {}}


def spent(state_dir: Path, cfg: RunConfig) -> Tuple[List[Tuple[float, float, int]], Optional[float]]:
    """(history, eps) of the client whose state is ``state_dir``: every release so far."""
    acc = _accountant(state_dir)
    hist = [*prefix_history(cfg)] + [tuple(acc["rounds"][r]) for r in sorted(acc["rounds"], key=int)]
    if not cfg.dp or not acc["rounds"]:
        return hist, None
    return hist, float(privacy.epsilon(hist, cfg.delta, cfg.accountant))


def noise_multiplier(state_dir: Path) -> Optional[float]:
    """The sigma a record-level DP client trained its rounds with (None: it has not trained)."""
    rounds = _accountant(Path(state_dir))["rounds"]
    return float(rounds[min(rounds, key=int)][0]) if rounds else None


def _check_prior_client(client: Client, cfg: RunConfig) -> None:
    """Raise unless ``cfg`` trains ``client`` with a class prior the federation can share: DP
    with the logit adjustment, its histogram counting images."""
    if not (cfg.dp and cfg.logit_adjust):
        raise ConfigError(f"client {client.name}: a class histogram is released only by a DP "
                          "client with logit_adjust (its noisy histogram, counted in its eps)")
    if cfg.privacy_unit != "image":
        raise ConfigError(f"client {client.name}: the federation's class priors count images; "
                          f"privacy_unit={cfg.privacy_unit!r} is not supported")


def _criterion(client: Client, cfg: RunConfig, state_dir: Path,
               prior_counts: Optional[np.ndarray] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(logit-adjusted loss, its record) as the client's training builds them: the noisy
    histogram drawn with the client's secret seed (the same noise as its rounds draw)."""
    from ..training.checkpoint import dp_seed
    from ..training.trainer import build_criterion

    _check_prior_client(client, cfg)
    cfg = for_client(cfg, client)
    seed = dp_seed(Path(state_dir) / "run" / "checkpoints", cfg.dp_noise, cfg.seed)
    criterion, _, released = build_criterion(cfg, client.data, torch.device("cpu"), seed,
                                             prior_counts=prior_counts)
    return criterion, released


def class_histogram(client: Client, cfg: RunConfig, state_dir: Path) -> np.ndarray:
    """The client's noisy class histogram, released once to the server for the federation's
    global prior: the very release its own logit adjustment would make (same mechanism, same
    noise from the client's secret seed), so it is the histogram step its accountant already
    counts (:func:`.training.trainer.prefix_history`), not a second release."""
    return np.asarray(_criterion(client, cfg, state_dir)[1]["class_histogram"], dtype=np.float64)


def kept_shift(client: Client, cfg: RunConfig, state_dir: Path,
               prior_counts: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The shift (C,) the client's released predictor adds to the global model's logits:
    ``la_tau_kept`` times the log of the prior its training adjusts by, the federation's
    (``prior_counts``, ``prior='global'``) or else its own noisy histogram (the release its
    accountant counts); None when it keeps none. Built from the loss the client trains with
    (its own, or the one its training builds of ``prior_counts``), so it is the shift its
    training computes (:func:`dpskin_core.training.technique.kept_prior_shift`)."""
    if cfg.la_tau_kept <= 0:
        return None
    if prior_counts is None:
        criterion, _ = _criterion(client, cfg, state_dir)
    else:  # the federation's prior: the loss build_criterion makes of it, no secret of the
        # client's read (a site of virtual clients, scored under prior='global', has none)
        _check_prior_client(client, cfg)
        criterion = prior_loss(prior_counts, cfg.la_tau)
    return kept_prior_shift(criterion, cfg.la_tau_kept).double().numpy()


def fit(client: Client, cfg: RunConfig, global_weights: Optional[StateDict], rnd: int,
        local_epochs: int, state_dir: Path, prior_counts: Optional[np.ndarray] = None) -> FitResult:
    """Round ``rnd`` (1-based) of local training from ``global_weights`` (None: the seeded
    initialisation); ``cfg`` is :func:`client_config`'s. ``prior_counts``: the federation's
    global class prior for the logit adjustment (None: the client's own noisy histogram)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if cfg.epochs % local_epochs:
        raise ConfigError(f"client {client.name}: cfg.epochs={cfg.epochs} is not a multiple of "
                          f"local_epochs={local_epochs} (use client_config)")
    if rnd < 1 or rnd * local_epochs > cfg.epochs:
        raise ConfigError(f"client {client.name}: round {rnd} is beyond the federation's "
                          f"{cfg.epochs // local_epochs} rounds (its DP budget is planned for those)")
    cfg = for_client(cfg, client)
    s = start(cfg, client.data, state_dir / "run", prior_counts=prior_counts)
    model = unwrap(s.setup.model)
    if global_weights is not None:
        model.load_state_dict(global_weights)
    if cfg.dp:
        acc = _accountant(state_dir)
        st = s.setup
        acc["rounds"][str(rnd)] = [float(st.noise_multiplier), float(st.sample_rate),
                                   int(st.steps_per_epoch * local_epochs)]
        acc.update(client=client.name, delta=cfg.delta, accountant=cfg.accountant,
                   note="every round's noisy steps, written before the round's first step")
        write_json(state_dir / "accountant.json", acc)
    for e in range(local_epochs):
        train_one_epoch(s, (rnd - 1) * local_epochs + e + 1)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    hist, eps = spent(state_dir, cfg)
    return FitResult(weights, None if cfg.dp else client.n_train, eps, hist)


@torch.no_grad()
def evaluate(client: Client, cfg: RunConfig, weights: StateDict, split: str = "test",
             shift: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Metrics of ``weights`` on the client's ``split`` (val or test); the logits plus ``shift``
    (C,) when given (the released predictor of a run that kept part of its prior:
    :func:`kept_shift`, :func:`dpskin_core.training.records.prediction_shift`)."""
    if split not in ("val", "test"):
        raise ConfigError(f"evaluate: split must be 'val' or 'test', got {split!r}")
    device = pick_device(cfg.device)
    model = build_network(cfg).to(device)
    model.load_state_dict(weights)
    inputs = Inputs(cfg.replace(eval_split=split), client.data, device)
    y = getattr(client.data, f"y_{split}")
    if len(y) == 0:
        return {"n": 0}
    logit_shift = None if shift is None else torch.as_tensor(shift, dtype=torch.float32)
    probs = predict_proba(model, inputs.eval_x, inputs, logit_shift=logit_shift)
    out = classification_metrics(y, probs)
    return {**{k: float(v) for k, v in out.items() if np.isscalar(v)}, "n": int(len(y))}


def initial_weights(cfg: RunConfig) -> StateDict:
    """The global model's seeded initialisation (the server's, from the public seed)."""
    from ..training.trainer import init_seed

    torch.manual_seed(init_seed(cfg.seed))
    return build_network(cfg).state_dict()


__all__ = ["FitResult", "client_config", "evaluate", "fit", "for_client", "initial_weights",
           "kept_shift", "noise_multiplier", "spent"]
