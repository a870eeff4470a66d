"""The proposed technique: DP training aimed at *balanced* accuracy on small, skewed data.

Four levers, each switched by a config field and ablated in the book:

1. ``features="colour"`` (or ``"scatter"``) -- a data-independent front end. ``colour``
   replaces each image by RGB colour histograms (4x4x4 bins, whole image and centre
   crop, square-rooted: 128 numbers), a classical dermoscopy cue (lesion colours are a
   diagnostic criterion: the ABCD rule's "C") that needs no learning at all. ``scatter``: Images are replaced once by
   their wavelet scattering coefficients (Mallat 2012; J=2, L=8, per colour channel: 243
   channels at S/4 x S/4), then a small head is trained. The transform has no parameters
   and sees no labels, so it costs no privacy; it removes most of the parameters DP noise
   has to fight (Tramer & Boneh 2021, "Differentially private learning needs better
   features").
2. ``logit_adjust=True`` -- balance through the loss, not the weights. Per-sample clipping
   undoes class weights (a clipped gradient has norm C whatever its weight), but it keeps
   the *direction* of a logit-adjusted loss, CE(f(x) + tau log pi, y) (Menon et al. 2021),
   whose minimiser is the balanced-error Bayes classifier when f is evaluated unadjusted.
   The class prior pi comes from a class histogram released once with the Gaussian
   mechanism (L2 sensitivity 1 under add/remove of one image, noise std ``hist_noise``);
   that release is composed with DP-SGD in the accountant as the step (hist_noise, q=1, 1).
3. ``ema_decay`` -- an exponential moving average of the iterates (post-processing: free),
   which averages out DP noise in the final model.
4. ``aug_mult=K`` -- augmentation multiplicity (De et al. 2022): each sample's gradient is
   the average over K augmented views *before* clipping, so augmentation adds signal
   without adding sensitivity.

Privacy: the released objects are the noisy histogram and the DP-SGD iterates; everything
else (scattering, EMA, evaluation) is post-processing. Total eps is the accountant's
composition of [(hist_noise, 1, 1), (sigma, q, T)] at delta, and sigma is derived so that
this total meets the target.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .constants import NUM_CLASSES
from .models import BACKBONES, gn_groups

SCATTER_J, SCATTER_L = 2, 8
SCATTER_VERSION = "kymatio-0.3-J2-L8-v1"


def scattering_transform(size: int):
    """Kymatio's 2-D scattering (J=2, L=8) for size x size inputs (torch frontend).

    Imported from the 2-D frontend directly: ``kymatio.torch`` also imports the 3-D code,
    which fails with SciPy >= 1.15 (``sph_harm`` was removed).
    """
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTER_J, shape=(size, size), L=SCATTER_L)


def scatter_channels() -> int:
    """Channels per colour: 1 + J L + L^2 J (J - 1) / 2 = 81 for J=2, L=8."""
    J, L = SCATTER_J, SCATTER_L
    return 1 + J * L + L * L * J * (J - 1) // 2


def scatter_features(x: np.ndarray, cache_dir: Optional[Path] = None, batch: int = 256,
                     progress: bool = True) -> np.ndarray:
    """Scattering coefficients of uint8 images (N, S, S, 3) -> float32 (N, 243, S/4, S/4).

    Pixels are scaled to [0, 1] (no data statistics). Cached on disk by a hash of the
    pixels, so the images of a dataset are transformed once.
    """
    n, size = x.shape[0], x.shape[1]
    key = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:20]
    file = Path(cache_dir) / f"scatter_{SCATTER_VERSION}_{size}px_{key}.npy" if cache_dir else None
    if file is not None and file.is_file():
        return np.load(file)
    S = scattering_transform(size)
    out = np.empty((n, 3 * scatter_channels(), size // 4, size // 4), dtype=np.float32)
    with torch.no_grad():
        for i in tqdm(range(0, n, batch), desc=f"scattering {n} images", disable=not progress,
                      leave=False):
            xb = torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2).float().div_(255).contiguous()
            out[i:i + batch] = S(xb).flatten(1, 2).numpy()
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, out)
        os.replace(tmp, file)
    return out


class ScatterHead(nn.Module):
    """GroupNorm (per sample: no data statistics) + optional small CNN + linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 243, spatial: int = 4,
                 hidden: int = 0, groups: int = 27) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels, affine=False)
        if hidden:
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(gn_groups(hidden), hidden),
                nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            feat = hidden * 4
        else:  # pool to spatial x spatial whatever the input size (16 px -> 4x4 maps)
            self.body = nn.Sequential(nn.AdaptiveAvgPool2d(spatial), nn.Flatten())
            feat = in_channels * spatial * spatial
        self.fc = nn.Linear(feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.norm(x)))


@BACKBONES.register("scatter_linear")
def _scatter_linear(num_classes: int, dp_compatible: bool = True, **kw) -> nn.Module:
    return ScatterHead(num_classes, **kw)


@BACKBONES.register("scatter_cnn")
def _scatter_cnn(num_classes: int, dp_compatible: bool = True, **kw) -> nn.Module:
    return ScatterHead(num_classes, hidden=kw.pop("hidden", 64), **kw)


COLOUR_BINS = 4  # per channel: 4^3 = 64 colour cells


def colour_features(x: np.ndarray) -> np.ndarray:
    """Colour histograms of uint8 images (N, S, S, 3) -> float32 (N, 128).

    For the whole image and for its centre (the middle half of each side, where the
    lesion usually is): the fraction of pixels in each of 4x4x4 RGB cells, square-rooted
    (Hellinger embedding, so a linear model compares distributions sensibly). Fixed,
    data-independent, invariant to flips and 90-degree rotations.
    """
    t = torch.from_numpy(np.ascontiguousarray(x))
    s = t.shape[1]
    out = []
    for region in (t, t[:, s // 4: s - s // 4, s // 4: s - s // 4]):
        idx = (region.long() * COLOUR_BINS) // 256  # 0..3 per channel
        code = (idx[..., 0] * COLOUR_BINS ** 2 + idx[..., 1] * COLOUR_BINS + idx[..., 2]).flatten(1)
        h = torch.zeros(len(t), COLOUR_BINS ** 3).scatter_add_(1, code, torch.ones(code.shape))
        out.append(torch.sqrt(h / code.shape[1]))
    return torch.cat(out, 1).numpy().astype(np.float32)


class LinearHead(nn.Module):
    """A linear classifier on flat features (bias included)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_features: int = 2 * COLOUR_BINS ** 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.fc.weight)  # start from the prior (with logit adjustment: balanced)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@BACKBONES.register("colour_linear")
def _colour_linear(num_classes: int, dp_compatible: bool = True, **kw) -> nn.Module:
    return LinearHead(num_classes, **kw)


def noisy_class_histogram(labels: np.ndarray, noise_std: float, generator: torch.Generator,
                          num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class counts + N(0, noise_std^2) per bin: the Gaussian mechanism, L2 sensitivity 1.

    Adding or removing one image changes one bin by 1, so the L2 sensitivity is 1 and this
    release is the Gaussian mechanism with noise multiplier ``noise_std``.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64).numpy() * noise_std
    return counts + noise


def log_prior(counts: np.ndarray, floor: float = 1.0) -> np.ndarray:
    """log of the class prior from (noisy) counts, each count floored at ``floor``."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), floor)
    return np.log(c / c.sum())


class LogitAdjustedLoss(nn.Module):
    """CE(logits + tau * log_prior, y) (Menon et al. 2021); predict with plain logits."""

    def __init__(self, log_prior_: np.ndarray, tau: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(tau * np.asarray(log_prior_), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + self.shift, y)


class EMA:
    """Exponential moving average of parameters (post-processing of DP iterates: free)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def average_grad_samples(model: nn.Module, k: int) -> None:
    """Augmentation multiplicity: average Opacus' per-sample gradients over groups of k views.

    The batch was laid out as B images x k views (view-major within an image), so
    ``grad_sample`` (B*k, ...) becomes (B, ...) before the optimizer clips per sample.
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):
            gs = torch.cat(gs)
        p.grad_sample = gs.view(-1, k, *gs.shape[1:]).mean(dim=1)


def feature_dihedral_views(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k random dihedral views per sample of scattering features (B, C, H, W) -> (B*k, C, H, W).

    A flip/transpose of the image flips/transposes the coefficient maps and permutes the
    orientation channels; :func:`orientation_permutation` gives that permutation, and the
    result approximates the features of the transformed image (up to the 2^J subsampling
    grid). It is a data-independent transform, so it does not affect privacy.
    """
    b = x.shape[0]
    x = x.repeat_interleave(k, dim=0)
    out = x.clone()
    for op in ("h", "v", "t"):
        m = (torch.rand(b * k, generator=generator) < 0.5).to(x.device)
        if op == "t" and x.shape[2] != x.shape[3]:
            continue
        perm = orientation_permutation(op).to(x.device)
        moved = out[:, perm]
        moved = {"h": moved.flip(3), "v": moved.flip(2), "t": moved.transpose(2, 3)}[op]
        out = torch.where(m.view(-1, 1, 1, 1), moved, out)
    return out


_PERMS: dict = {}


def orientation_permutation(op: str) -> torch.LongTensor:
    """Channel permutation of the 243 scattering channels under an image flip or transpose.

    Derived numerically once from random smooth images (no data): for each channel of
    S(op(x)), the channel of op(S(x)) that matches it (an optimal assignment).
    """
    if op not in _PERMS:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(64, 1, 32, 32, generator=g)
        x = nn.functional.avg_pool2d(x, 3, 1, 1)[:, 0].contiguous()
        S = scattering_transform(32)
        f = {"h": lambda t: t.flip(-1), "v": lambda t: t.flip(-2), "t": lambda t: t.transpose(-1, -2)}[op]
        with torch.no_grad():
            a, b = S(x), S(f(x).contiguous())
        fa = f(a)
        err = ((b[:, :, None] - fa[:, None, :]) ** 2).mean(dim=(0, 3, 4))
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(err.numpy())  # a bijection, best total match
        per_colour = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
        c = scatter_channels()
        _PERMS[op] = torch.cat([per_colour + i * c for i in range(3)])
    return _PERMS[op]
