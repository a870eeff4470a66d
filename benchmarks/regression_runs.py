"""Same numbers before and after a refactor: run fixed small configs, record what they computed.

Runs a fixed set of small configurations on the embedded synthetic data through the public API
(``from dpskin_core import RunConfig, run``: it works on any version of the package) and
records, per config, the final metrics, eps, sigma and a digest of the final weights. Run it on
the old commit with ``--save``, on the new one with ``--against``; any difference is printed
and the exit status is 1. Not a test: it trains 7 small runs (about 40 s on 2 cores).

    git stash; python benchmarks/regression_runs.py --save /tmp/before.json; git stash pop
    python benchmarks/regression_runs.py --against /tmp/before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings

COMMON = dict(dataset="synthetic", synth_n=300, image_size=32, epochs=2, batch_size=32,
              progress=False, num_threads=1)
CONFIGS = {
    "np-sgd": dict(backbone="smallcnn_fast", optimizer="sgd", lr=0.05, class_weights="balanced"),
    "np-adam-es": dict(backbone="smallcnn_fast", optimizer="adam", lr=0.002,
                       early_stopping_patience=1, epochs=3),
    "dp-sgd": dict(backbone="smallcnn_fast", dp=True, target_epsilon=8.0, lr=0.5),
    "dp-adam": dict(backbone="smallcnn_fast", dp=True, target_epsilon=3.0, optimizer="adam",
                    lr=0.003, lr_schedule="cosine"),
    "proposed": dict(features="colour", backbone="colour_linear", dp=True, target_epsilon=8.0,
                     logit_adjust=True, ema_decay=0.9, lr=8.0, batch_size=64, epochs=3,
                     augment_flips=False, augment_rot90=False),
    "scatter-augmult": dict(features="scatter", backbone="scatter_linear", dp=True,
                            target_epsilon=8.0, aug_mult=2, lr=1.0),
    "dp-physical": dict(backbone="smallcnn_fast", dp=True, target_epsilon=8.0, lr=0.5,
                        max_physical_batch_size=8),
}


def measure(cache_dir: str, extra: dict) -> dict:
    import torch

    from dpskin_core import RunConfig, run

    out, root = {}, tempfile.mkdtemp()
    for name, c in CONFIGS.items():
        res = run(RunConfig(name=name, cache_dir=cache_dir, **{**COMMON, **c, **extra}), root)
        sd = torch.load(res.run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].numpy().tobytes())
        out[name] = {"metrics": res.final_metrics, "epsilon": res.epsilon,
                     "sigma": res.noise_multiplier, "weights": h.hexdigest()[:16]}
        print(f"{name}: balanced accuracy {res.final_metrics['balanced_accuracy']:.4f}, "
              f"eps {res.epsilon}, weights {out[name]['weights']}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write the measurements to this JSON file")
    g.add_argument("--against", help="compare with measurements saved earlier")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: dpskin's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a config field every run takes, e.g. --set 'noise_seed=\"fixed\"' "
                        "(for versions whose DP noise must be made reproducible)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    now = measure(args.cache_dir, extra)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(now, f, indent=1, sort_keys=True)
        print(f"saved {args.save}")
        return 0
    with open(args.against) as f:
        before = json.load(f)
    # through JSON as the saved side went (its one NaN object compares equal to itself)
    now = json.loads(json.dumps(now))
    diff = {k: (before.get(k), now.get(k)) for k in set(before) | set(now) if before.get(k) != now.get(k)}
    for k, (a, b) in sorted(diff.items()):
        print(f"DIFFERENT {k}:\n  before {a}\n  now    {b}")
    print(f"{len(now) - len(diff)} of {len(now)} configs identical "
          "(all final metrics, eps, sigma and the final weights' digest)")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
