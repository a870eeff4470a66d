"""Benchmark: DP-SGD step time and peak memory of every per-sample gradient engine against
non-private SGD, side by side in one invocation (not a test; run on demand).

For each backbone x image size x thread count, non-private training and DP-SGD with each
``grad_sample_mode`` run the trainer's own epoch (:func:`dpskin_core.training.trainer.
train_one_epoch`: Poisson batches, augmentation, optimizer) on the first ``batch x steps``
training images of ISIC 2018 (``--data-root``; the embedded synthetic set when absent), each
in its own process (so peak memory, ru_maxrss, is per configuration). One warm-up epoch, then
``--repeats`` timed epochs; the row keeps the fastest. The input pipeline's share of the step
(gather, augmentation, normalisation: ``Inputs.train_batch``) is timed inside the same epochs.

    python benchmarks/bench_dp_modes.py --out benchmarks/results/dp_modes.csv

Prints and writes one row per configuration with ``time_ratio`` and ``memory_ratio`` against
the non-private row of the same backbone, size, threads and batch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

def _modes() -> tuple:
    """Non-private SGD and every registered per-sample gradient engine."""
    from dpskin_core.training.persample import GRAD_SAMPLE_MODES

    return ("nonprivate", *GRAD_SAMPLE_MODES.names())
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/isic2018_task3_200x150"


def one(args: argparse.Namespace) -> dict:
    """Time one configuration in this process; returns its row."""
    import numpy as np
    import torch

    from dpskin_core import RunConfig
    from dpskin_core.data import DataBundle, DataSpec, load_data
    from dpskin_core.training import trainer

    torch.set_num_threads(args.threads)
    real = Path(args.data_root).is_dir()
    spec = (DataSpec(dataset="isic2018", data_root=args.data_root, image_size=args.size) if real
            else DataSpec(dataset="synthetic", image_size=args.size, synth_n=max(1200, 2 * args.batch * args.steps)))
    full = load_data(spec)
    n = args.batch * args.steps
    idx = np.arange(n) % len(full.y_train)
    meta = pd.concat([full.meta[full.meta["split"] == "train"].iloc[idx],
                      full.meta[full.meta["split"] != "train"]], ignore_index=True)
    data = DataBundle(full.x_train[idx], full.y_train[idx], full.x_val, full.y_val,
                      full.x_test, full.y_test, meta, info=full.info)
    dp = args.mode != "nonprivate"
    cfg = RunConfig(name="bench", backbone=args.backbone, image_size=args.size, batch_size=args.batch,
                    epochs=1 + args.repeats, lr=0.05, dp=dp, target_epsilon=8.0 if dp else None,
                    delta=1e-5, dp_noise="seeded", grad_sample_mode=args.mode if dp else "auto",
                    progress=False, num_threads=args.threads, dataset=spec.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        s = trainer.start(cfg, data, Path(tmp))
        epochs = []
        for epoch in range(1, cfg.epochs + 1):
            pipe0, t0 = s.inputs.pipeline_s, time.perf_counter()
            trainer.train_one_epoch(s, epoch)
            epochs.append((time.perf_counter() - t0, s.inputs.pipeline_s - pipe0))
    best, best_pipe = min(epochs[1:])
    return {"backbone": args.backbone, "image_size": args.size, "threads": args.threads,
            "mode": args.mode, "batch": args.batch, "steps": s.setup.steps_per_epoch,
            "s_per_step": best / s.setup.steps_per_epoch, "input_pipeline_share": best_pipe / best,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "grad_sample_mode": s.setup.grad_sample_mode, "data": spec.dataset,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--grid", default="smallcnn:32:256,resnet18:32:64,resnet18:64:32",
                   help="backbone:size:batch,... (batch per backbone keeps the hooks mode in memory)")
    p.add_argument("--modes", default=None, help="comma-separated (default: nonprivate and every engine)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=4, help="Poisson batches per timed epoch")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs after one warm-up")
    p.add_argument("--out", default="benchmarks/results/dp_modes.csv")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone"), p.add_argument("--size", type=int), p.add_argument("--batch", type=int)
    p.add_argument("--mode"), p.add_argument("--thread", type=int)
    args = p.parse_args()
    if args.one:
        args.threads = args.thread
        print(json.dumps(one(args)))
        return
    rows, modes = [], args.modes or ",".join(_modes())
    for spec in args.grid.split(","):
        backbone, size, batch = spec.split(":")
        for threads in args.threads.split(","):
            for mode in modes.split(","):
                cmd = [sys.executable, __file__, "--one", "--backbone", backbone, "--size", size,
                       "--batch", batch, "--mode", mode, "--thread", threads, "--data-root",
                       args.data_root, "--steps", str(args.steps), "--repeats", str(args.repeats)]
                r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if r.returncode != 0:
                    tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                    row = {"backbone": backbone, "image_size": int(size), "threads": int(threads),
                           "mode": mode, "batch": int(batch), "error": tail}
                else:
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(row, flush=True)
    df = pd.DataFrame(rows)
    key = ["backbone", "image_size", "threads", "batch"]
    base = df[df["mode"] == "nonprivate"].set_index(key)
    df = df.join(base[["s_per_step", "peak_rss_mb"]].rename(columns=lambda c: "np_" + c), on=key)
    df["time_ratio"] = df["s_per_step"] / df["np_s_per_step"]
    df["memory_ratio"] = df["peak_rss_mb"] / df["np_peak_rss_mb"]
    df["load_avg_1min"] = os.getloadavg()[0]
    df = df.drop(columns=["np_s_per_step", "np_peak_rss_mb"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = [c for c in ["backbone", "image_size", "threads", "mode", "grad_sample_mode", "s_per_step",
                        "time_ratio", "peak_rss_mb", "memory_ratio", "input_pipeline_share", "error"]
            if c in df]
    print(df[cols].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
