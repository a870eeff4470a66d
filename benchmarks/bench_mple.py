"""Benchmark: MpLe at a real image size (not a test; run on demand).

On ISIC 2018 training images (``--data-root``; the embedded synthetic set when absent) at
``--size`` px, for the first convolution of ``--backbone``: the key's condition number and
construction time, morphing time per image, bytes shipped per image (morphed float32 vs the
uint8 image), the augmented layer's size and build time, its forward time against the plain
first layer, the parity of the first layer's features (max abs difference, fp32), and the two
attacks of :mod:`dpskin_core.mple.attacks`: known plaintext at several numbers of pairs, and
from the model (C_ac and the plain C_r; no image). One row per measurement:

    python benchmarks/bench_mple.py --out benchmarks/results/mple.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/isic2018_task3_200x150"


def main() -> None:
    from dpskin_core.data.datasets import DataSpec, load_data
    from dpskin_core.mple import KeySpec, make_key, morph, split_first_conv
    from dpskin_core.mple.attacks import from_model, known_plaintext, psnr
    from dpskin_core.mple.layer import AugmentedConv, permutation
    from dpskin_core.mple.morph import unmorph
    from dpskin_core.training.augment import normaliser, to_float
    from dpskin_core.training.backbones import build_backbone

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--backbone", default="smallcnn_fast")
    p.add_argument("--pairs", default="256,1024,2048,3072,3200")
    p.add_argument("--images", type=int, default=4000, help="training images used")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/mple.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    real = Path(args.data_root).is_dir()
    b = load_data(DataSpec("isic2018" if real else "synthetic", args.data_root if real else None,
                           args.size, synth_n=max(args.images, 1200)))
    mean, std = normaliser("imagenet", torch.device("cpu"))
    x = to_float(torch.from_numpy(b.x_train[:args.images]).permute(0, 3, 1, 2), mean, std)
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def rec(what, value, unit):
        """Print and write the row at once (a stopped run keeps what it measured)."""
        rows.append({"measure": what, "value": float(value), "unit": unit})
        print(f"{what}: {value:.6g} {unit}", flush=True)
        pd.DataFrame(rows).assign(size=args.size, backbone=args.backbone,
                                  data="isic2018" if real else "synthetic",
                                  threads=args.threads).to_csv(args.out, index=False)

    t = time.perf_counter()
    key = make_key(KeySpec(args.size, seed=args.seed))
    rec("key build (incl. condition number)", time.perf_counter() - t, "s")
    rec("key side d", key.d, "numbers")
    rec("key condition number", key.condition, "")
    t = time.perf_counter()
    z = morph(x, key)
    rec("morphing", 1e3 * (time.perf_counter() - t) / len(x), "ms per image")
    rec("bytes shipped, morphed (float32)", 4 * key.d, "bytes per image")
    rec("bytes shipped, plain (uint8)", 3 * args.size ** 2, "bytes per image")
    model = build_backbone(args.backbone, num_classes=7).eval()
    conv, _ = split_first_conv(model)
    t = time.perf_counter()
    aug = AugmentedConv.from_conv(conv, key, permutation(conv.out_channels, args.seed + 1))
    rec("augmented layer build", time.perf_counter() - t, "s")
    rec("augmented layer parameters", aug.weight.numel(), "numbers")
    rec("plain first layer parameters", conv.weight.numel(), "numbers")
    with torch.no_grad():
        xb, zb = x[:256], z[:256]
        for name, f, inp in (("plain first layer forward", conv, xb),
                             ("augmented layer forward", aug, zb)):
            f(inp)
            t = time.perf_counter()
            for _ in range(3):
                f(inp)
            rec(name, 1e3 * (time.perf_counter() - t) / 3 / len(inp), "ms per image")
        perm = torch.as_tensor(permutation(conv.out_channels, args.seed + 1))
        rec("parity: max abs difference of first-layer features (fp32)",
            (aug(zb) - conv(xb)[:, perm]).abs().max(), "")
    rng = float(x.max() - x.min())
    held_x, held_z = x[-200:], z[-200:]
    for n in [int(v) for v in args.pairs.split(",")]:
        if n > len(x) - 200:
            continue
        r = known_plaintext(x[:n], z[:n], held_x, held_z, key, ridge=0.0 if n >= x[0].numel() else 1e-3)
        rec(f"known plaintext, {n} pairs: PSNR of other images", r["psnr_db"], "dB")
        rec(f"known plaintext, {n} pairs: key relative error", r["key_rel_error"], "")
    t = time.perf_counter()
    got = from_model(aug, conv, key)
    rec("from the model: time", time.perf_counter() - t, "s")
    rec("from the model: permutation recovered", float(np.array_equal(got["perm"], perm.numpy())), "1 = exactly")
    rec("from the model: PSNR of every image", float(psnr(held_x, unmorph(held_z, got["m_inv"], key), rng).mean()), "dB")


if __name__ == "__main__":
    main()
