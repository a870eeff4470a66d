"""How much of the class prior a logit-adjusted DP model should keep at prediction (not a test).

A DP run with the noisy-histogram logit adjustment (``logit_adjust``, strength ``la_tau``)
predicts with logits f(x) + ``la_tau_kept`` * log(prior), the prior being its released noisy
histogram; changing ``la_tau_kept`` is post-processing of what the run released, so one run's
validation predictions score every strength, paired (the same network and noise): no retraining.
This reads the finished runs of a runs folder that were evaluated on the **validation** split
(``eval_split: val``: where the strength is chosen), removes each run's own shift and scores
the strengths of ``--kept``. ``--split test`` reads the test runs instead, to report what a
strength already chosen on validation changed on the same networks; never choose there.

    python benchmarks/posthoc_prior.py --runs runs/val --backbone smallcnn_stats \
        --out benchmarks/results/dp_sgd_32px_kept_posthoc_val.csv

One row per run and strength (``bacc``; ``gain`` against strength 0); the summary gives, per
budget and training strength tau, the mean gain and how many runs gained.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from dpskin_core.constants import CLASSES
from dpskin_core.files import read_json
from dpskin_core.training.metrics import balanced_accuracy
from dpskin_core.training.records import RELEASED_KEY, load_runs, prediction_shift
from dpskin_core.training.technique import log_prior


def selected(root: Path, backbone: str | None, split: str) -> pd.DataFrame:
    """The rows of :func:`load_runs` of the finished logit-adjusted DP runs under ``root`` of
    ``backbone`` (None: every network) evaluated on ``split``, sorted by run."""
    runs = load_runs(root)
    keep = (runs["dp"].astype(bool) & runs["logit_adjust"].astype(bool)
            & (runs["eval_split"] == split))
    if backbone is not None:
        keep &= runs["backbone"] == backbone
    return runs[keep].sort_values("run")


def run_rows(run: pd.Series, kept: list) -> list:
    """One row per strength in ``kept`` for the run of ``run`` (a row of :func:`selected`)."""
    d = Path(run["run_dir"])
    meta = read_json(d / "meta.json")
    prior = log_prior(np.asarray(meta[RELEASED_KEY]["class_histogram"], dtype=np.float64))
    pred = pd.read_csv(d / "predictions.csv")
    logp = np.log(np.clip(pred[[f"prob_{c}" for c in CLASSES]].to_numpy(), 1e-300, None))
    own = prediction_shift(meta)
    if own is not None:  # back to the network's own logits (up to a per-image constant)
        logp = logp - own
    y = pred["label"].to_numpy()
    # a run recorded before la_tau_kept existed kept no prior
    trained_kept = 0.0 if pd.isna(run.get("la_tau_kept")) else float(run["la_tau_kept"])
    base = {k: run[k] for k in ("run", "backbone", "optimizer", "seed")}
    base.update({"target_eps": run["target_epsilon"],
                 **{k: run[k] for k in ("image_size", "batch_size", "epochs", "ema_decay",
                                        "augment_translate", "aug_mult", "la_tau")},
                 "trained_kept": trained_kept})
    return [{**base, "kept": k, "bacc": balanced_accuracy(y, np.argmax(logp + k * prior, axis=1))}
            for k in kept]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/val", help="runs folder")
    ap.add_argument("--backbone", default=None, help="only this network's runs")
    ap.add_argument("--kept", default="0,0.25,0.5,0.75,1", help="comma list of strengths")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="the runs evaluated on this split (test: a report, never a choice)")
    ap.add_argument("--out", default=None, help="CSV of every run and strength")
    a = ap.parse_args()
    kept = [float(k) for k in a.kept.split(",")]
    if 0.0 not in kept:
        kept = [0.0] + kept
    root = Path(a.runs)
    if not root.is_dir():
        raise SystemExit(f"--runs {root}: no such folder")
    rows = [r for _, run in selected(root, a.backbone, a.split).iterrows()
            for r in run_rows(run, kept)]
    if not rows:
        raise SystemExit(f"{root}: no finished logit-adjusted DP run evaluated on {a.split}")
    df = pd.DataFrame(rows)
    base = df[df.kept == 0.0].set_index("run")["bacc"]
    df["gain"] = df["bacc"] - df["run"].map(base)
    if a.out:
        df.to_csv(a.out, index=False)
    setting = ["backbone", "optimizer", "target_eps", "image_size", "batch_size", "epochs",
               "ema_decay", "augment_translate", "aug_mult", "la_tau"]
    g = df.groupby(setting + ["kept"], dropna=False)
    summary = g.agg(n=("run", "size"), bacc=("bacc", "mean"), gain=("gain", "mean"),
                    gained=("gain", lambda s: int((s > 0).sum())))
    print(summary.round(3).to_string())
    at = df[(df.la_tau == 2.0) & (df.kept > 0)].groupby(["optimizer", "target_eps", "image_size",
                                                            "kept"])
    print("\nevery run trained at tau = 2, by budget and side:")
    print(at.agg(n=("run", "size"), gain=("gain", "mean"),
                 gained=("gain", lambda s: int((s > 0).sum()))).round(3).to_string())


if __name__ == "__main__":
    main()
