"""Batch augmentations, normalisation and colour constancy, vectorised over the batch.

Colour constancy (:data:`COLOUR_CONSTANCY`) is a per-image map of the stored uint8 images,
applied once before the front end: each image is divided by an estimate of its own illuminant,
so it reads nothing but that image and costs no privacy.

Images stay uint8 (N, 3, S, S) in memory; each batch is converted to float, augmented with
per-sample random choices drawn from an explicit ``torch.Generator`` (so a run is
reproducible and a resumed run draws the same numbers), then normalised with fixed public
constants.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..constants import NORMALISATIONS
from ..errors import ConfigError, check_number
from ..registry import Registry

#: name -> uint8 images (N, S, S, 3) -> uint8 images of the same shape
COLOUR_CONSTANCY: Registry[Callable[[np.ndarray], np.ndarray]] = Registry("colour constancy")


def shades_of_gray(x: np.ndarray, p: float, chunk: int = 512) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) of uint8 images (N, S, S, 3).

    Each image's illuminant is the Minkowski p-norm mean of each channel over its pixels
    (p = 1: grey world; p = inf: max-RGB, the white patch); the image is divided by that colour,
    scaled to norm sqrt(3) so that a neutral illuminant leaves the image unchanged, and clipped
    to [0, 255]. Per image and fixed: no other image and no label enters.
    """
    out = np.empty_like(x)
    for i in range(0, len(x), chunk):  # in chunks: float copies of a whole split at 224 px are GBs
        f = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).double().div_(255.0)
        flat = f.flatten(1, 2)  # (n, S*S, 3)
        illum = flat.amax(1) if math.isinf(p) else flat.pow(p).mean(1).pow(1.0 / p)
        illum = illum / illum.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(3.0)
        f = f / illum.clamp_min(1e-12)[:, None, None, :]  # a black image stays black
        out[i:i + chunk] = f.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


COLOUR_CONSTANCY.register("none")(lambda x: x)
COLOUR_CONSTANCY.register("grey-world")(lambda x: shades_of_gray(x, 1.0))
#: p = 6, the choice of the top ISIC 2018 entries
COLOUR_CONSTANCY.register("shades-of-gray")(lambda x: shades_of_gray(x, 6.0))
COLOUR_CONSTANCY.register("max-rgb")(lambda x: shades_of_gray(x, math.inf))


def normaliser(name: str, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) tensors shaped (1, 3, 1, 1) for the named fixed normalisation."""
    if name not in NORMALISATIONS:
        raise ConfigError(f"normalisation={name!r}; known: {', '.join(NORMALISATIONS)}")
    mean, std = NORMALISATIONS[name]
    return (
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )


def to_float(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> normalised float32."""
    return (x_uint8.float().div_(255.0) - mean) / std


def translate_batch(x: torch.Tensor, t: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Shift each image of a float batch (N, C, H, W) by its own random offsets in [-t, t] px
    on both axes, filling the uncovered border by reflection (a lesion's surrounding skin
    continues, instead of a black edge the network could learn). Raises ``ConfigError`` when
    ``t`` is not below the image's side (reflection needs t < H and t < W)."""
    n, _, h, w = x.shape
    if t >= h or t >= w:
        raise ConfigError(f"augment_translate={t} px: must be smaller than the image side ({h} x {w})")
    dev = x.device
    padded = torch.nn.functional.pad(x, (t, t, t, t), mode="reflect")
    dy = torch.randint(0, 2 * t + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * t + 1, (n,), generator=generator).to(dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (n, h): padded rows each image keeps
    cols = dx[:, None] + torch.arange(w, device=dev)  # (n, w)
    # advanced indices around a slice put the broadcast (n, h, w) first: (n, h, w, C)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def rotate_zoom_batch(x: torch.Tensor, rotate: bool, zoom: float,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
    """Rotate each image of a float batch (N, C, H, W) about its centre by its own random angle,
    uniform in [0, 360) degrees when ``rotate``, and scale it by its own factor, uniform in
    [1 - zoom, 1 + zoom] (> 1 zooms in); one bilinear resampling, the uncovered border filled
    by reflection (as :func:`translate_batch`). The angle is drawn before the factor, each only
    when on. Raises ``ConfigError`` unless 0 <= zoom < 1."""
    check_number(zoom, "augment_zoom", nonnegative=True, below=1)
    n = x.shape[0]
    angle = (2 * math.pi * torch.rand(n, generator=generator) if rotate
             else torch.zeros(n))  # radians
    scale = (1 + zoom * (2 * torch.rand(n, generator=generator) - 1) if zoom > 0
             else torch.ones(n))
    return rotate_zoom(x, angle, scale)


def rotate_zoom(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Image i of a float batch (N, C, H, W) rotated about its centre by ``angle[i]`` radians
    (counter-clockwise as displayed, rows downward) and magnified ``scale[i]`` times, sampled
    bilinearly with a reflected border; angle 0 and scale 1 give the image back."""
    n, _, h, w = x.shape
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output -> input coordinates in affine_grid's [-1, 1] units, rotated in pixel units: the
    # h/w and w/h factors keep a non-square image's rotation rigid
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros(n)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros(n)], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape),
                                           align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                                           align_corners=False)


def augment(
    x: torch.Tensor,
    generator: Optional[torch.Generator],
    *,
    flips: bool = True,
    rot90: bool = True,
    color: float = 0.0,
    translate: int = 0,
    rotate: bool = False,
    zoom: float = 0.0,
) -> torch.Tensor:
    """Randomly shift / rotate and zoom / flip / rotate by multiples of 90 degrees /
    colour-jitter a float batch in [0, 1].

    ``translate`` is the largest shift in px: each image moves by offsets drawn uniformly from
    [-translate, translate] on each axis, its border reflected into the gap
    (:func:`translate_batch`). ``rotate`` (any angle) and ``zoom`` (scale in
    [1 - zoom, 1 + zoom]) resample each image once (:func:`rotate_zoom_batch`). An option that
    is off draws no random number, so the other options' draws are those of the code without
    it. ``color`` is the jitter strength: brightness and contrast factors drawn uniformly from
    [1 - color, 1 + color] per image. Operates before normalisation.
    """
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device
    if translate > 0:
        x = translate_batch(x, translate, generator)
    if rotate or zoom > 0:
        x = rotate_zoom_batch(x, rotate, zoom, generator)

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=generator) < 0.5).to(dev).view(n, 1, 1, 1)

    if flips:
        x = torch.where(coin(), x.flip(3), x)
        x = torch.where(coin(), x.flip(2), x)
    if rot90 and x.shape[2] == x.shape[3]:
        # flips + one optional transpose give all 8 symmetries of the square (dihedral group)
        x = torch.where(coin(), x.transpose(2, 3), x)
    if color > 0:
        b = 1 + color * (2 * torch.rand(n, generator=generator) - 1)
        c = 1 + color * (2 * torch.rand(n, generator=generator) - 1)
        b, c = b.to(dev).view(n, 1, 1, 1), c.to(dev).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean) * b
        x = x.clamp_(0, 1)
    return x


#: how a non-private batch is mixed after augmentation (:func:`mix_batch`)
MIXINGS = ("none", "mixup", "cutmix")


def mix_batch(
    x: torch.Tensor, kind: str, alpha: float, generator: Optional[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch (N, C, H, W) with a random permutation of itself; returns the mixed batch,
    the permutation and the weight ``lam`` of the original labels (the loss is
    ``lam * loss(y) + (1 - lam) * loss(y[perm])``).

    ``mixup`` (Zhang et al. 2018) blends whole images, ``lam * x + (1 - lam) * x[perm]``;
    ``cutmix`` (Yun et al. 2019) pastes a box of area about ``1 - lam`` of the image from
    ``x[perm]`` (clipped at the border; ``lam`` is then the area actually kept). ``lam`` is
    drawn from Beta(alpha, alpha), once per batch, from ``generator``. A mixed input carries
    two training images, so it is for non-private training only (under DP one image would
    reach two per-sample gradients: the config refuses it).
    """
    if kind not in MIXINGS:
        raise ConfigError(f"mixing={kind!r}; expected one of {', '.join(MIXINGS)}")
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=generator)
    if kind == "none" or n < 2:
        return x, perm, 1.0
    # Beta(a, a) from two Gamma(a) draws of a numpy stream seeded from the torch generator:
    # torch's own samplers take no generator, and the run must replay on resume
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha))
    perm = perm.to(x.device)
    if kind == "mixup":
        return lam * x + (1.0 - lam) * x[perm], perm, lam
    cut_h, cut_w = int(round(h * math.sqrt(1.0 - lam))), int(round(w * math.sqrt(1.0 - lam)))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))  # the box's centre (px)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]  # only the box of each partner
    return out, perm, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
