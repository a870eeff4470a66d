"""Reconstruction attacks: model inversion of each class and gradient inversion of one
training image, with image-similarity metrics (PSNR, SSIM) against the true images.

Both attacks optimise an image ``x = sigmoid(z)`` (so pixels stay in [0, 1]) through the
model's own input normalisation (:meth:`TrainedModel.normalise`); they need a pixel model.
Every function returns numpy arrays, HWC float in [0, 1], ready for an image grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..constants import CLASSES
from ..errors import ConfigError
from .victims import TrainedModel


# --------------------------------------------------------------------------------------
# image similarity
# --------------------------------------------------------------------------------------
def _pair(x: np.ndarray, ref: np.ndarray) -> tuple:
    a, b = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"mismatched shapes: x {a.shape}, ref {b.shape}")
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 3:
        raise ConfigError(f"images must be (H, W) or (H, W, C) with H, W >= 3, got {a.shape}")
    return a, b


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE); inf for identical images."""
    a, b = _pair(x, ref)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, mean over channels.

    As ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: local means, variances and covariance
    under a Gaussian window truncated at 3.5 sigma (11 px wide; narrower on images under 11
    px), K1 = 0.01, K2 = 0.03, averaged over the pixels whose window fits in the image.
    """
    from scipy.ndimage import gaussian_filter

    a, b = _pair(x, ref)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    radius = min(int(3.5 * sigma + 0.5), (min(a.shape[:2]) - 1) // 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(im: np.ndarray) -> np.ndarray:
        return gaussian_filter(im, sigma, truncate=radius / sigma)

    vals = []
    for ch in range(a.shape[2]):
        u, v = a[..., ch], b[..., ch]
        mu_u, mu_v = blur(u), blur(v)
        var_u, var_v = blur(u * u) - mu_u ** 2, blur(v * v) - mu_v ** 2
        cov = blur(u * v) - mu_u * mu_v
        s = ((2 * mu_u * mu_v + c1) * (2 * cov + c2)) / ((mu_u ** 2 + mu_v ** 2 + c1) * (var_u + var_v + c2))
        vals.append(s[radius:s.shape[0] - radius, radius:s.shape[1] - radius].mean())
    return float(np.mean(vals))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images (N, C, H, W): mean absolute neighbour difference,
    summed over the two directions, one value per image (N,)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().permute(0, 2, 3, 1).double().numpy()


def _float01(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] images -> float64 [0, 1]."""
    x = np.asarray(x)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


# --------------------------------------------------------------------------------------
# model inversion
# --------------------------------------------------------------------------------------
@dataclass
class InversionResult:
    """Per class: the inverted image (K, S, S, 3) in [0, 1], the model's probability of that
    class on it, and PSNR/SSIM against the class mean and the nearest reference image."""

    classes: List[int]
    images: np.ndarray
    class_prob: np.ndarray
    psnr_mean: Optional[np.ndarray] = None     # vs the mean reference image of the class
    ssim_mean: Optional[np.ndarray] = None
    psnr_nearest: Optional[np.ndarray] = None  # best over the class's reference images
    ssim_nearest: Optional[np.ndarray] = None

    def summary(self) -> Dict[str, object]:
        out: Dict[str, object] = {"class_prob": self.class_prob.tolist()}
        for k in ("psnr_mean", "ssim_mean", "psnr_nearest", "ssim_nearest"):
            v = getattr(self, k)
            out[k] = None if v is None or np.isnan(v).all() else float(np.nanmean(v))
        return out


def invert_classes(model: TrainedModel, classes: Optional[Sequence[int]] = None, *,
                   steps: int = 300, lr: float = 0.1, tv_weight: float = 0.1, seed: int = 0,
                   reference_x: Optional[np.ndarray] = None,
                   reference_y: Optional[np.ndarray] = None,
                   progress: bool = False) -> InversionResult:
    """Model inversion (Fredrikson et al. 2015, with a total-variation prior): for each class
    c, find x in [0, 1] maximising log p(c | x) - tv_weight * TV(x) by Adam from mid-grey.

    With ``reference_x``/``reference_y`` (e.g. the training images, uint8), each inversion
    is compared by PSNR/SSIM with its class's mean image and with its nearest image (NaN for
    a class with no reference image).
    """
    size = model.config.image_size
    cls = list(range(len(CLASSES))) if classes is None else [int(c) for c in classes]
    if not cls or min(cls) < 0 or max(cls) >= len(CLASSES):
        raise ConfigError(f"classes must be non-empty and in 0..{len(CLASSES) - 1}, got {cls}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps!r}")
    g = torch.Generator().manual_seed(seed)
    z = (0.01 * torch.randn(len(cls), 3, size, size, generator=g)).to(model.device).requires_grad_()
    target = torch.tensor(cls, device=model.device)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in tqdm(range(steps), desc="model inversion", disable=not progress):
        x = torch.sigmoid(z)
        logp = torch.log_softmax(model.model(model.normalise(x)), 1).gather(1, target[:, None])[:, 0]
        loss = (-logp + tv_weight * total_variation(x)).sum()  # images are independent: sum
        z.grad = torch.autograd.grad(loss, [z])[0]  # only the image moves, not the model
        opt.step()
    with torch.no_grad():
        x = torch.sigmoid(z)
        prob = torch.softmax(model.model(model.normalise(x)), 1).gather(1, target[:, None])[:, 0]
    out = InversionResult(cls, _hwc(x), prob.cpu().double().numpy())
    if reference_x is not None:
        if reference_y is None or len(reference_y) != len(reference_x):
            raise ConfigError("reference_y must give one label per reference_x image")
        ref, ry = _float01(reference_x), np.asarray(reference_y)
        pm, sm, pn, sn = [], [], [], []
        for img, c in zip(out.images, cls):
            own = ref[ry == c]
            if len(own) == 0:  # e.g. a rare class absent from a small training set
                pm.append(np.nan), sm.append(np.nan), pn.append(np.nan), sn.append(np.nan)
                continue
            pm.append(psnr(img, own.mean(0)))
            sm.append(ssim(img, own.mean(0)))
            pn.append(max(psnr(img, r) for r in own))
            sn.append(max(ssim(img, r) for r in own))
        out.psnr_mean, out.ssim_mean = np.array(pm), np.array(sm)
        out.psnr_nearest, out.ssim_nearest = np.array(pn), np.array(sn)
    return out


# --------------------------------------------------------------------------------------
# gradient inversion
# --------------------------------------------------------------------------------------
def dp_gradient(grads: Sequence[torch.Tensor], max_grad_norm: float, noise_multiplier: float,
                generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """What DP-SGD releases for a batch holding one example: the gradient clipped to L2 norm
    ``max_grad_norm`` (C) plus N(0, (noise_multiplier * C)^2) noise on every coordinate."""
    if not max_grad_norm > 0 or not noise_multiplier >= 0:
        raise ConfigError(f"need max_grad_norm > 0 and noise_multiplier >= 0, got "
                          f"{max_grad_norm!r}, {noise_multiplier!r}")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, max_grad_norm / (float(norm) + 1e-12))
    sd = noise_multiplier * max_grad_norm
    return [g * scale + sd * torch.randn(g.shape, generator=generator).to(g) for g in grads]


@dataclass
class GradientInversionResult:
    """The reconstruction (S, S, 3) in [0, 1], the truth, and their PSNR (dB) / SSIM."""

    reconstruction: np.ndarray
    truth: np.ndarray
    psnr: float
    ssim: float
    cosine: float               # final cosine similarity of the matched gradients
    dp: bool
    max_grad_norm: Optional[float]
    noise_multiplier: float

    def summary(self) -> Dict[str, object]:
        return {"psnr": self.psnr, "ssim": self.ssim, "cosine": self.cosine, "dp": self.dp,
                "max_grad_norm": self.max_grad_norm, "noise_multiplier": self.noise_multiplier}


def gradient_inversion(model: TrainedModel, x_true: np.ndarray, y_true: int, *,
                       max_grad_norm: Optional[float] = None, noise_multiplier: float = 0.0,
                       steps: int = 300, lr: float = 0.1, tv_weight: float = 1e-2,
                       seed: int = 0, progress: bool = False) -> GradientInversionResult:
    """Inverting gradients (Geiping et al. 2020): recover one training image from the
    gradient of its loss, by minimising 1 - cos(grad(x'), g) + tv_weight * TV(x') over x'.

    ``g`` is the true gradient (non-private) or, with ``max_grad_norm`` (C), the DP-SGD
    release for that image alone: clipped to C plus Gaussian noise of std
    ``noise_multiplier * C`` (:func:`dp_gradient`). A batch of one is the attacker's best
    case; in a real batch the image's gradient is also summed with others. The label is
    assumed known (it can be read off the last layer's gradient, Zhao et al. 2020).
    """
    x0 = _float01(x_true)
    size = model.config.image_size
    if x0.shape != (size, size, 3):
        raise ConfigError(f"x_true must be one image ({size}, {size}, 3), got {x0.shape}")
    if not 0 <= int(y_true) < len(CLASSES):
        raise ConfigError(f"y_true must be in 0..{len(CLASSES) - 1}, got {y_true!r}")
    if max_grad_norm is None and noise_multiplier:
        raise ConfigError("noise_multiplier needs max_grad_norm (noise std = sigma * C)")
    net, dev = model.model, model.device
    params = [p for p in net.parameters() if p.requires_grad]
    y = torch.tensor([int(y_true)], device=dev)

    def grad_of(x01: torch.Tensor, create_graph: bool) -> List[torch.Tensor]:
        loss = nn.functional.cross_entropy(net(model.normalise(x01)), y)
        return list(torch.autograd.grad(loss, params, create_graph=create_graph))

    g = torch.Generator().manual_seed(seed)
    truth = torch.from_numpy(x0).permute(2, 0, 1)[None].float().to(dev)
    target = [t.detach() for t in grad_of(truth, False)]
    if max_grad_norm is not None:
        target = dp_gradient(target, max_grad_norm, noise_multiplier, g)
    t_norm = torch.sqrt(sum((t ** 2).sum() for t in target))
    z = (0.01 * torch.randn(1, 3, size, size, generator=g)).to(dev).requires_grad_()
    opt = torch.optim.Adam([z], lr=lr)
    # step decay at 3/8, 5/8, 7/8 of the steps, as Geiping et al.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * f) for f in (0.375, 0.625, 0.875)], 0.1)
    cos = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc="gradient inversion", disable=not progress):
        x = torch.sigmoid(z)
        gx = grad_of(x, True)
        dot = sum((a * b).sum() for a, b in zip(gx, target))
        cos = dot / (torch.sqrt(sum((a ** 2).sum() for a in gx)) * t_norm + 1e-12)
        loss = 1 - cos + tv_weight * total_variation(x).sum()
        z.grad = torch.autograd.grad(loss, [z])[0]  # only the image moves, not the model
        opt.step()
        sched.step()
    rec = _hwc(torch.sigmoid(z))[0]
    return GradientInversionResult(rec, x0, psnr(rec, x0), ssim(rec, x0), float(cos.detach()),
                                   max_grad_norm is not None, max_grad_norm, float(noise_multiplier))


__all__ = ["GradientInversionResult", "InversionResult", "dp_gradient", "gradient_inversion",
           "invert_classes", "psnr", "ssim", "total_variation"]
