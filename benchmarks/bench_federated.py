"""Benchmark of the federated study on real ISIC 2018 across the HAM10000 sites (not a test).

Builds the federations of chapter ``09_federated`` by name (``dpskin_core.federated.recipes``)
from a profile of ``experiments.yml`` (default ``cpu``) and that chapter's parameters for the
profile (rounds, local epochs, FedAdam's server step, virtual clients, client-level sampling
and clipping), so the benchmark trains exactly what the book trains, in the same runs folder
(finished federations and references are read back, unfinished ones resume after their last
round). Writes one row per (federation, budget, seed, site) of the final global model's test
metrics, with the global model's eps, and prints the mean over sites per federation and
budget: mean ± std over seeds, with n.

    python benchmarks/bench_federated.py --recipes fedavg,fedavg-dp --eps 8 --seeds 0
    python benchmarks/bench_federated.py --seeds 0,1,2 --references --out benchmarks/results/federated_cpu.csv

``--references``: also pooled training and each site alone (``federated.study.references``),
and the profile's converged non-private reference scored at every site
(``federated.study.pooled_converged``; it reuses chapter 01's run in the same runs folder).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    from dpskin_core.book.registry import load_registry, profile_params
    from dpskin_core.federated.federation import load_clients, run_federation
    from dpskin_core.federated.recipes import FL_RECIPES, FLPlan
    from dpskin_core.federated.study import references

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu", help="profile of experiments.yml")
    p.add_argument("--recipes", default=",".join(FL_RECIPES.names()),
                   help=f"comma list of: {', '.join(FL_RECIPES.names())}")
    p.add_argument("--eps", default=None,
                   help="comma list (default: the chapter's fl_epsilons for the profile)")
    p.add_argument("--seeds", default=None,
                   help="comma list (default: the chapter's fl_seeds for the profile)")
    p.add_argument("--references", action="store_true", help="also pooled and local-only")
    p.add_argument("--runs", default=None, help="runs folder (default: the profile's runs_root)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per client")
    p.add_argument("--out", default="benchmarks/results/federated.csv")
    args = p.parse_args()

    m = load_registry().parameters_for("09_federated", args.profile)
    # the profile with the chapter's `overrides`, as the notebook builds it
    over = dict(m.get("overrides") or {})
    if args.threads is not None:
        over["num_threads"] = args.threads
    P = profile_params(args.profile, over)
    # FLPlan's defaults are the chapter's (its parameters cell); the registry overrides them
    plan = FLPlan.from_chapter(m)
    eps = [float(e) for e in args.eps.split(",")] if args.eps else list(m.get("fl_epsilons") or P.epsilons)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(m.get("fl_seeds") or P.seeds)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    for n in names:
        FL_RECIPES.get(n)  # raises on an unknown name, listing the known ones
    runs = args.runs or P.runs_root
    print(f"{args.profile}: {plan}, seeds {seeds}, budgets {eps}, runs {runs}", flush=True)

    frames = []
    for name in names:
        r = FL_RECIPES.get(name)
        for seed in seeds:
            for e in (eps if r.private else [None]):
                t = time.time()
                res = run_federation(r.config(P, plan, seed=seed, target_epsilon=e), runs, progress=True)
                last = res.rounds[res.rounds["round"] == res.rounds["round"].max()]
                g = res.meta.get("privacy") or {}
                frames.append(last.assign(federation=name, label=r.label, level=r.level, seed=seed,
                                          target_epsilon=e, global_epsilon=g.get("global_epsilon"),
                                          delta=g.get("delta"), folder=res.folder.name))
                # seconds of this call: the training time, or ~0 when the record is read back
                print(f"{r.label} seed {seed} eps {e}: mean over sites "
                      f"{last['balanced_accuracy'].mean():.3f} ({time.time() - t:.0f} s)", flush=True)
    if args.references:
        base = FL_RECIPES.get("fedavg")
        clients = load_clients(base.config(P, plan))
        refs = references(lambda s: base.config(P, plan, seed=s), clients, seeds, runs,
                          converged=P)
        frames.append(refs.assign(federation=refs["training"], label=refs["training"], level="none",
                                  target_epsilon=None))
    rows = pd.concat(frames, ignore_index=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out, index=False)
    site_mean = (rows.groupby(["label", "target_epsilon", "seed"], dropna=False)["balanced_accuracy"]
                 .mean().groupby(["label", "target_epsilon"], dropna=False))
    summary = pd.DataFrame({"mean": site_mean.mean(), "std": site_mean.std(), "n": site_mean.size()})
    print(summary.round(3).to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
