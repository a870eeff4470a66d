"""Sweeps: train (or read back) the runs of a list of configs, as the notebooks do.

Notebooks never hold training loops: they ask a recipe for its configs
(:mod:`dpskin_core.training.recipes`) and call :func:`sweep`, which calls
:func:`dpskin_core.training.run` once per config (a finished run is reused, not retrained)
and returns one row per config read back from the run records. Chapters that only read
(the summary) call :func:`recipe_runs`, which trains nothing.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import pandas as pd

from ..errors import DpskinError
from ..training import RunConfig, run
from ..training.distributed import launch
from ..training.quiet import BENIGN_WARNINGS, benign_warnings_silenced, silence_benign_warnings
from ..training.recipes import RECIPES, Params, recipe_label
from ..training.records import code_version, config_hash, is_complete, load_runs, run_dir_for

PathLike = Union[str, Path]

def _rows(configs: Sequence[RunConfig], ids: Sequence[str], runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config, from ``runs`` (a :func:`load_runs` table holding ``ids``), labelled
    with the recipe that asked for it."""
    if runs.empty or not ids:  # still with the config's columns, so callers can filter on them
        return pd.DataFrame(columns=list(dict.fromkeys(["run", *RunConfig.__dataclass_fields__,
                                                        "recipe", "label"])))
    out = runs.set_index("run").loc[list(ids)].reset_index()
    # a run shared by two recipes records the first; each row takes its caller's recipe
    out["recipe"] = [c.recipe for c in configs]
    out["label"] = [recipe_label(c.recipe) for c in configs]
    return out


def processes(nproc: int) -> int:
    """Training processes per run: ``nproc``, or for 0 one per CUDA device (1 without one)."""
    import torch

    if not isinstance(nproc, int) or nproc < 0:
        raise DpskinError(f"nproc must be an integer >= 0, got {nproc!r}")
    return nproc or max(1, torch.cuda.device_count())


def run_in(cfg: RunConfig, runs_root: PathLike, nproc: int = 1):
    """``run(cfg)``, trained by ``nproc`` processes under torchrun when more than one
    (:mod:`dpskin_core.training.distributed`); the record is then read back by ``run``."""
    n = processes(nproc)
    if n > 1 and not is_complete(run_dir_for(cfg, runs_root)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            path.write_text(json.dumps(cfg.to_dict()))
            rc = launch(n, ["dpskin_core.cli", "train", "--config", str(path), "--runs", str(runs_root)])
        if rc != 0:
            raise DpskinError(f"run {cfg.name!r}: torchrun with {n} processes exited with {rc}")
    return run(cfg, runs_root)


def sweep(configs: Iterable[RunConfig], runs_root: PathLike, *, nproc: int = 1,
          verbose: bool = True) -> pd.DataFrame:
    """Run every config; one row per config (as ``load_runs``, plus ``recipe`` and ``label``).

    Finished runs are reused (same config + code version), so re-executing a notebook, or
    resuming an interrupted profile, only trains what is missing. A line per run reports
    progress (papermill streams it to the terminal). ``nproc``: processes per run
    (:func:`processes`; the profile's ``nproc``).
    """
    configs = list(configs)
    ids: List[str] = []
    t0 = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        t = time.perf_counter()
        with benign_warnings_silenced():
            res = run_in(cfg, runs_root, nproc)
        ids.append(res.run_id)
        if verbose:
            what = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("backbone", "target_epsilon", "seed")
                             if k != "target_epsilon" or cfg.dp)
            bacc = res.final_metrics.get("balanced_accuracy", float("nan"))
            eps = f", eps {res.epsilon:.2f}" if res.epsilon is not None else ""
            print(f"[{i}/{len(configs)}] {cfg.recipe or cfg.method} {what}: balanced accuracy "
                  f"{bacc:.3f}{eps} "
                  f"({'reused' if res.reused else f'trained in {time.perf_counter() - t:.0f} s'}, "
                  f"run {res.run_id})", flush=True)
    if verbose:
        print(f"{len(configs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    return _rows(configs, ids, load_runs(runs_root))


def recipe_runs(names: Sequence[str], p: Params, runs_root: PathLike, *,
                epsilons: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """The complete runs of the current code of recipes ``names`` over the grid of ``p`` (as
    :func:`sweep` returns them), found by their run ids; nothing is trained. Grid points not
    run yet are missing from the table."""
    runs = load_runs(runs_root) if Path(runs_root).is_dir() else pd.DataFrame()
    done = set(runs.get("run", ()))  # read once: every run's record is opened
    version = code_version()
    configs = [c for n in names for c in RECIPES.get(n).configs(p, epsilons=epsilons)]
    ids = [config_hash(c, version) for c in configs]
    keep = [(c, i) for c, i in zip(configs, ids) if i in done]
    return _rows([c for c, _ in keep], [i for _, i in keep], runs)


def current_runs(runs_root: PathLike) -> pd.DataFrame:
    """Every complete run of the current code version under ``runs_root`` (runs of older code
    stay on disk, under other ids, but are not mixed into the tables of this one)."""
    runs = load_runs(runs_root)
    if runs.empty:
        return runs
    return runs[runs["code_version"] == code_version()].reset_index(drop=True)


__all__ = ["BENIGN_WARNINGS", "benign_warnings_silenced", "current_runs", "recipe_runs", "silence_benign_warnings",
           "sweep"]
