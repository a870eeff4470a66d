"""``dpskin`` command line: a thin wrapper over the library.

    dpskin train [--config FILE] [--set key=value ...] [--runs DIR] [--nproc N]
    dpskin runs [--runs DIR]
    dpskin data synth --n N --size S --out DIR [--seed K]
    dpskin download {isic2018,dermamnist} --dest DIR [--base-url URL]
    dpskin book [--profile smoke|cpu|gpu] [--only NAME ...] [--no-build] [--force] [--pdf]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .data.download import DOWNLOADS
from .errors import DpskinError
from .files import read_json


def parse_overrides(items: List[str]) -> Dict[str, object]:
    """``["epochs=3", "dp=true"]`` -> ``{"epochs": 3, "dp": True}`` (values parsed as YAML)."""
    import yaml

    out: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DpskinError(f"--set expects key=value, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import RunConfig, run

    base = RunConfig.from_file(args.config).to_dict() if args.config else {}
    cfg = RunConfig.from_dict({**base, **parse_overrides(args.set)})  # bad config: before launch
    if args.nproc < 1:
        raise DpskinError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-launch under torchrun
        from .training.distributed import launch

        forwarded = ["--config", args.config] if args.config else []
        for item in args.set:
            forwarded += ["--set", item]
        if args.runs:
            forwarded += ["--runs", args.runs]
        return launch(args.nproc, ["dpskin_core.cli", "train", *forwarded])
    res = run(cfg, runs_root=args.runs)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports
        return 0
    print(f"run {res.run_id} ({'reused' if res.reused else 'trained'}): {res.run_dir}")
    for k in ("balanced_accuracy", "accuracy", "auc_macro", "ece"):
        if k in res.final_metrics:
            print(f"  {cfg.eval_split} {k}: {res.final_metrics[k]:.4f}")
    if res.epsilon is not None:
        print(f"  eps = {res.epsilon:.3f} at delta = {cfg.delta:g} ({cfg.accountant} accountant, "
              f"noise multiplier {res.noise_multiplier:.4f})")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from .training.records import load_runs

    df = load_runs(args.runs)
    if df.empty:
        print("no complete runs")
        return 0
    cols = [c for c in ("run", "name", "method", "backbone", "dataset", "target_epsilon", "epsilon",
                        "seed", "balanced_accuracy", "wall_time_s") if c in df]
    print(df[cols].to_string(index=False))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate

    size = tuple(int(v) for v in args.size.split("x")) if "x" in args.size else int(args.size)
    out = generate(Path(args.out), n=args.n, size=size, seed=args.seed)
    print(f"wrote {args.n} synthetic images in the ISIC 2018 Task 3 layout to {out}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .data.download import download

    out = download(args.name, Path(args.dest), base_url=args.base_url, subsets=args.subsets)
    print(f"{args.name} is ready in {out}")
    return 0


def _cmd_book(args: argparse.Namespace) -> int:
    from .book.runner import run_book

    if args.pdf and args.no_build:
        print("dpskin book: --pdf builds the book; it cannot go with --no-build", file=sys.stderr)
        return 2
    report = run_book(args.profile, only=args.only or None, build=not args.no_build,
                      force=args.force, pdf=args.pdf)
    return 0 if report.ok else 1


def _cmd_fl(args: argparse.Namespace) -> int:
    """``dpskin fl run|deploy``: a federation in this process, or on Flower's deployment
    engine (SuperLink + one SuperNode per client on 127.0.0.1)."""
    from .federated import FLConfig, run_federation
    from .federated.deploy import deploy

    cfg = FLConfig.from_dict(read_json(Path(args.config)))
    if args.fl_command == "deploy":
        res = deploy(cfg, args.runs, startup_timeout_s=args.startup_timeout, run_timeout_s=args.timeout)
    else:
        res = run_federation(cfg, args.runs)
    last = res.rounds[res.rounds["round"] == res.rounds["round"].max()]
    print(last[["client", "status", "epsilon", "balanced_accuracy"]].to_string(index=False))
    print(f"federation {res.folder.name}: mean balanced accuracy "
          f"{last['balanced_accuracy'].mean():.3f} after {cfg.rounds} rounds; record in {res.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpskin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train and evaluate one configuration")
    t.add_argument("--config", help="JSON or YAML file of RunConfig keys")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set dp=true --set target_epsilon=8")
    t.add_argument("--runs", default=None, help="runs folder (default $DPSKIN_RUNS or ./runs)")
    t.add_argument("--nproc", type=int, default=1,
                   help="training processes on this machine (torchrun; gloo on CPU, NCCL on CUDA)")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("runs", help="list complete runs")
    r.add_argument("--runs", default=None)
    r.set_defaults(func=_cmd_runs)

    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic lesion dataset in the official layout")
    s.add_argument("--n", type=int, default=1200, help="number of images")
    s.add_argument("--size", default="64", help="side in px, or WxH such as 200x150")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    dl = sub.add_parser("download", help="fetch official files, verify checksums, unpack")
    dl.add_argument("name", choices=DOWNLOADS.names())
    dl.add_argument("--dest", required=True, help="folder to download into")
    dl.add_argument("--base-url", default=None, help="mirror replacing the official host")
    dl.add_argument("--subsets", default=None,
                    help="isic2018: Training,Validation,Test (default all); dermamnist: 28,64,128,224")
    dl.set_defaults(func=_cmd_download)

    b = sub.add_parser("book", help="execute the experiment notebooks and build the book")
    b.add_argument("--profile", default=None,
                   help="profile of experiments.yml: smoke (default), cpu, cpu64 or gpu")
    b.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="execute only this experiment (repeatable), e.g. --only 01_baseline")
    b.add_argument("--no-build", action="store_true", help="execute notebooks, skip jupyter-book")
    b.add_argument("--pdf", action="store_true",
                   help="also build the dissertation PDF through LaTeX (_build/latex/dpskin.pdf; "
                        "needs XeLaTeX and latexmk, see the README)")
    b.add_argument("--force", action="store_true",
                   help="re-execute notebooks even when their hash matches")
    b.set_defaults(func=_cmd_book)
    f = sub.add_parser("fl", help="federated learning across clients (dpskin_core.federated)")
    fsub = f.add_subparsers(dest="fl_command", required=True)
    for name, what in (("run", "run a federation in this process"),
                       ("deploy", "run a federation on Flower's deployment engine (127.0.0.1)")):
        fp = fsub.add_parser(name, help=what)
        fp.add_argument("--config", required=True, help="federation config (JSON: FLConfig's fields)")
        fp.add_argument("--runs", default=None, help="runs root (default $DPSKIN_RUNS or ./runs)")
        if name == "deploy":
            fp.add_argument("--startup-timeout", type=float, default=60.0,
                            help="seconds for the SuperLink to start and the run to be submitted")
            fp.add_argument("--timeout", type=float, default=3600.0,
                            help="seconds for the whole federation")
        fp.set_defaults(func=_cmd_fl)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DpskinError as e:  # user errors: one clear line, no traceback
        print(f"dpskin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
