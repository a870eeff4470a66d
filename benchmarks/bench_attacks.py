"""Benchmark of privacy attacks on real ISIC 2018 models (not a test).

For each model (non-private baselines, DP-SGD at each eps): a membership-inference
experiment (target on a random half of the training split, shadows on random halves, all
through ``dpskin_core.run`` with the same recipe), scored by the loss-threshold attack and
LiRA (offline, and online as a by-product of the balanced shadow design), and a one-run
canary audit (a separate run on the whole training split plus m canaries, half included)
for an empirical eps lower bound. Each target and audit run gets a ``privacy_card.json``.

    DPSKIN_CACHE=/tmp/dpc python benchmarks/bench_attacks.py --quick          # minutes
    DPSKIN_CACHE=/tmp/dpc python benchmarks/bench_attacks.py --n-shadows 8    # hours on CPU

The attacked models are the attack recipes of the book (``attack/*`` in
``dpskin_core.training.recipes``, by the labels of ``ATTACK_MODELS``), built from a profile of
``experiments.yml`` (default ``cpu``). Two non-private models: ``non-private`` (the SGD
baseline) and ``non-private (no augmentation)``, which fits its training images as a
non-private baseline trained to convergence would. Report both: the second is there in case
the first's leak is not measurable.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd


def relative(path: Path, root: str) -> str:
    return str(Path(path).resolve().relative_to(Path(root).resolve()))


def subsample(data, train_size, eval_size, seed: int = 0):
    """``data`` with seeded random subsets of its splits (None: keep a split whole)."""
    from dpskin_core.data import DataBundle

    rng = np.random.default_rng(seed)
    parts, metas = {}, []
    for split, size in (("train", train_size), ("val", eval_size), ("test", eval_size)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        idx = np.sort(rng.permutation(len(y))[:size]) if size else np.arange(len(y))
        parts[split] = (x[idx], y[idx])
        metas.append(data.meta[data.meta["split"] == split].iloc[idx])
    return DataBundle(*parts["train"], *parts["val"], *parts["test"],
                      pd.concat(metas, ignore_index=True), data.classes, dict(data.info))


def main() -> None:
    import torch

    from dpskin_core import attacks
    from dpskin_core.attacks import audit, cards
    from dpskin_core.book.registry import profile_params
    from dpskin_core.data import load_data
    from dpskin_core.training.recipes import ATTACK_MODELS, RECIPES
    from dpskin_core.training.trainer import data_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu", help="profile of experiments.yml")
    p.add_argument("--models", default="non-private,non-private (no augmentation),DP-SGD",
                   help=f"comma list of: {', '.join(ATTACK_MODELS)}")
    p.add_argument("--eps", default=None, help="target eps of the DP models (default: the profile's)")
    p.add_argument("--n-shadows", type=int, default=8)
    p.add_argument("--views", type=int, default=2, help="dihedral query views per example")
    p.add_argument("--canaries", type=int, default=500, help="m of the one-run audit")
    p.add_argument("--train-size", type=int, default=None, help="subsample the training split")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every recipe's epochs")
    p.add_argument("--eval-size", type=int, default=None, help="subsample val and test splits")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 600 training / 300 val / 300 test images, 2 shadows, "
                        "1 view, 100 canaries, epochs x 0.2 (numbers are NOT meaningful)")
    p.add_argument("--runs", default="runs/attacks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/attacks.csv")
    args = p.parse_args()
    if args.quick:
        args.train_size, args.eval_size, args.n_shadows, args.views, args.canaries = 600, 300, 2, 1, 100
        args.epochs_scale = 0.2
        args.runs = args.runs + "-quick"
        args.out = str(Path(args.out).with_name(Path(args.out).stem + "_quick.csv"))
    torch.set_num_threads(args.threads)
    P = profile_params(args.profile, {"num_threads": args.threads})
    eps_list = [float(x) for x in args.eps.split(",")] if args.eps else list(P.epsilons)
    t0 = time.perf_counter()
    data = load_data(data_spec(RECIPES.get("attack/nonprivate").config(P, seed=0)))
    if args.train_size or args.eval_size:
        data = subsample(data, args.train_size, args.eval_size)
    print(f"data: {len(data.y_train)} train / {len(data.y_test)} test images "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    plan = []
    for name in args.models.split(","):
        if name not in ATTACK_MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(ATTACK_MODELS)}")
        recipe = RECIPES.get(ATTACK_MODELS[name])
        for e in (eps_list if recipe.private else [None]):
            cfg = recipe.config(P, n_train=len(data.y_train), seed=0,
                                **({"target_epsilon": e} if e is not None else {}))
            cfg = cfg.replace(name=f"{name} eps={e}", eval_split="test",
                              epochs=max(1, round(cfg.epochs * args.epochs_scale)))
            plan.append((name, cfg, e))

    rows = []
    for name, cfg, e in plan:
        t = time.perf_counter()
        exp = attacks.membership_experiment(cfg, data, args.runs, n_shadows=args.n_shadows,
                                            views=args.views)
        t_mia = time.perf_counter() - t
        t = time.perf_counter()
        aud = audit.canary_audit(cfg, data, args.runs, m=args.canaries)
        t_audit = time.perf_counter() - t
        cards.write_privacy_card(exp.target.run_dir, exp.results)
        cards.write_privacy_card(aud.run_result.run_dir, {"one_run_audit": aud.audit})
        r = exp.results
        rows.append({
            "model": name, "target_eps": e, "eps": exp.target_result.epsilon,
            "delta": cfg.delta if cfg.dp else None,
            "test_bacc": exp.target_result.final_metrics["balanced_accuracy"],
            "train_size": int(exp.members.sum()), "n_shadows": args.n_shadows, "views": args.views,
            "mia_auc_lira": r["lira_offline"].auc, "tpr@0.1%_lira": r["lira_offline"].tpr_at_fpr[0.001],
            "tpr@1%_lira": r["lira_offline"].tpr_at_fpr[0.01],
            "mia_auc_lira_online": r["lira_online"].auc,
            "tpr@0.1%_lira_online": r["lira_online"].tpr_at_fpr[0.001],
            "mia_auc_loss": r["loss_threshold"].auc, "tpr@0.1%_loss": r["loss_threshold"].tpr_at_fpr[0.001],
            "tpr@1%_loss": r["loss_threshold"].tpr_at_fpr[0.01],
            "mia_bal_acc_lira": r["lira_offline"].balanced_accuracy,
            "audit_eps_lb": aud.audit.eps_lower_bound, "audit_eps": aud.audit.theoretical_epsilon,
            "audit_m": aud.audit.m, "audit_r": aud.audit.r, "audit_v": aud.audit.v,
            "audit_max_possible": audit.max_lower_bound(aud.audit.r, aud.audit.beta),
            "mia_wall_s": t_mia, "audit_wall_s": t_audit,
            # run folders relative to --runs (data-<digest>/<run id>: the id alone is the config's)
            "target_run": relative(exp.target_result.run_dir, args.runs),
            "audit_run": relative(aud.run_result.run_dir, args.runs),
        })
        print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)

    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = ["model", "eps", "delta", "test_bacc", "mia_auc_lira", "tpr@0.1%_lira", "tpr@1%_lira",
            "mia_auc_loss", "tpr@0.1%_loss", "audit_eps_lb", "mia_wall_s", "audit_wall_s"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
