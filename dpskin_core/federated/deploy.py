"""A federation on Flower's deployment engine, every process on 127.0.0.1, started, watched
and stopped by one call (``dpskin fl deploy``).

One SuperLink (``flower-superlink --insecure --disable-runtime-dependency-installation``), one
SuperNode per client (``flower-supernode --insecure --node-config "partition-id=i
num-partitions=N"``), then ``flwr run <app> dpskin-local`` with the app (a pyproject naming
:mod:`.app`'s ServerApp and ClientApp, and the federation's config) and the SuperLink
connection written by this module into the federation's folder (``app/``, ``flwr_home/``).
Telemetry and update checks are always off. The call returns when the ServerApp has recorded
the federation complete, and raises :class:`~.federation.FederationError` naming the process
whose log tells why otherwise (a process that exits early, a start or a run that exceeds its
time bound). Every process is stopped on the way out. Logs: ``<federation>/logs/``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

from ..errors import ConfigError
from ..files import read_json, write_json
from .federation import FederationError, FLConfig, FLResult, federation_dir, load_clients, read_complete

PathLike = Union[str, Path]
HOST = "127.0.0.1"
CONNECTION = "dpskin-local"
#: always set for every Flower process (no connection leaves 127.0.0.1)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def write_app(folder: Path, cfg: FLConfig, n_clients: int) -> Path:
    """The Flower app folder of the federation (its pyproject; the code is :mod:`.app`)."""
    app = folder / "app"
    app.mkdir(parents=True, exist_ok=True)
    write_json(folder / "fl_config.json", cfg.to_dict())
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dpskin-federation"
version = "1.0.0"
description = "dpskin federation {folder.name} (the code is dpskin_core.federated.app)"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "dpskin"

[tool.flwr.app.components]
serverapp = "dpskin_core.federated.app:server_app"
clientapp = "dpskin_core.federated.app:client_app"

[tool.flwr.app.config]
fl-config = "{(folder / 'fl_config.json').resolve()}"
fl-folder = "{folder.resolve()}"
num-clients = {n_clients}
''')
    return app


def write_connection(folder: Path, port: int) -> Path:
    """``FLWR_HOME`` with the SuperLink connection :data:`CONNECTION` (127.0.0.1, insecure)."""
    home = folder / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'''[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "{HOST}:{port}"
insecure = true
''')
    return home


@dataclass
class Processes:
    """The federation's processes by name, their log files and environment."""

    logs: Path
    env: Dict[str, str]
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: List[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)  # its own group: stopped with its children
        self.procs[name] = p
        return p

    def tail(self, name: str, n: int = 2000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def check(self) -> None:
        """FederationError naming the first process that has exited."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise FederationError(f"{name} exited with {p.returncode}; its log "
                                      f"({self.logs / (name + '.log')}) ends:\n{self.tail(name)}")

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        # the whole group: a process that has exited may have left children (superexec)
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            t0 = time.monotonic()
            while time.monotonic() - t0 < wait:
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    p.poll()
                    return
                p.poll()
                time.sleep(0.1)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:  # SuperNodes before the SuperLink
            self.stop(name)


@contextmanager
def processes(folder: Path, home: Path) -> Iterator[Processes]:
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}
    ps = Processes(logs, env)
    try:
        yield ps
    finally:
        ps.stop_all()


def start_superlink(ps: Processes, port: int, timeout_s: float) -> None:
    ps.start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                           "--host", HOST, "--port", str(port)])
    t0 = time.monotonic()
    while not _listening(port):
        ps.check()
        if time.monotonic() - t0 > timeout_s:
            raise FederationError(f"the SuperLink did not listen on {HOST}:{port} within {timeout_s:g} s")
        time.sleep(0.3)


def start_supernode(ps: Processes, i: int, n: int, superlink_port: int,
                    max_wait_s: float = 30.0) -> str:
    """SuperNode ``i`` of ``n``; it gives up after ``max_wait_s`` without a SuperLink."""
    name = f"supernode-{i}"
    ps.start(name, ["flower-supernode", "--insecure", "--superlink", f"{HOST}:{superlink_port}",
                    "--port", str(free_port()), "--max-wait-time", str(max_wait_s),
                    "--node-config", f"partition-id={i} num-partitions={n}"])
    return name


class Deployment:
    """The federation's processes on 127.0.0.1 (a context manager: everything is stopped on
    exit): ``submit`` the run, ``wait`` for its record; ``kill`` / ``restart`` a SuperNode (the
    fault tests)."""

    def __init__(self, cfg: FLConfig, runs_root: Optional[PathLike] = None, *,
                 startup_timeout_s: float = 60.0, run_timeout_s: float = 3600.0, data=None) -> None:
        if cfg.partition.groups_per_site > 1:
            raise ConfigError(f"federation {cfg.name}: {cfg.partition.groups_per_site} virtual clients "
                              "per site would need one SuperNode each; run it in one process "
                              "(`dpskin fl run`), where they are scored at their sites")
        self.cfg, self.startup_timeout_s, self.run_timeout_s = cfg, startup_timeout_s, run_timeout_s
        self.folder = federation_dir(cfg, runs_root)
        self.meta_path = self.folder / "meta.json"
        self.n = len(load_clients(cfg, data))  # the operator's view: how many SuperNodes
        self._ctx = None

    @property
    def complete(self) -> bool:
        return self.meta_path.is_file() and read_json(self.meta_path).get("status") == "complete"

    def __enter__(self) -> "Deployment":
        self.port = free_port()
        self.app = write_app(self.folder, self.cfg, self.n)
        home = write_connection(self.folder, self.port)
        self._ctx = processes(self.folder, home)
        self.ps = self._ctx.__enter__()
        try:
            start_superlink(self.ps, self.port, self.startup_timeout_s)
            for i in range(self.n):
                start_supernode(self.ps, i, self.n, self.port)
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def kill(self, i: int) -> None:
        """Stop SuperNode ``i`` at once (SIGKILL to its process group: its ClientApp too)."""
        p = self.ps.procs[f"supernode-{i}"]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
        self.ps.procs.pop(f"supernode-{i}")

    def restart(self, i: int) -> None:
        start_supernode(self.ps, i, self.n, self.port)

    def submit(self) -> None:
        out = subprocess.run(["flwr", "run", str(self.app), CONNECTION], env=self.ps.env,
                             capture_output=True, text=True, timeout=self.startup_timeout_s)
        (self.ps.logs / "flwr-run.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise FederationError(f"flwr run exited with {out.returncode}:\n{(out.stdout + out.stderr)[-2000:]}")

    def wait(self, check_processes: bool = True) -> FLResult:
        t0 = time.monotonic()
        while not self.complete:
            status = read_json(self.meta_path).get("status") if self.meta_path.is_file() else None
            if status == "failed":
                raise FederationError(f"the federation failed: {read_json(self.meta_path)}; logs "
                                      f"in {self.ps.logs}")
            if check_processes:
                self.ps.check()
            if time.monotonic() - t0 > self.run_timeout_s:
                raise FederationError(f"the federation did not finish within {self.run_timeout_s:g} s; "
                                      f"logs in {self.ps.logs}:\n{self.ps.tail('superlink')}")
            time.sleep(0.5)
        return read_back(self.cfg, self.folder)


def read_back(cfg: FLConfig, folder: Path) -> FLResult:
    """The record of a finished federation (FederationError: it has not finished)."""
    res = read_complete(cfg, folder)
    if res is None:
        raise FederationError(f"federation {cfg.name}: no finished record in {folder}")
    return res


def deploy(cfg: FLConfig, runs_root: Optional[PathLike] = None, *, startup_timeout_s: float = 60.0,
           run_timeout_s: float = 3600.0, data=None) -> FLResult:
    """Run the federation on the deployment engine (see the module); its record is the same
    folder as :func:`.federation.run_federation`'s, so a finished one is read back."""
    d = Deployment(cfg, runs_root, startup_timeout_s=startup_timeout_s, run_timeout_s=run_timeout_s,
                   data=data)
    if d.complete:
        return read_back(cfg, d.folder)
    with d:
        d.submit()
        return d.wait()


__all__ = ["CONNECTION", "Deployment", "FLOWER_ENV", "deploy", "free_port", "read_back", "write_app",
           "write_connection"]
