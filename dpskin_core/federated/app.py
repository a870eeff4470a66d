"""Flower's ServerApp and ClientApp of a federation (Flower's deployment engine, Message API).

The apps run the project's own code: the ClientApp calls :func:`.client.fit` /
:func:`.client.evaluate` for the client of its SuperNode (``partition-id``: the index of the
client in name order; ``state-dir`` optional, default ``<federation>/clients/<name>``), the
ServerApp calls :func:`.federation.serve` with the rounds sent to the SuperNodes as messages,
so a deployed federation computes what :func:`.federation.run_federation` computes in one
process. The run config names the federation's config file and folder (``fl-config``,
``fl-folder``; written by :mod:`.deploy`). A client that fails replies with an error naming it
(e.g. its data missing or corrupt); a SuperNode that does not reply within the round's timeout
is left out of that round (:func:`.federation.serve` decides whether the round stands).
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..errors import DpskinError
from ..files import read_json
from .client import FitResult, class_histogram, evaluate, fit, kept_shift
from .federation import FederationError, FLConfig, record_failure, serve
from .partitions import Client

client_app = ClientApp()
server_app = ServerApp()


def _config(context: Context) -> Tuple[FLConfig, Path]:
    rc = context.run_config
    return FLConfig.from_dict(read_json(Path(str(rc["fl-config"])))), Path(str(rc["fl-folder"]))


@lru_cache(maxsize=2)
def _clients(config_file: str) -> Tuple[Client, ...]:
    from .federation import load_clients  # the data is loaded once per ClientApp process

    return tuple(load_clients(FLConfig.from_dict(read_json(Path(config_file)))))


def _client(context: Context) -> Client:
    clients = _clients(str(context.run_config["fl-config"]))
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", len(clients)))
    if n != len(clients) or not 0 <= pid < n:
        raise DpskinError(f"SuperNode partition-id={pid} num-partitions={n}: the federation has "
                          f"{len(clients)} clients ({', '.join(c.name for c in clients)})")
    return clients[pid]


def _state_dir(context: Context, folder: Path, name: str) -> Path:
    return Path(str(context.node_config.get("state-dir", folder / "clients" / name)))


_SHIFT_KEY = "kept-shift"  # the node's context state: its client's kept shift and its prior


def _kept_shift(context: Context, c: Client, cfg: FLConfig, folder: Path,
                prior: Optional[str]) -> Optional[np.ndarray]:
    """:func:`.client.kept_shift` of the SuperNode's client, computed at its first evaluation
    and kept in the node's context state (Flower keeps it across the run's messages): the
    prior is fixed before the first round, so later evaluations read it back. A different
    prior (another federation's message) computes it again. JSON keeps float64 exactly."""
    tag = "own" if prior is None else prior
    if _SHIFT_KEY in context.state:
        kept = context.state[_SHIFT_KEY]
        if kept["client"] == c.name and kept["prior"] == tag:
            shift = json.loads(str(kept["shift"]))
            return None if shift is None else np.asarray(shift, dtype=np.float64)
    shift = kept_shift(c, cfg.local, _state_dir(context, folder, c.name),
                       None if prior is None else np.asarray(json.loads(prior)))
    context.state[_SHIFT_KEY] = ConfigRecord({
        "client": c.name, "prior": tag,
        "shift": json.dumps(None if shift is None else shift.tolist())})
    return shift


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this SuperNode is (the server holds no data and learns it so); asked with
    ``ask=histogram``, also its noisy class histogram (the federation's global prior)."""
    c = _client(context)
    info: Dict[str, str] = {"name": c.name}
    ask = msg.content["config"]["ask"] if "config" in msg.content else "name"
    if ask == "histogram":
        cfg, folder = _config(context)
        info["histogram"] = json.dumps(class_histogram(c, cfg.local, _state_dir(context, folder, c.name)).tolist())
    return Message(RecordDict({"client": ConfigRecord(info)}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, folder = _config(context)
    c = _client(context)
    rnd = int(msg.content["config"]["round"])
    prior = msg.content["config"].get("prior")
    r = fit(c, cfg.local, msg.content["arrays"].to_torch_state_dict(), rnd, cfg.local_epochs,
            _state_dir(context, folder, c.name), None if prior is None else np.asarray(json.loads(str(prior))))
    info = {"name": c.name, "history": json.dumps(r.history)}
    metrics = {} if r.n_examples is None else {"num-examples": r.n_examples}
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=r.weights),
                               "client": ConfigRecord(info), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    cfg, folder = _config(context)
    c = _client(context)
    prior = msg.content["config"].get("prior") if "config" in msg.content else None
    shift = _kept_shift(context, c, cfg, folder, None if prior is None else str(prior))
    m = evaluate(c, cfg.local, msg.content["arrays"].to_torch_state_dict(), shift=shift)
    return Message(RecordDict({"client": ConfigRecord({"name": c.name}),
                               "metrics": MetricRecord({k: float(v) for k, v in m.items()})}),
                   reply_to=msg)


def _send(grid: Grid, nodes: List[int], kind: str, content: RecordDict, rnd: int,
          timeout: float) -> Dict[int, Message]:
    msgs = [Message(content, dst_node_id=n, message_type=kind, group_id=str(rnd)) for n in nodes]
    return {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs, timeout=timeout)}


def _names(grid: Grid, expected: int, timeout: float, rnd: int = 0) -> Dict[int, str]:
    """node id -> client name of every connected SuperNode that answers (waits for
    ``expected`` of them to connect); asked again every round, so a restarted SuperNode (a new
    node id) serves its client again and a dead one drops out."""
    t0 = time.monotonic()
    while len(list(grid.get_node_ids())) < expected and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    replies = _send(grid, nodes, MessageType.QUERY, RecordDict(), rnd, timeout)
    names = {n: str(m.content["client"]["name"]) for n, m in replies.items() if not m.has_error()}
    errors = {n: m.error.reason for n, m in replies.items() if m.has_error()}
    if errors and not names:
        raise FederationError(f"SuperNodes failed to name their client: {errors}")
    by_name: Dict[str, int] = {}
    for n, name in sorted(names.items()):
        by_name[name] = n  # one node per client (a dead one does not answer)
    return {n: name for name, n in by_name.items()}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, folder = _config(context)
    try:
        _main(grid, context, cfg, folder)
    except BaseException as e:  # the deployer watches the record: say why it stopped
        if not (folder / "meta.json").is_file() or read_json(folder / "meta.json").get("status") != "failed":
            record_failure(folder, e)
        raise


def _main(grid: Grid, context: Context, cfg: FLConfig, folder: Path) -> None:
    expected = int(context.run_config.get("num-clients", 1))
    names = _names(grid, expected, cfg.connect_timeout_s)
    if len(names) < expected:
        raise FederationError(f"{len(names)} of {expected} SuperNodes named their client within "
                              f"{cfg.connect_timeout_s:g} s: {sorted(names.values())}")

    def histograms_all() -> Dict[str, Union[np.ndarray, BaseException]]:
        content = RecordDict({"config": ConfigRecord({"ask": "histogram"})})
        replies = _send(grid, sorted(names), MessageType.QUERY, content, 0, cfg.round_timeout_s)
        out: Dict[str, Union[np.ndarray, BaseException]] = {}
        for node, m in replies.items():
            name = names.get(node, f"node {node}")
            out[name] = (DpskinError(m.error.reason) if m.has_error()
                         else np.asarray(json.loads(str(m.content["client"]["histogram"]))))
        return out

    def fit_all(rnd: int, weights, asked: List[str],
                prior: Optional[np.ndarray]) -> Dict[str, Union[FitResult, BaseException]]:
        if rnd > 1:
            names.clear()
            names.update(_names(grid, 0, cfg.round_timeout_s, rnd))
        conf: Dict[str, Union[int, str]] = {"round": rnd}
        if prior is not None:
            conf["prior"] = json.dumps(np.asarray(prior).tolist())
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=weights),
                              "config": ConfigRecord(conf)})
        out: Dict[str, Union[FitResult, BaseException]] = {}
        nodes = sorted(n for n, name in names.items() if name in asked)
        replies = _send(grid, nodes, MessageType.TRAIN, content, rnd, cfg.round_timeout_s)
        for node in [n for n in nodes if n not in replies]:  # no reply: not asked to evaluate
            names.pop(node)
        for node, m in replies.items():
            name = names.get(node, f"node {node}")
            if m.has_error():
                out[name] = DpskinError(m.error.reason)
                continue
            hist = [tuple(h) for h in json.loads(str(m.content["client"]["history"]))]
            n = m.content["metrics"].get("num-examples")
            out[name] = FitResult(m.content["arrays"].to_torch_state_dict(),
                                  None if n is None else int(n), None, hist)
        return out

    def evaluate_all(weights, prior: Optional[np.ndarray]) -> Dict[str, Dict[str, float]]:
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=weights)})
        if prior is not None:  # the clients keep part of the federation's prior at prediction
            content["config"] = ConfigRecord({"prior": json.dumps(np.asarray(prior).tolist())})
        replies = _send(grid, sorted(names), MessageType.EVALUATE, content, -1, cfg.round_timeout_s)
        return {names[n]: dict(m.content["metrics"]) for n, m in replies.items()
                if not m.has_error() and n in names}

    serve(cfg, folder, sorted(set(names.values())), fit_all, evaluate_all, progress=False,
          histograms_all=histograms_all)


__all__ = ["client_app", "server_app"]
