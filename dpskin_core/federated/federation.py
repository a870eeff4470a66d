"""A federation: its config, the server's rounds, and the in-process run of them.

:class:`FLConfig` is one federated experiment (the clients' local recipe, the partition, the
rounds and the server's strategy); frozen, unknown keys rejected. :func:`serve` is the server:
round after round it asks for the clients' updates (``fit_all``), aggregates them with the
strategy, evaluates the global model at every client (``evaluate_all``) and records it all
in the federation's folder (``<runs_root>/federated/<id>/``), resuming after the last finished
round. The same function runs in one process (:func:`run_federation`: the clients are called
directly) and as Flower's ServerApp (:mod:`.app`: the clients are SuperNodes), so both paths
compute the same global model from the same seeds.

Privacy (record-level DP, ``run.dp``): every client runs DP-SGD / DP-Adam on its own images
with its own accountant (:mod:`.client`); the server recomputes each client's eps from the
(sigma, q, steps) history the client reports. Each image lives at exactly one client and only
that client's releases depend on it, so the global model of every round, post-processing of
all releases, is (max_k eps_k, delta)-DP for one image (add/remove adjacency), with the
accountant of the clients' runs (PRV by default). Not counted: the clients' test metrics
reported for the book, as in every chapter.

Privacy (client-level DP, ``client_dp``): DP-FedAvg (:mod:`.client_level`): the server
samples the clients of each round by its secret, clips their updates and noises their sum
(Flower's wrapper); the unit is one client, adjacency add/remove one client, eps from the
(sigma, q, rounds) history by the project's accountant. The clients then train without DP,
and the record does not say which clients took part in which round.

The class prior (``prior``, record-level DP clients with the logit-adjusted loss): ``local``,
each client adjusts by its own noisy histogram; ``global``, before the first round every client
releases that same noisy histogram to the server (the one release its accountant already
counts, :func:`.client.class_histogram`), the server sums them (post-processing) into the
federation's prior and every client adjusts by it, as pooled training would by the pooled
counts. The sum and the clients it came from are in the record (``prior.json``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DpskinError
from ..files import read_json, write_json
from ..training import RunConfig
from ..training import privacy
from ..training.checkpoint import StateDict
from ..training.records import code_version, default_runs_root, git_commit, package_versions
from ..training.checkpoint import dp_seed
from . import client_level
from .client import (FitResult, class_histogram, client_config, evaluate, fit, initial_weights,
                     kept_shift)
from .client_level import ClientDP
from .partitions import Client, Partition, partition
from .strategies import STRATEGIES, Strategy

PathLike = Union[str, Path]


#: the class prior of a federation of logit-adjusted DP clients (see the module docstring)
PRIORS = ("local", "global")


class FederationError(DpskinError):
    """A federation could not complete a round (too few clients replied, a client failed)."""


def _refuse_unknown(d: Mapping[str, Any], kind: type, where: str) -> None:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")


@dataclass(frozen=True)
class FLConfig:
    """One federated experiment. ``run`` is the clients' local recipe (its ``epochs`` are
    ignored: ``local_epochs`` per round, ``rounds`` rounds; under ``run.dp`` its target eps is
    each client's over the whole federation)."""

    name: str = "federation"
    run: RunConfig = field(default_factory=RunConfig)
    partition: Partition = field(default_factory=Partition)
    rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"         # STRATEGIES: fedavg | fedadam
    server_lr: float = 1.0           # fedadam's step (fedavg: unused)
    min_clients: int = 1             # a round with fewer replies fails
    round_timeout_s: float = 600.0   # deployment: how long a round waits for replies (s)
    connect_timeout_s: float = 300.0  # deployment: for the SuperNodes to connect and name their
    #                                   clients (each ClientApp loads its data first), s
    client_dp: Optional[ClientDP] = None  # client-level DP (DP-FedAvg); None: none at the server
    prior: str = "local"             # PRIORS: the logit adjustment's class prior

    def __post_init__(self) -> None:
        if not isinstance(self.run, RunConfig):
            raise ConfigError("federation run: expected a RunConfig (or its dict)")
        STRATEGIES.get(self.strategy)
        for name in ("rounds", "local_epochs", "min_clients"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"federation {name} must be a positive integer, got {v!r}")
        for name in ("server_lr", "round_timeout_s", "connect_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise ConfigError(f"federation {name} must be a finite number > 0, got {v!r}")
        client_config(self.run, self.rounds, self.local_epochs)  # the local recipe is valid
        if self.client_dp is not None:
            if not isinstance(self.client_dp, ClientDP):
                raise ConfigError("federation client_dp: expected a ClientDP (or its dict)")
            if self.run.dp:
                raise ConfigError("federation: client_dp (client-level DP at the server) and run.dp "
                                  "(record-level DP-SGD at every client) are both set; choose one")
        if self.prior not in PRIORS:
            raise ConfigError(f"federation prior: {self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.run.la_tau_kept > 0 and self.run.privacy_unit != "image":
            raise ConfigError(f"federation run.la_tau_kept={self.run.la_tau_kept}: a client keeps "
                              "the prior of its noisy image histogram; it needs "
                              "privacy_unit='image'")
        if (self.run.la_tau_kept > 0 and self.prior == "local"
                and self.partition.groups_per_site > 1):
            raise ConfigError(f"federation run.la_tau_kept={self.run.la_tau_kept} with "
                              "prior='local' and partition.groups_per_site > 1: the global model "
                              "is scored at sites, which hold no histogram of their own; use "
                              "prior='global'")
        if self.prior == "global" and not (self.run.dp and self.run.logit_adjust
                                           and self.run.privacy_unit == "image"):
            raise ConfigError("federation prior='global' sums the clients' noisy class histograms: "
                              "it needs record-level DP clients (run.dp) with run.logit_adjust and "
                              "privacy_unit='image'")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FLConfig":
        """Build from a mapping; unknown keys, at the top or in ``partition`` / ``client_dp``,
        raise :class:`ConfigError` naming them."""
        _refuse_unknown(d, cls, "federation config")
        d = dict(d)
        if isinstance(d.get("run"), Mapping):
            d["run"] = RunConfig.from_dict(d["run"])
        for key, kind in (("partition", Partition), ("client_dp", ClientDP)):
            if isinstance(d.get(key), Mapping):
                _refuse_unknown(d[key], kind, f"federation {key}")
                d[key] = kind(**d[key])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["run"], d["partition"] = self.run.to_dict(), asdict(self.partition)
        d["client_dp"] = None if self.client_dp is None else asdict(self.client_dp)
        return d

    @property
    def local(self) -> RunConfig:
        """The clients' recipe as the federation runs it (:func:`.client.client_config`)."""
        return client_config(self.run, self.rounds, self.local_epochs)

    def fl_id(self) -> str:
        """The federation's id: its semantic fields and the code version (16 hex digits)."""
        d = self.to_dict()
        d.pop("name")
        d.pop("round_timeout_s")
        d.pop("connect_timeout_s")
        d["run"] = self.local.semantic_dict()
        payload = json.dumps({"config": d, "code": code_version("training"),
                              "federated": federated_version()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: modules of this subpackage that only read finished federations (the chapter's references,
#: which are ``run`` records keyed by the training code, and its attacks on the global models):
#: editing them re-runs no federation
ANALYSIS_MODULES = ("study.py",)


def federated_version(folder: Optional[PathLike] = None) -> str:
    """Hash of the sources that make a federation (12 hex digits): every module of this
    subpackage (``folder``: another copy of it) but :data:`ANALYSIS_MODULES`."""
    h = hashlib.sha256()
    for p in sorted(Path(folder or Path(__file__).resolve().parent).glob("*.py")):
        if p.name in ANALYSIS_MODULES:
            continue
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def federation_dir(cfg: FLConfig, runs_root: Optional[PathLike] = None) -> Path:
    root = Path(runs_root) if runs_root is not None else default_runs_root()
    return root / "federated" / cfg.fl_id()


# --------------------------------------------------------------------------- the server
#: (round, global weights, the clients asked this round, the global class prior or None)
#: -> name -> reply or error
FitAll = Callable[[int, StateDict, List[str], Optional[np.ndarray]],
                  Dict[str, Union[FitResult, BaseException]]]
#: (global weights, the global class prior or None) -> name -> metrics of the global model
EvaluateAll = Callable[[StateDict, Optional[np.ndarray]], Dict[str, Dict[str, float]]]
#: () -> name -> the client's noisy class histogram, or the error it failed with
HistogramAll = Callable[[], Dict[str, Union[np.ndarray, BaseException]]]


@dataclass
class FLResult:
    """A finished federation: its folder, the per-round rows and the final global weights."""

    folder: Path
    config: FLConfig
    rounds: pd.DataFrame
    weights: StateDict
    meta: Dict[str, Any]


def _privacy(cfg: FLConfig, eps: Dict[str, Optional[float]], sigma: Optional[float] = None,
             rounds_done: int = 0, n_clients: int = 0,
             eps_all: Optional[float] = None) -> Optional[Dict[str, Any]]:
    c = cfg.client_dp
    if c is not None:
        return {"level": "client", "unit": "one client (all its images)",
                "adjacency": "add/remove one client", "delta": c.delta, "accountant": c.accountant,
                "mechanism": "DP-FedAvg: Poisson client sampling, server-side fixed clipping of each "
                             "update and Gaussian noise on their sum (Flower's wrapper), divided by "
                             "the expected number of sampled clients",
                "noise_multiplier": sigma, "clipping_norm": c.clipping_norm,
                "sample_rate": c.sample_rate, "rounds": rounds_done, "clients": n_clients,
                "expected_clients_per_round": c.sample_rate * n_clients,
                "global_epsilon": eps_all if rounds_done else 0.0,
                "not_counted": "the test metrics of the global model at every site (reported for "
                               "the book); the sampled clients of each round are secret, not released"}
    if not cfg.run.dp:
        return None
    worst = max((e for e in eps.values() if e is not None), default=None)
    return {"level": "record", "unit": "image", "adjacency": "add/remove one image",
            "delta": cfg.run.delta, "accountant": cfg.run.accountant, "client_epsilon": eps,
            "global_epsilon": worst,
            "statement": "each image lives at one client; the global model is post-processing "
                         "of all clients' releases: (max_k eps_k, delta)-DP per image",
            "class_prior": ({"local": "each client's own noisy class histogram (counted in its eps)",
                             "global": "the sum of the clients' noisy class histograms (each counted "
                                       "in its client's eps; the sum is post-processing)"}[cfg.prior]
                            if cfg.run.logit_adjust else None),
            "prediction": (f"at each client, the global model's logits plus "
                           f"{cfg.run.la_tau_kept:g} x log(the class prior above): post-processing"
                           if cfg.run.la_tau_kept > 0 else "the global model's logits"),
            "not_counted": "the clients' test metrics of the global model (reported for the book)"}


def record_failure(folder: Path, error: BaseException) -> None:
    """Mark the federation failed in its record (the ServerApp's last word), naming the error."""
    meta_path = folder / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    meta.update(status="failed", error=f"{type(error).__name__}: {error}")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, meta)


def read_complete(cfg: FLConfig, folder: Path) -> Optional[FLResult]:
    """The finished federation in ``folder`` read back (None: not finished)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file() or read_json(meta_path).get("status") != "complete":
        return None
    state = torch.load(folder / "global.pt", map_location="cpu", weights_only=False)
    return FLResult(folder, cfg, pd.read_csv(folder / "rounds.csv"), state["weights"], read_json(meta_path))


def global_prior(cfg: FLConfig, folder: Path, histograms_all: Optional[HistogramAll]) -> Optional[np.ndarray]:
    """The federation's class prior under ``prior='global'`` (None otherwise): the clients'
    noisy histograms summed, asked for once and kept in ``prior.json`` (a resumed federation
    reads it back: nothing is released twice). Fails, naming the clients, when fewer than
    ``min_clients`` reply."""
    if cfg.prior != "global":
        return None
    path = folder / "prior.json"
    if path.is_file():
        return np.asarray(read_json(path)["counts"], dtype=np.float64)
    if histograms_all is None:
        raise FederationError(f"federation {cfg.name}: prior='global' but the server cannot ask the "
                              "clients for their class histograms")
    replies = histograms_all()
    ok = {n: np.asarray(h, dtype=np.float64) for n, h in sorted(replies.items())
          if not isinstance(h, BaseException)}
    failed = {n: f"{type(e).__name__}: {e}" for n, e in replies.items() if isinstance(e, BaseException)}
    if len(ok) < cfg.min_clients:
        raise FederationError(f"federation {cfg.name}: {len(ok)} class histogram(s) for the global "
                              f"prior, fewer than min_clients={cfg.min_clients}; failed: {failed or '-'}")
    counts = np.sum(list(ok.values()), axis=0)
    write_json(path, {"counts": counts.round(4).tolist(), "clients": sorted(ok), "failed": failed,
                      "note": "sum of the clients' noisy class histograms (Gaussian, std hist_noise "
                              "images per class each, counted in each client's eps)"})
    return counts


def serve(cfg: FLConfig, folder: Path, clients: List[str], fit_all: FitAll,
          evaluate_all: EvaluateAll, progress: bool = True,
          histograms_all: Optional[HistogramAll] = None) -> FLResult:
    """The server's rounds (resumed after the last finished one), recorded in ``folder``.

    ``evaluate_all`` scores the global model where the chapter reads it: at every client, or at
    every site when the clients are a site's virtual clients; the rows are one per place scored.
    ``histograms_all`` asks every client for its noisy class histogram (``prior='global'``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", cfg.to_dict())
    meta_path, ckpt, rows_path = folder / "meta.json", folder / "global.pt", folder / "rounds.csv"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if meta.get("status") == "complete":
        return read_complete(cfg, folder)
    strategy = Strategy(cfg.strategy, server_lr=cfg.server_lr)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        weights, done = state["weights"], state["round"]
        strategy.m, strategy.v = state["strategy"]["m"], state["strategy"]["v"]
        rows = pd.read_csv(rows_path).to_dict("records") if rows_path.is_file() else []
    else:
        weights, done, rows = initial_weights(cfg.local), 0, []
    cdp = cfg.client_dp
    sigma = secret = None
    if cdp is not None:  # calibrated before the first round; the server's secret seeds it all
        sigma = client_level.noise_multiplier(cdp, cfg.rounds)
        secret = dp_seed(folder / "private", "secret", cfg.run.seed)
    meta.update(status="running", name=cfg.name, id=folder.name,
                clients=clients if cdp is None else f"{len(clients)} clients",
                commit=git_commit(), versions=package_versions())
    write_json(meta_path, meta)
    prior = global_prior(cfg, folder, histograms_all)
    eps: Dict[str, Optional[float]] = dict(meta.get("client_epsilon", {}))
    eps_all: Optional[float] = None
    t0 = time.perf_counter()
    for rnd in tqdm(range(done + 1, cfg.rounds + 1), desc=f"{cfg.name} rounds", disable=not progress,
                    initial=done, total=cfg.rounds):
        asked = clients if cdp is None else client_level.sample_clients(clients, cdp.sample_rate,
                                                                        secret, rnd)
        replies = fit_all(rnd, weights, asked, prior)
        ok = {n: r for n, r in sorted(replies.items()) if isinstance(r, FitResult)}
        failed = {n: f"{type(r).__name__}: {r}" for n, r in replies.items() if not isinstance(r, FitResult)}
        missing = [n for n in asked if n not in replies]
        if cdp is not None:
            # a sampled client that fails adds nothing (its share is bounded by C either way);
            # who was asked, and who failed, stays with the server's secrets
            log = folder / "private" / "rounds.json"
            hist = read_json(log) if log.is_file() else {}
            hist[str(rnd)] = {"asked": asked, "failed": failed, "no reply": missing}
            write_json(log, hist)
            avg = client_level.aggregate(weights, [r.weights for r in ok.values()], cdp, sigma,
                                         len(clients), secret, rnd)
            weights = strategy.update(weights, avg)
            eps_all = client_level.epsilon(cdp, sigma, rnd)  # every client's, the global model's
        else:
            if len(ok) < cfg.min_clients:
                meta.update(status="failed", failed_round=rnd, failed=failed, missing=missing)
                write_json(meta_path, meta)
                raise FederationError(f"federation {cfg.name}: round {rnd} got {len(ok)} update(s), "
                                      f"fewer than min_clients={cfg.min_clients}; failed: "
                                      f"{failed or '-'}; no reply: {missing or '-'}")
            weights = strategy.step(weights, [r.weights for r in ok.values()],
                                    [r.n_examples for r in ok.values()])
            for n, r in ok.items():  # the server's own accountant over what the client reports
                eps[n] = (float(privacy.epsilon(r.history, cfg.run.delta, cfg.run.accountant))
                          if cfg.run.dp else None)
        scores = evaluate_all(weights, prior)
        for n in (clients if set(scores) <= set(clients) else sorted(scores)):
            if cdp is not None:
                status = "secret"
            else:
                status = "ok" if n in ok else ("failed" if n in failed else "no reply")
            m = scores.get(n, {})
            rows.append({"round": rnd, "client": n, "status": status,
                         "epsilon": eps.get(n) if cdp is None else eps_all,
                         "balanced_accuracy": m.get("balanced_accuracy"), "accuracy": m.get("accuracy"),
                         "nll": m.get("nll"),
                         "n_test": m.get("n"), "error": failed.get(n) if cdp is None else None})
        torch.save({"round": rnd, "weights": weights, "strategy": strategy.state()}, ckpt)
        pd.DataFrame(rows).to_csv(rows_path, index=False)
        meta.update(rounds_done=rnd, client_epsilon=eps,
                    privacy=_privacy(cfg, eps, sigma, rnd, len(clients), eps_all))
        write_json(meta_path, meta)
    meta.update(status="complete", wall_time_s=meta.get("wall_time_s", 0.0) + time.perf_counter() - t0)
    write_json(meta_path, meta)
    return FLResult(folder, cfg, pd.DataFrame(rows), weights, meta)


# --------------------------------------------------------------------------- in one process
def _data(cfg: FLConfig):
    from ..data import load_data
    from ..training.trainer import data_spec

    return load_data(data_spec(cfg.run))


def load_clients(cfg: FLConfig, data=None) -> List[Client]:
    """The federation's clients (its data loaded, partitioned)."""
    return partition(data if data is not None else _data(cfg), cfg.partition)


def run_federation(cfg: FLConfig, runs_root: Optional[PathLike] = None, *, data=None,
                   progress: bool = True) -> FLResult:
    """The federation in this process: every client's round called directly (sorted by name),
    the server's :func:`serve`; cached and resumed as a run is."""
    folder = federation_dir(cfg, runs_root)
    done = read_complete(cfg, folder)
    if done is not None:  # cached: read back without loading the data
        return done
    data = data if data is not None else _data(cfg)
    by_name = {c.name: c for c in partition(data, cfg.partition)}
    local = cfg.local

    scored = by_name if cfg.partition.groups_per_site == 1 else {
        c.name: c for c in partition(data, cfg.partition.by_site)}

    def fit_all(rnd: int, weights: StateDict, asked: List[str],
                prior: Optional[np.ndarray]) -> Dict[str, Union[FitResult, BaseException]]:
        return {n: fit(by_name[n], local, weights, rnd, cfg.local_epochs, folder / "clients" / n,
                       prior) for n in sorted(asked)}

    shifts: Dict[str, Optional[np.ndarray]] = {}  # the prior is fixed before the first round

    def evaluate_all(weights: StateDict,
                     prior: Optional[np.ndarray]) -> Dict[str, Dict[str, float]]:
        # a site of virtual clients (groups_per_site > 1) keeps a prior only under prior='global'
        for n, c in scored.items():
            if n not in shifts:
                shifts[n] = kept_shift(c, local, folder / "clients" / n, prior)
        return {n: evaluate(c, local, weights, shift=shifts[n]) for n, c in scored.items()}

    def histograms_all() -> Dict[str, Union[np.ndarray, BaseException]]:
        out: Dict[str, Union[np.ndarray, BaseException]] = {}
        for n, c in sorted(by_name.items()):
            try:
                out[n] = class_histogram(c, local, folder / "clients" / n)
            except DpskinError as e:  # reported as a SuperNode's error would be
                out[n] = e
        return out

    return serve(cfg, folder, sorted(by_name), fit_all, evaluate_all, progress, histograms_all)


__all__ = ["FLConfig", "FLResult", "FederationError", "PRIORS", "federated_version", "federation_dir",
           "global_prior", "load_clients", "read_complete", "record_failure", "run_federation", "serve"]
