"""Does averaging a released predictor over dihedral views of each image help? (not a test)

Test-time augmentation is post-processing of a released model (it queries the model and
nothing else), so it would cost no privacy; this measures whether it is worth adopting.
For every finished run of a runs folder evaluated on ``--split`` (its ``eval_split``; the
validation runs by default), the run's released predictor
(:func:`dpskin_core.attacks.victims.load_trained`, its kept prior shift included) scores the
``--score`` split (validation by default: where a choice is made; ``--score test`` reports a
choice already made, never makes one) by the mean softmax over the first 1, 2, 4 and 8 symmetries of the square
(:data:`dpskin_core.attacks.victims.DIHEDRAL`: identity, horizontal flip, vertical flip,
transpose, ...), paired: the same network on the same images. ``--score train`` with
``--views 1`` measures how well each released model fits its own (unaugmented)
training images: an under-fitting diagnostic, beside its validation score.

    python benchmarks/tta_views.py --runs runs/val --backbone smallcnn_stats \
        --out benchmarks/results/tta_views_dp_32px_val.csv
    python benchmarks/tta_views.py --runs runs/cpu64 --backbone resnet18 --split test \
        --nonprivate --out benchmarks/results/tta_views_resnet18_64px_val.csv
    python benchmarks/tta_views.py --runs runs/cpu64 --backbone resnet18 --split test \
        --nonprivate --score train,val --views 1 --out benchmarks/results/fit_resnet18_64px.csv

One row per run and number of views (``bacc``; ``gain`` against the single view).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from tqdm.auto import tqdm

from dpskin_core.attacks.victims import load_trained
from dpskin_core.data.datasets import DataBundle, load_data
from dpskin_core.training.metrics import balanced_accuracy
from dpskin_core.training.records import load_runs
from dpskin_core.training.trainer import data_spec

VIEWS = (1, 2, 4, 8)


def finished(root: Path, split: str, backbone: Optional[str], private: bool) -> List[Path]:
    """The folders of the complete runs under ``root`` of ``backbone`` (None: every network),
    DP when ``private`` (else non-private), evaluated on ``split``, sorted."""
    runs = load_runs(root)
    keep = (runs["eval_split"] == split) & (runs["dp"].astype(bool) == private)
    if backbone is not None:
        keep &= runs["backbone"] == backbone
    return [Path(d) for d in sorted(runs.loc[keep, "run_dir"])]


def run_rows(run_dir: Path, splits: Tuple[str, ...], cache: Dict[str, DataBundle],
             views: Tuple[int, ...] = VIEWS) -> List[dict]:
    """One row per scored split and number of ``views`` for the run in ``run_dir`` (its model
    loaded once). (The validation split of a run evaluated on test is the one it chose its
    epoch on.)"""
    m = load_trained(run_dir)
    spec = data_spec(m.config)
    key = repr(spec)
    if key not in cache:  # one decode per data spec (side, split seed), not per run
        cache[key] = load_data(spec)
    c = m.config
    base = {"run": run_dir.name, "backbone": c.backbone, "dp": c.dp, "optimizer": c.optimizer,
            "seed": c.seed, "target_eps": c.target_epsilon, "image_size": c.image_size,
            "patience": c.early_stopping_patience, "split": c.split}
    rows: List[dict] = []
    for split in splits:
        x, y = getattr(cache[key], f"x_{split}"), getattr(cache[key], f"y_{split}")
        probs = softmax(m.view_logits(x, views=max(views)), axis=-1)  # (N, V, C)
        one = [{**base, "scored": split, "views": v,
                "bacc": balanced_accuracy(y, probs[:, :v].mean(1).argmax(1))} for v in views]
        for r in one:
            r["gain"] = r["bacc"] - one[0]["bacc"]
        rows += one
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/val", help="runs folder")
    ap.add_argument("--backbone", default=None, help="only this network's runs")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="read the runs evaluated on this split")
    ap.add_argument("--score", default="val",
                    help="the split(s) scored, a comma list of train, val, test (test: a "
                         "report, never a choice; train: the fit)")
    ap.add_argument("--views", type=int, choices=VIEWS, default=max(VIEWS),
                    help="score 1, 2, ... up to this many views")
    ap.add_argument("--nonprivate", action="store_true", help="the non-private runs, not DP")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="CSV of every run and number of views")
    a = ap.parse_args()
    scored = a.score.split(",")  # in the order given
    bad = [s for s in scored if s not in ("train", "val", "test")]
    if bad:
        raise SystemExit(f"--score: unknown split(s) {bad}; expected train, val or test")
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.runs)
    if not root.is_dir():
        raise SystemExit(f"--runs {root}: no such folder")
    dirs = finished(root, a.split, a.backbone, not a.nonprivate)
    if not dirs:
        raise SystemExit(f"{root}: no finished {'non-private' if a.nonprivate else 'DP'} run "
                         f"evaluated on {a.split}")
    cache: Dict[str, DataBundle] = {}
    views = tuple(v for v in VIEWS if v <= a.views)
    rows = [r for d in tqdm(dirs, desc="runs") for r in run_rows(d, tuple(scored), cache, views)]
    df = pd.DataFrame(rows)
    if a.out:
        df.to_csv(a.out, index=False)
    g = df.groupby(["backbone", "optimizer", "target_eps", "image_size", "patience", "scored",
                    "views"], dropna=False)
    print(g.agg(n=("run", "size"), bacc=("bacc", "mean"), gain=("gain", "mean"),
                gained=("gain", lambda s: int((s > 0).sum()))).round(3).to_string())


if __name__ == "__main__":
    main()
