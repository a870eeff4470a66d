"""Benchmark of the proposed technique against DP-SGD / DP-Adam on real ISIC 2018 (not a test).

Every run goes through ``dpskin_core.run`` (so every figure has a run record; finished runs
are reused). Prints balanced accuracy on the lesion-grouped held-out test split, mean ± std
over seeds with n, per method and eps, and an ablation (each lever removed in turn).

    python benchmarks/bench_proposed.py --eps 1,3,8 --seeds 0,1,2 --methods proposed,ablations
    python benchmarks/bench_proposed.py --eps 3,8 --seeds 0,1,2 --methods dp-sgd,dp-adam,nonprivate
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

PROPOSED = dict(features="colour", backbone="colour_linear", dp=True, logit_adjust=True,
                ema_decay=0.9, optimizer="sgd", lr=8.0, momentum=0.9, batch_size=1024, epochs=30,
                max_grad_norm=1.0, augment_flips=False, augment_rot90=False)
ABLATIONS = {  # each lever of the technique removed in turn; key: (label, overrides)
    "la": ("proposed - logit adjustment", dict(logit_adjust=False)),
    "ema": ("proposed - EMA", dict(ema_decay=None)),
    "frontend": ("proposed - colour front end (pixels, smallcnn)", dict(
        features="pixels", backbone="smallcnn", lr=1.0, batch_size=256, epochs=10,
        augment_flips=True, augment_rot90=True)),
}
BASELINES = {
    "dp-sgd": dict(dp=True, optimizer="sgd", lr=1.0, batch_size=256, epochs=10),
    "dp-adam": dict(dp=True, optimizer="adam", lr=1e-3, batch_size=256, epochs=10),
    "nonprivate": dict(dp=False, optimizer="adam", lr=1e-3, batch_size=64, epochs=15,
                       class_weights="balanced"),
    "nonprivate proposed": {**PROPOSED, "dp": False, "lr": 1.0},
}


def main() -> None:
    from dpskin_core import RunConfig, run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/isic2018_task3_200x150"))
    p.add_argument("--eps", default="1,3,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="proposed,ablations",
                   help="comma list of: proposed, ablations, dp-sgd, dp-adam, nonprivate, 'nonprivate proposed'")
    p.add_argument("--ablations", default="la,ema,frontend", help="which levers to remove in turn")
    p.add_argument("--runs", default="runs/proposed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/proposed.csv")
    args = p.parse_args()
    base = dict(dataset="isic2018", data_root=args.data_root, image_size=32, eval_split="test",
                progress=False, num_threads=args.threads)
    eps_list = [float(e) for e in args.eps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    plan = []
    for m in methods:
        if m == "proposed":
            plan += [("proposed", PROPOSED, e) for e in eps_list]
        elif m == "ablations":
            plan += [(ABLATIONS[a][0], {**PROPOSED, **ABLATIONS[a][1]}, e)
                     for a in args.ablations.split(",") for e in eps_list if e in (3.0, 8.0)]
        elif m in BASELINES:
            d = BASELINES[m]
            plan += [(m, d, e) for e in (eps_list if d["dp"] else [None])]
        else:
            raise SystemExit(f"unknown method {m!r}")
    rows = []
    for name, over, e in plan:
        for seed in seeds:
            cfg = RunConfig(**base, **over, seed=seed, name=f"{name} eps={e} seed={seed}",
                            **({"target_epsilon": e} if over.get("dp") else {}))
            res = run(cfg, runs_root=args.runs)
            rows.append({"method": name, "target_eps": e, "seed": seed, "run": res.run_id,
                         "eps": res.epsilon, "delta": cfg.delta if cfg.dp else None,
                         "noise_multiplier": res.noise_multiplier,
                         "test_bacc": res.final_metrics["balanced_accuracy"],
                         "wall_s": res.meta.get("wall_time_s")})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    summary = (df.groupby(["method", "target_eps"], dropna=False)["test_bacc"]
               .agg(["mean", "std", "count"]).rename(columns={"count": "n"}))
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
