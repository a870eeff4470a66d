"""Run records: one folder per run, keyed by a hash of the config plus the code version.

Layout of ``<runs_root>/<run_id>/``::

    config.json        the full config (semantic + execution fields)
    meta.json          run id, code version, git commit, package versions, device, timings,
                       throughput, peak memory, privacy parameters, notes, status
    metrics.csv        tidy: run, seed, epoch, split, metric, value, eps, delta, noise_multiplier
    predictions.csv    per image of the evaluation split: image, label, pred, prob_<CLASS>...
    checkpoints/last.pt   model, optimizer, scheduler, RNG and accountant state (atomic)
    checkpoints/best.pt   best model by validation balanced accuracy (early stopping)

Run folders are never deleted by dpskin: a new config or new code gives a new run id.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Any, Dict, Iterable, Optional, Union

import pandas as pd

from .config import RunConfig

PathLike = Union[str, Path]
_PKG_DIR = Path(__file__).resolve().parent
METRIC_COLUMNS = ["run", "seed", "epoch", "split", "metric", "value", "eps", "delta", "noise_multiplier"]


def default_runs_root() -> Path:
    """``$DPSKIN_RUNS`` or ``./runs``."""
    return Path(os.environ.get("DPSKIN_RUNS", "runs"))


def training_modules() -> List[str]:
    """The dpskin_core modules a training run executes: ``train.py`` and, transitively, every
    package module it imports (``from . import x``, ``from .x import y``, also inside functions).

    Modules outside this set (the book runner, the CLI, downloads, attacks on finished models)
    cannot change what a run computes, so editing them keeps finished runs valid.
    """
    import ast

    todo, seen = ["train"], set()
    while todo:
        name = todo.pop()
        if name in seen or not (_PKG_DIR / f"{name}.py").is_file():
            continue
        seen.add(name)
        tree = ast.parse((_PKG_DIR / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module.split(".")[0])
                else:
                    todo.extend(a.name for a in node.names)
    return sorted(f"{m}.py" for m in seen)


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


def write_atomic(path: Path, data: Union[bytes, str]) -> None:
    """Write via a temp file + rename, so an interrupted write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """torch.save ``state`` atomically (the previous checkpoint survives a crash mid-save)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Path) -> Dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- loading
def _run_dirs(runs_root: PathLike) -> Iterable[Path]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def load_runs(runs_root: Optional[PathLike] = None, complete_only: bool = True) -> pd.DataFrame:
    """One row per run: config fields, privacy parameters and final evaluation metrics."""
    rows = []
    for d in _run_dirs(runs_root or default_runs_root()):
        meta = read_json(d / "meta.json")
        if complete_only and meta.get("status") != "complete":
            continue
        cfg = read_json(d / "config.json")
        row = {"run": d.name, "run_dir": str(d), "status": meta.get("status"), **cfg}
        row["method"] = meta.get("method")
        for k in ("epsilon", "noise_multiplier", "sample_rate", "steps", "wall_time_s",
                  "train_images_per_s", "peak_memory_mb", "code_version"):
            row[k] = meta.get(k)
        for k, v in (meta.get("final_metrics") or {}).items():
            row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def load_metrics(runs_root: Optional[PathLike] = None, complete_only: bool = True) -> pd.DataFrame:
    """All runs' tidy metric tables concatenated, joined with a few config columns."""
    frames = []
    for d in _run_dirs(runs_root or default_runs_root()):
        meta = read_json(d / "meta.json")
        if complete_only and meta.get("status") != "complete":
            continue
        if not (d / "metrics.csv").is_file():
            continue
        df = pd.read_csv(d / "metrics.csv")
        cfg = read_json(d / "config.json")
        for k in ("name", "backbone", "optimizer", "dp", "target_epsilon", "dataset"):
            df[k] = cfg.get(k)
        df["method"] = meta.get("method")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS)


def load_predictions(run_dir: PathLike) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "predictions.csv")
