"""Benchmark of the proposed technique against DP-SGD / DP-Adam on real ISIC 2018 (not a test).

Picks recipes by name (``dpskin_core.training.recipes``) and builds them from a profile of
``experiments.yml`` (default ``cpu``), so the benchmark trains exactly what the book trains;
every run goes through ``dpskin_core.run`` (finished runs are reused, each figure has a run
record). Prints balanced accuracy on the lesion-grouped test split, mean ± std over seeds with
n, per recipe, network and eps.

    python benchmarks/bench_proposed.py --recipes proposed,ablation/no-ema --eps 3,8
    python benchmarks/bench_proposed.py --recipes nonprivate-adam --backbones resnet18 --runs runs/cpu
    python benchmarks/bench_proposed.py --recipes dp-sgd,dp-adam,nonprivate-adam --seeds 0,1,2
    python benchmarks/bench_proposed.py --recipes proposed,proposed-colour --eps 8 --sites all

``--sites``: leave one HAM10000 acquisition site out as the test split (``split=site:<site>``;
``all``: the profile's ``loso_sites``), a proxy for images from another clinic.

``--set KEY=VALUE`` (repeatable) overrides one parameter of the profile (a field of
:class:`~dpskin_core.training.recipes.Params`; the value is read as YAML, so ``epochs=40``
is an int), e.g. a longer schedule measured beside the profile's own; ``--eval-split val``
reports the validation split instead of the test split (where the choice of a recipe is made:
tune there, never on test).

    python benchmarks/bench_proposed.py --recipes nonprivate-adam --backbones resnet18 \
        --set epochs=40 --seeds 0 --eval-split val --runs runs/val

``--search``: each (recipe, eps, seed) is the base of a private hyperparameter search over the
recipe's space in chapter ``07_tuning`` of ``experiments.yml`` under the profile (the proposed
technique: ``technique_search``; the recipes of ``search_recipes``: ``search``;
:func:`dpskin_core.book.search.chapter_spaces`, as the chapter reads them;
:func:`dpskin_core.book.search.private_search`); the row is its released winner, with the eps
of the winning run alone (``eps``) and of the whole search (``eps_search``).

    python benchmarks/bench_proposed.py --recipes proposed --eps 1,3,8 --seeds 0,1,2 --search
    python benchmarks/bench_proposed.py --recipes dp-sgd --eps 8 --seeds 0,1,2 --search
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def parse_sets(items: list) -> dict:
    """``["epochs=40", "lr_adam=0.002"]`` -> ``{"epochs": 40, "lr_adam": 0.002}`` (values read
    as YAML); a malformed item raises naming it. Unknown keys are left to ``profile_params``,
    which rejects them naming the key."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_table(df: pd.DataFrame, out: Path, append: bool) -> pd.DataFrame:
    """Write ``df`` to the CSV ``out`` (after the rows already there when ``append``); returns
    the table written."""
    if append and out.is_file():
        df = pd.concat([pd.read_csv(out), df], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return df


def main() -> None:
    from dpskin_core import run
    from dpskin_core.book.registry import profile_params
    from dpskin_core.book.search import released_val
    from dpskin_core.training.recipes import RECIPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu", help="profile of experiments.yml")
    p.add_argument("--recipes", default="proposed,ablation/no-logit-adjustment,ablation/no-ema,"
                   "ablation/no-front-end", help=f"comma list of: {', '.join(RECIPES.names())}")
    p.add_argument("--eps", default=None, help="comma list (default: the profile's epsilons)")
    p.add_argument("--seeds", default=None, help="comma list (default: the profile's seeds)")
    p.add_argument("--backbones", default=None,
                   help="comma list of networks of the recipes swept over one (default: the "
                        "profile's first backbone)")
    p.add_argument("--runs", default="runs/proposed", help="runs folder")
    p.add_argument("--sites", default=None,
                   help="comma list of held-out sites, or 'all' (the profile's loso_sites); "
                        "default: the lesion-grouped split")
    p.add_argument("--search", action="store_true",
                   help="privately search each point over its recipe's space in 07_tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one profile parameter (value read as YAML); repeatable")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="split whose balanced accuracy is reported (val: for tuning)")
    p.add_argument("--out", default="benchmarks/results/proposed.csv")
    p.add_argument("--append", action="store_true",
                   help="add the rows to --out instead of replacing it (a sweep of --set values "
                        "in one table; the summary then covers the whole table)")
    args = p.parse_args()
    P = profile_params(args.profile, {"num_threads": args.threads, **parse_sets(args.set)})
    eps = [float(e) for e in args.eps.split(",")] if args.eps else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    sites = (list(P.loso_sites) if args.sites == "all" else args.sites.split(",")) if args.sites \
        else [None]
    spaces = None
    if args.search and args.eval_split != "test":
        raise SystemExit("--search already reports its winner's validation score (val_bacc); "
                         "use it without --eval-split")
    if args.search:
        from dpskin_core.book.registry import load_registry
        from dpskin_core.book.search import chapter_spaces, private_search, winner_runs

        spaces = chapter_spaces(load_registry().parameters_for("07_tuning", args.profile))
        unsearched = [r for r in args.recipes.split(",") if r not in spaces]
        if unsearched:
            raise SystemExit(f"--search: no search space for {', '.join(unsearched)} in chapter "
                             f"07_tuning of profile {args.profile} (searched: {', '.join(spaces)})")
    rows = []
    for name in args.recipes.split(","):
        space = spaces[name] if spaces else None
        nets = args.backbones.split(",") if args.backbones else P.backbones[:1]
        base = RECIPES.get(name).configs(P, backbones=nets, epsilons=eps, seeds=seeds)
        for cfg in [c if site is None else c.replace(split=f"site:{site}")
                    for c in base for site in sites]:
            point = {"recipe": name, "backbone": cfg.backbone, "split": cfg.split,
                     "target_eps": cfg.target_epsilon if cfg.dp else None, "seed": cfg.seed,
                     "delta": cfg.delta if cfg.dp else None,
                     "set": " ".join(args.set)}  # the profile's parameters overridden, if any
            if args.eval_split != "test":
                cfg = cfg.replace(eval_split=args.eval_split)
            if space is None:
                res = run(cfg, runs_root=args.runs)
                rows.append({**point, "run": res.run_id, "eps": res.epsilon,
                             "noise_multiplier": res.noise_multiplier,
                             f"{args.eval_split}_bacc": res.final_metrics["balanced_accuracy"],
                             "wall_s": res.meta.get("wall_time_s")})
                if args.eval_split == "test":  # what a recipe is chosen on, beside its report
                    rows[-1]["val_bacc"] = released_val(res.metrics, res.meta)
            else:  # the released winner of a private search based at this point
                found = private_search(cfg, space, args.runs, verbose=False)
                w = winner_runs([found]).iloc[0]
                rows.append({**point, "run": found.winner_dir.name, "eps": found.epsilon_run,
                             "eps_search": found.epsilon_search, "delta": found.delta,
                             "noise_multiplier": w["noise_multiplier"],
                             "val_bacc": found.val_score, "test_bacc": w["balanced_accuracy"],
                             **{f"search_{k}": v for k, v in found.hyperparameters.items()}})
            print(rows[-1], flush=True)
    df = write_table(pd.DataFrame(rows), Path(args.out), args.append)
    summary = (df.fillna({"set": ""})
               .groupby(["recipe", "backbone", "split", "set", "target_eps"], dropna=False)
               [f"{args.eval_split}_bacc"]
               .agg(["mean", "std", "count"]).rename(columns={"count": "n"}))
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
