"""The scheme measured: cost beside the plain network, and every attack's success.

One home for what the MpLe chapter and ``benchmarks/bench_mple.py`` measure:
:func:`cost` (time, bytes, parameters, memory, multiply-adds of the first layer and of a
training step, the MpLe network against the plain one), :func:`parity` (logits on morphed vs
plain inputs), and the attacks scored on images in [0, 1] (:func:`known_plaintext_curve`,
:func:`model_attack`, :func:`ciphertext_only`). The published figures the chapter compares
with are in :data:`CLAIMS`, with their sources (cited, not re-run).
"""
from __future__ import annotations

import io
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..training.augment import normaliser
from .attacks import from_model, known_plaintext, psnr, second_order, ssim
from .keys import MorphKey
from .layer import AugmentedConv, MpLeModel, out_side, parity_model, permutation, split_first_conv
from .morph import morph, unmorph

#: the figures MpLe (Onesimu & Karthikeyan 2021) and MoLe (Shen et al. 2018) publish for their
#: scheme and quote for GAZELLE (Juvekar et al. 2018) and MiniONN (Liu et al. 2017); none is
#: re-run here. ``ratio``: cost relative to plain training / inference (1 = none).
CLAIMS: List[Dict[str, Any]] = [
    {"system": "MpLe / MoLe", "quantity": "computation overhead", "ratio": 1.09,
     "source": "MoLe (Shen et al. 2018), quoted by MpLe: ~9 %"},
    {"system": "MpLe / MoLe", "quantity": "transmission overhead", "ratio": 1.0512,
     "source": "MoLe (Shen et al. 2018), quoted by MpLe: 5.12 %"},
    {"system": "MpLe / MoLe", "quantity": "attack success", "ratio": float("nan"),
     "source": "MpLe: 7.9e-90 (1 / 64!, guessing P)"},
    {"system": "GAZELLE", "quantity": "computation overhead", "ratio": 1e4,
     "source": "as quoted by MpLe / MoLe: 10,000x"},
    {"system": "GAZELLE", "quantity": "transmission overhead", "ratio": 4.21e5,
     "source": "as quoted by MpLe / MoLe: 421,000x"},
    {"system": "MiniONN", "quantity": "computation overhead", "ratio": float("nan"),
     "source": "20x slower online than GAZELLE (Juvekar et al. 2018, abstract)"},
]


def to_unit(x: torch.Tensor, normalisation: str = "imagenet") -> torch.Tensor:
    """Normalised images -> [0, 1] (clipped): what the attacks are scored on."""
    mean, std = normaliser(normalisation, torch.device("cpu"))
    return (x * std + mean).clamp(0, 1)


def scores(x: torch.Tensor, x_hat: torch.Tensor, normalisation: str = "imagenet") -> Dict[str, float]:
    """Mean PSNR (dB) and SSIM of recovered images against the originals, both in [0, 1]."""
    a, b = to_unit(x, normalisation), to_unit(x_hat, normalisation)
    return {"psnr_db": float(psnr(a, b, 1.0).mean()), "ssim": float(ssim(a, b).mean())}


def _ms_per_image(f, inp: torch.Tensor, repeats: int) -> float:
    f(inp)  # warm-up (allocations, kernel choice)
    t = time.perf_counter()
    for _ in range(repeats):
        f(inp)
    return 1e3 * (time.perf_counter() - t) / repeats / len(inp)


def _jpeg_bytes(x_uint8: np.ndarray, quality: int = 95) -> float:
    sizes = []
    for img in x_uint8:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return float(np.mean(sizes))


def cost(model: nn.Module, key: MorphKey, x: torch.Tensor, x_uint8: np.ndarray,
         perm_seed: int = 0, batch: int = 64, repeats: int = 3) -> List[Dict[str, Any]]:
    """Rows (quantity, plain, mple, unit) of the scheme's cost for ``model``'s architecture on
    normalised images ``x`` (their uint8 originals ``x_uint8`` for the bytes shipped): one
    image's morphing, bytes, first-layer size, memory and multiply-adds, and per-image times
    of the first layer, of inference and of a training step (Adam, batch ``batch``; the MpLe
    step trains the rest behind the frozen C_ac)."""
    rows: List[Dict[str, Any]] = []

    def row(quantity: str, plain: float, mple: float, unit: str) -> None:
        rows.append({"quantity": quantity, "plain": float(plain), "mple": float(mple), "unit": unit})

    xb = x[:batch]
    t = time.perf_counter()
    z = morph(xb, key)
    morph_ms = 1e3 * (time.perf_counter() - t) / len(xb)
    conv, rest = split_first_conv(model)
    t = time.perf_counter()
    perm = permutation(conv.out_channels, perm_seed)
    aug = AugmentedConv.from_conv(conv, key, perm)
    build_s = time.perf_counter() - t
    h, w = out_side(conv, key)
    row("data provider: morphing", 0.0, morph_ms, "ms per image")
    row("data provider: building C_ac", 0.0, build_s, "s (once)")
    row("bytes shipped (uint8 vs float32 morphed)", x_uint8[0].size, 4 * key.d, "bytes per image")
    row("bytes shipped (JPEG q95 vs float32 morphed)", _jpeg_bytes(x_uint8[:batch]), 4 * key.d,
        "bytes per image")
    row("first layer: parameters", conv.weight.numel(), aug.weight.numel(), "numbers")
    row("first layer: memory", 4 * conv.weight.numel() / 2**20, 4 * aug.weight.numel() / 2**20, "MiB (fp32)")
    k = conv.kernel_size
    row("first layer: multiply-adds", conv.out_channels * h * w * conv.in_channels * k[0] * k[1],
        key.d * conv.out_channels * h * w, "per image")
    net = MpLeModel(aug, rest)
    model.eval(), net.eval()
    with torch.no_grad():
        row("first layer: forward", _ms_per_image(conv, xb, repeats), _ms_per_image(aug, z, repeats),
            "ms per image")
        row("inference (whole network)", _ms_per_image(model, xb, repeats),
            _ms_per_image(net, z, repeats), "ms per image")
    y = torch.randint(0, 7, (len(xb),), generator=torch.Generator().manual_seed(0))

    def step_fn(m: nn.Module):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def step(inp: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(inp), y).backward()
            opt.step()
        return step

    model.train(), net.train()
    row("training step", _ms_per_image(step_fn(model), xb, repeats),
        _ms_per_image(step_fn(net), z, repeats), "ms per image")
    for r in rows:
        r["ratio"] = r["mple"] / r["plain"] if r["plain"] else float("nan")
    return rows


@torch.no_grad()
def parity(model: nn.Module, key: MorphKey, x: torch.Tensor, perm_seed: int = 0) -> Dict[str, float]:
    """Max abs difference (fp32) of the MpLe network's logits on morphed inputs and ``model``'s
    on the plain inputs, and the agreement of their predicted classes."""
    model.eval()
    net = parity_model(model, key, perm_seed).eval()
    a, b = model(x), net(morph(x, key))
    return {"max_abs_logit_difference": float((a - b).abs().max()),
            "max_abs_logit": float(a.abs().max()),
            "same_prediction": float((a.argmax(1) == b.argmax(1)).float().mean()), "images": len(x)}


def known_plaintext_curve(x: torch.Tensor, z: torch.Tensor, x_other: torch.Tensor,
                          z_other: torch.Tensor, key: MorphKey, pairs: Sequence[int],
                          ridge: float = 1e-3, normalisation: str = "imagenet") -> List[Dict[str, Any]]:
    """Known plaintext at each number of pairs (least squares from C H W pairs on, ridge
    ``ridge`` below): PSNR / SSIM of the other images recovered, the key's relative error."""
    out = []
    full = int(np.prod(x.shape[1:]))
    for n in pairs:
        if n > len(x):
            continue
        lam = 0.0 if n >= full else ridge
        t = time.perf_counter()
        r = known_plaintext(x[:n], z[:n], x_other, z_other, key, ridge=lam)
        out.append({"pairs": n, "ridge": lam, "key_rel_error": r["key_rel_error"],
                    **scores(x_other, r["recovered"], normalisation),
                    "seconds": time.perf_counter() - t, "recovered": r["recovered"]})
    return out


def model_attack(augmented: AugmentedConv, conv: nn.Conv2d, key: MorphKey, perm: np.ndarray,
                 x: torch.Tensor, z: torch.Tensor, normalisation: str = "imagenet") -> Dict[str, Any]:
    """The attack from the model (C_ac and the plain C_r; no image): whether P came back
    exactly, and PSNR / SSIM of images ``x`` recovered from their morphed rows ``z``."""
    t = time.perf_counter()
    got = from_model(augmented, conv, key)
    secs = time.perf_counter() - t
    return {"permutation_recovered": bool(np.array_equal(got["perm"], np.asarray(perm))),
            "leverage_gap": got["gap"], "seconds": secs,
            **scores(x, unmorph(z, got["m_inv"], key), normalisation), "m_inv": got["m_inv"]}


def ciphertext_only(z: torch.Tensor, x_public: torch.Tensor, key: MorphKey, x_true: torch.Tensor,
                    normalisation: str = "imagenet") -> Dict[str, Any]:
    """The second-order (moment-matching) attack scored against the true images; and, as its
    floor, the public images' mean image as every guess."""
    guess = second_order(z, x_public, key)
    mean_guess = x_public.mean(0, keepdim=True).expand_as(x_true)
    return {"images": guess, **scores(x_true, guess, normalisation),
            **{f"mean_image_{k}": v for k, v in scores(x_true, mean_guess, normalisation).items()}}


__all__ = ["CLAIMS", "ciphertext_only", "cost", "known_plaintext_curve", "model_attack", "parity",
           "scores", "to_unit"]
