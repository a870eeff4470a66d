"""Run records: one folder per run, keyed by a hash of the config plus the code version.

Layout of ``<runs_root>/<run_id>/``::

    config.json        the full config (semantic + execution fields)
    meta.json          run id, code version, git commit, package versions, device, timings,
                       throughput, peak memory, privacy parameters, notes, status
    metrics.csv        tidy: run, seed, epoch, split, metric, value, eps, delta, noise_multiplier
    predictions.csv    per image of the evaluation split: image, label, pred, prob_<CLASS>...
    checkpoints/          the training state, see :mod:`.checkpoint` (its one schema)

Run folders are never deleted by dpskin: a new config or new code gives a new run id.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..errors import RunLockedError
from ..files import read_json
from .config import RunConfig

PathLike = Union[str, Path]
_PKG_DIR = Path(__file__).resolve().parent.parent  # dpskin_core/
METRIC_COLUMNS = ["run", "seed", "epoch", "split", "metric", "value", "eps", "delta", "noise_multiplier"]
#: meta.json fields copied into each row of :func:`load_runs`
RUN_META_FIELDS = ("epsilon", "noise_multiplier", "sample_rate", "steps", "wall_time_s",
                   "train_images_per_s", "peak_memory_mb", "code_version", "eval_epoch",
                   "collapsed")
#: meta.json: what a run released about its training data before its first step (noisy class
#: histogram, noisy feature statistics; each counted in its eps), and what is computed from it
RELEASED_KEY = "released_before_training"
#: in ``RELEASED_KEY``: the released predictor's logit shift (``la_tau_kept``), a function of the
#: noisy histogram beside it (post-processing, not a release of its own)
SHIFT_KEY = "prediction_logit_shift"


def default_runs_root() -> Path:
    """``$DPSKIN_RUNS`` or ``./runs``."""
    return Path(os.environ.get("DPSKIN_RUNS", "runs"))


#: the module whose import closure is "the training code" of a run
TRAINING_ENTRY = "dpskin_core.training.trainer"


def _module_file(name: str) -> Optional[Path]:
    """The source file of package module ``name`` (dotted), or None outside the package."""
    parts = name.split(".")
    if parts[0] != _PKG_DIR.name:
        return None
    base = _PKG_DIR.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports_of(name: str, path: Path) -> List[str]:
    """Package modules that module ``name`` imports, also inside functions: ``from .x import
    y`` gives ``x`` and, when ``x.y`` is a module, ``x.y``."""
    import ast

    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append(mod)
            out.extend(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out.extend(m for m in mods if m.split(".")[0] == _PKG_DIR.name)
    return [m for m in out if _module_file(m) is not None]


def training_modules() -> List[str]:
    """The dpskin_core modules a training run executes: :data:`TRAINING_ENTRY` and, transitively,
    every package module it imports (relative or absolute, also inside functions).

    Modules outside this set (the book, the CLI, downloads, attacks on finished models) cannot
    change what a run computes, so editing them keeps finished runs valid. Returned as paths
    relative to the package, sorted.
    """
    todo, seen = [TRAINING_ENTRY], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imports_of(name, _module_file(name)))
    return sorted(_module_file(m).relative_to(_PKG_DIR).as_posix() for m in seen)


def code_version(scope: str = "training") -> str:
    """Hash of dpskin_core sources (12 hex digits).

    ``scope="training"`` (run ids) hashes :func:`training_modules`, so a change to anything a
    run executes gives new run ids; ``scope="all"`` (executed notebooks) hashes the whole
    package, so any change re-executes the book's notebooks.
    """
    if scope == "training":
        files = [_PKG_DIR / m for m in training_modules()]
    elif scope == "all":
        files = sorted(_PKG_DIR.rglob("*.py"))
    else:
        raise ValueError(f"code_version scope must be 'training' or 'all', got {scope!r}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(_PKG_DIR).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def config_hash(cfg: RunConfig, version: Optional[str] = None) -> str:
    """Run id: sha256 of the semantic config and the code version, 16 hex digits."""
    payload = json.dumps(
        {"config": cfg.semantic_dict(), "code": version or code_version()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_dir_for(cfg: RunConfig, runs_root: Optional[PathLike] = None) -> Path:
    return Path(runs_root or default_runs_root()) / config_hash(cfg)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (creating it) while a process trains it.

    A second process asking for the same run fails at once with :class:`RunLockedError`
    naming the holder, instead of training the run twice (its record would then mix two
    processes' epochs). The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: released when the
    holder exits, even if it is killed.
    """
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLockedError(f"run {run_dir.name} is being trained by {holder} (lock "
                                 f"{path}); wait for it to finish, or use another runs folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit() -> Dict[str, Any]:
    """Commit of the checkout holding dpskin_core and whether it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=_PKG_DIR, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", str(_PKG_DIR)))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or None, "dirty": dirty}


def package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "torchvision", "opacus", "dp-accounting", "numpy", "pandas",
                 "scikit-learn", "pillow", "dpskin"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def is_complete(run_dir: PathLike) -> bool:
    """Whether the run in ``run_dir`` finished (its ``meta.json`` says ``complete``)."""
    meta = Path(run_dir) / "meta.json"
    return meta.is_file() and read_json(meta).get("status") == "complete"


# --------------------------------------------------------------------------- loading
def _run_dirs(runs_root: PathLike) -> Iterable[Path]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def _records(runs_root: Optional[PathLike], complete_only: bool):
    """(folder, config, meta) of each run under ``runs_root`` (complete ones only if asked)."""
    for d in _run_dirs(runs_root or default_runs_root()):
        meta = read_json(d / "meta.json")
        if not complete_only or meta.get("status") == "complete":
            yield d, read_json(d / "config.json"), meta


def run_row(d: Path, cfg: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The row of :func:`load_runs` for one run folder ``d`` (its config and meta read)."""
    row = {"run": d.name, "run_dir": str(d), "status": meta.get("status"), **cfg}
    row["method"] = meta.get("method")
    for k in RUN_META_FIELDS:
        row[k] = meta.get(k)
    row["n_units"] = (meta.get("privacy") or {}).get("n_units")
    for k, v in (meta.get("final_metrics") or {}).items():
        row[k] = v
    return row


def load_run(run_dir: PathLike) -> Dict[str, Any]:
    """The row of :func:`load_runs` of the one run in ``run_dir`` (complete or not)."""
    d = Path(run_dir)
    return run_row(d, read_json(d / "config.json"), read_json(d / "meta.json"))


def load_runs(runs_root: Optional[PathLike] = None, complete_only: bool = True) -> pd.DataFrame:
    """One row per run: config fields, privacy parameters and final evaluation metrics (no
    run: an empty frame with the columns every row has, so column selections still work)."""
    rows = [run_row(d, cfg, meta) for d, cfg, meta in _records(runs_root, complete_only)]
    if not rows:
        return pd.DataFrame(columns=["run", "run_dir", "status",
                                     *(f.name for f in fields(RunConfig)), "method",
                                     *RUN_META_FIELDS, "n_units"])
    return pd.DataFrame(rows)


def load_metrics(runs_root: Optional[PathLike] = None, complete_only: bool = True) -> pd.DataFrame:
    """All runs' tidy metric tables concatenated, joined with a few config columns."""
    frames = []
    for d, cfg, meta in _records(runs_root, complete_only):
        if not (d / "metrics.csv").is_file():
            continue
        df = pd.read_csv(d / "metrics.csv")
        for k in ("name", "backbone", "optimizer", "dp", "target_epsilon", "dataset"):
            df[k] = cfg.get(k)
        df["method"] = meta.get("method")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS)


# --------------------------------------------------------------------------- the released predictor
def with_prediction_shift(released: Mapping[str, Any], la_tau_kept: float,
                          shift: Sequence[float]) -> Dict[str, Any]:
    """``released`` (a run's ``RELEASED_KEY`` record) with the released predictor's logit shift
    (C,) recorded beside the noisy histogram it was computed from."""
    return {**released, SHIFT_KEY: {"la_tau_kept": float(la_tau_kept),
                                    "shift": [float(v) for v in shift]}}


def prediction_shift(meta: Mapping[str, Any]) -> Optional[np.ndarray]:
    """The logit shift (C,) as float64 that a run's released predictor adds to its network's
    logits (a run that kept part of its noisy class prior, ``la_tau_kept``), read from the run's
    ``meta.json`` contents; None when it kept none (the released predictor is the network)."""
    kept = (meta.get(RELEASED_KEY) or {}).get(SHIFT_KEY)
    return np.asarray(kept["shift"], dtype=np.float64) if kept else None


def load_predictions(run_dir: PathLike) -> pd.DataFrame:
    """The run's ``predictions.csv``: one row per image of its evaluation split."""
    return pd.read_csv(Path(run_dir) / "predictions.csv")
