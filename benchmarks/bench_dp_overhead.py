"""Benchmark: non-private vs DP-SGD vs DP-Adam on real ISIC 2018 data (not a test).

Runs each method through ``dpskin_core.run`` (so every figure has a run record) in its own
subprocess (so peak memory is per method), with the same backbone, image size and epochs,
then prints images/s, the DP / non-private step-time ratio of this one benchmark run, peak
memory and balanced accuracy on the validation and test splits.

    python benchmarks/bench_dp_overhead.py --data-root ../shared/data/isic2018_task3_200x150 \
        --epochs 5 --out benchmarks/results/dp_overhead.csv
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

METHODS = {
    # name: config overrides. Learning rates: DP-SGD uses a large lr with clipping C=1
    # (mean-reduced noisy gradients are small); Adam is scale-free.
    "nonprivate-sgd": dict(dp=False, optimizer="sgd", lr=0.05),
    "dp-sgd": dict(dp=True, optimizer="sgd", lr=1.0),
    "dp-adam": dict(dp=True, optimizer="adam", lr=1e-3),
}


def one(method: str, args: argparse.Namespace) -> dict:
    from dpskin_core import RunConfig, run

    cfg = RunConfig(name=f"bench-{method}", dataset="isic2018", data_root=args.data_root,
                    image_size=args.image_size, backbone=args.backbone, epochs=args.epochs,
                    batch_size=args.batch_size, target_epsilon=args.epsilon if METHODS[method]["dp"] else None,
                    seed=args.seed, eval_split="test", progress=not args.quiet,
                    num_threads=args.threads, **METHODS[method])
    res = run(cfg, runs_root=args.runs)
    val = res.metrics[(res.metrics.split == "val") & (res.metrics.metric == "balanced_accuracy")]
    return {
        "method": method, "run": res.run_id, "reused": res.reused,
        "images_per_s": res.meta["train_images_per_s"], "seconds_per_step": res.meta["seconds_per_step"],
        "peak_memory_mb": res.meta["peak_memory_mb"], "epsilon": res.epsilon, "delta": cfg.delta if cfg.dp else None,
        "noise_multiplier": res.noise_multiplier, "accountant": cfg.accountant if cfg.dp else None,
        "val_bacc_last": float(val.sort_values("epoch")["value"].iloc[-1]),
        "test_bacc": res.final_metrics["balanced_accuracy"], "epochs": args.epochs,
        "threads": args.threads, "load_avg_1min_at_end": __import__("os").getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/isic2018_task3_200x150"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="smallcnn")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", default="benchmarks/results/dp_overhead.csv")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: steady figures on a shared 2-core machine)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:  # child process: one method, JSON on the last stdout line
        print(json.dumps(one(args._one, args)))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--_one", m] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    df = pd.DataFrame(rows)
    if "nonprivate-sgd" in set(df.method):
        base = float(df.loc[df.method == "nonprivate-sgd", "seconds_per_step"].iloc[0])
        df["step_time_ratio_vs_nonprivate"] = df["seconds_per_step"] / base
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
