"""Front ends by name: how stored images become model inputs, for training and evaluation.

A front end is a fixed, data-independent map (no parameters, no labels), so applying it costs
no privacy budget:

* ``pixels`` -- the image itself, augmented (flips, 90-degree rotations, colour jitter) and
  normalised with fixed public constants; taken by every image backbone;
* ``colour`` -- RGB colour histograms of the whole image and of its centre (4x4x4 bins,
  square-rooted: 128 numbers), a classical dermoscopy cue (the ABCD rule's "C"); invariant to
  flips and rotations; taken by the ``colour_linear`` head;
* ``derm`` -- dermoscopy features: the colour histograms above, hue-saturation-value histograms
  (8x4x4 bins, whole image and centre), colour moments (mean and spread of each channel in the
  whole image, its centre and its border, and the centre-minus-border contrast) and gradient
  statistics of the luminance at three scales (texture); each of the four blocks scaled to unit
  L2 norm per image (429 numbers, norm exactly 2); invariant to flips and rotations; taken by
  the ``derm_linear`` head;
* ``scatter`` -- wavelet scattering coefficients (Mallat 2012; kymatio, J=2, L=8 per colour
  channel: 243 maps of S/4 x S/4), augmented by dihedral views in feature space; taken by the
  ``scatter_linear`` head (Tramer & Boneh 2021: DP learning needs better features).

Config validation (:func:`.config.validate`), the training input pipeline (:class:`Inputs`)
and a reloaded model (:class:`dpskin_core.attacks.victims.TrainedModel`) all ask
:data:`FRONT_ENDS`, so the meaning of ``features`` lives here only.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..files import save_npy
from ..registry import Registry
from .augment import COLOUR_CONSTANCY, augment, normaliser, to_float

Norm = Tuple[torch.Tensor, torch.Tensor]
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


SCATTER_CHANNELS = 3 * scatter_channels()  # per RGB channel: 243


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
        save_npy(file, out)
    return out


COLOUR_BINS = 4  # per channel: 4^3 = 64 colour cells
COLOUR_DIM = 2 * COLOUR_BINS ** 3  # whole image + centre


def colour_features(x: np.ndarray) -> np.ndarray:
    """Colour histograms of uint8 images (N, S, S, 3) -> float32 (N, 128).

    For the whole image and for its centre (the middle half of each side, where the
    lesion usually is): the fraction of pixels in each of 4x4x4 RGB cells, square-rooted
    (Hellinger embedding, so a linear model compares distributions sensibly). Fixed,
    data-independent, invariant to flips and 90-degree rotations.
    """
    idx = (torch.from_numpy(np.ascontiguousarray(x)).long() * COLOUR_BINS) // 256  # 0..3
    cells = idx[..., 0] * COLOUR_BINS ** 2 + idx[..., 1] * COLOUR_BINS + idx[..., 2]
    return cell_histograms(cells, COLOUR_BINS ** 3)


def centre(t: torch.Tensor) -> torch.Tensor:
    """The middle half of each side of images (N, S, S, ...), where the lesion usually is."""
    s = t.shape[1]
    return t[:, s // 4: s - s // 4, s // 4: s - s // 4]


def cell_histograms(cells: torch.Tensor, n_cells: int) -> np.ndarray:
    """Square-rooted fractions of pixels per cell (N, S, S) -> float32 (N, 2 * n_cells), for
    the whole image and its :func:`centre` (the Hellinger embedding: a linear model compares
    the distributions sensibly)."""
    out = []
    for region in (cells, centre(cells)):
        code = region.flatten(1)
        hist = torch.zeros(len(code), n_cells).scatter_add_(1, code, torch.ones(code.shape))
        out.append(torch.sqrt(hist / code.shape[1]))
    return torch.cat(out, 1).numpy().astype(np.float32)


def hsv_features(x: np.ndarray, bins: Tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """Hue-saturation-value histograms of uint8 images (N, S, S, 3) -> float32 (N, 2 * 128):
    whole image and centre, square-rooted fractions (as :func:`colour_features`). Hue gets
    more bins than saturation and value: it separates the browns, blues and reds of lesions."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
    mx, arg = t.max(dim=-1)
    mn = t.min(dim=-1).values
    c = mx - mn
    r, g, b = t.unbind(-1)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    hue = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4], -1)
    h = torch.where(c > 0, hue.gather(-1, arg.unsqueeze(-1)).squeeze(-1) / 6, torch.zeros_like(c))
    sat = torch.where(mx > 0, c / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    idx = [torch.clamp((v * b).long(), max=b - 1) for v, b in zip((h, sat, mx), bins)]
    return cell_histograms((idx[0] * bins[1] + idx[1]) * bins[2] + idx[2], int(np.prod(bins)))


def colour_moments(x: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of R, G, B in the whole image, its centre and its border,
    and the centre-minus-border mean (the lesion against the skin): float32 (N, 21), in [0, 1]
    units of intensity."""
    f = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
    s = f.shape[1]
    border = torch.ones(s, s, dtype=torch.bool)
    border[s // 4: s - s // 4, s // 4: s - s // 4] = False
    regions = (f.flatten(1, 2), centre(f).flatten(1, 2), f[:, border])
    out = [m for reg in regions for m in (reg.mean(1), reg.std(1))]
    out.append(out[2] - out[4])
    return torch.cat(out, 1).numpy().astype(np.float32)


def texture_features(x: np.ndarray) -> np.ndarray:
    """Differences of neighbouring luminance values at 1, 1/2 and 1/4 scale, in the whole image
    and in its centre: the mean and standard deviation of their absolute values and the
    fraction above 0.03 and 0.1 (edges, network and dots of the lesion): float32 (N, 24).
    Horizontal and vertical differences are pooled, so the statistics are invariant to flips
    and 90-degree rotations."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255).permute(0, 3, 1, 2)
    lum = (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).unsqueeze(1)
    out = []
    for k in (1, 2, 4):
        level = nn.functional.avg_pool2d(lum, k) if k > 1 else lum
        n = level.shape[-1]
        for region in (level, level[..., n // 4: n - n // 4, n // 4: n - n // 4]):
            d = torch.cat([(region[..., :, 1:] - region[..., :, :-1]).abs().flatten(1),
                           (region[..., 1:, :] - region[..., :-1, :]).abs().flatten(1)], 1)
            out += [d.mean(1), d.std(1), (d > 0.03).float().mean(1), (d > 0.1).float().mean(1)]
    return torch.stack(out, 1).numpy().astype(np.float32)


#: the blocks of the ``derm`` front end, each scaled to unit L2 norm per image
DERM_BLOCKS = (colour_features, hsv_features, colour_moments, texture_features)
DERM_DIM = 2 * COLOUR_BINS ** 3 + 2 * 8 * 4 * 4 + 21 + 24  # 429
DERM_NORM = float(np.sqrt(len(DERM_BLOCKS)))  # every row's L2 norm (4 unit blocks)


def derm_features(x: np.ndarray) -> np.ndarray:
    """The ``derm`` front end: every block of :data:`DERM_BLOCKS`, each divided by its L2 norm
    per image (a data-independent scaling: the blocks weigh alike and every row has norm
    :data:`DERM_NORM`, the bound a private normalisation needs) -> float32 (N, 429)."""
    blocks = []
    for block in DERM_BLOCKS:
        b = block(x)
        blocks.append(b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12))
    return np.concatenate(blocks, 1).astype(np.float32)


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


# --------------------------------------------------------------------------- the registry
class FrontEnd:
    """Stored uint8 images (N, S, S, 3) -> model inputs. Subclasses set ``name`` and ``heads``
    (the backbones that take this front end; ``None``: every image backbone)."""

    name: str = ""
    heads: Optional[Tuple[str, ...]] = None
    #: an L2 bound on every encoded row (None: unbounded), which a private feature
    #: normalisation (``feature_norm="private"``) needs for its sensitivity
    norm_bound: Optional[float] = None

    def check(self, cfg: Any) -> None:
        """ConfigError unless ``cfg.backbone`` takes this front end (and its own constraints)."""
        feature_heads = {h for n in FRONT_ENDS for h in (FRONT_ENDS.get(n).heads or ())}
        if self.heads is None and cfg.backbone in feature_heads:
            raise ConfigError(f"backbone={cfg.backbone!r} does not take features={self.name!r}; "
                              "image backbones take features='pixels'")
        if self.heads is not None and cfg.backbone not in self.heads:
            raise ConfigError(f"backbone={cfg.backbone!r} does not take features={self.name!r}; "
                              f"use one of {', '.join(self.heads)}")

    def rows(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        """The stored rows of uint8 images (N, S, S, 3), on the CPU: the run's colour constancy
        (``cfg.colour_constancy``), then :meth:`encode`. Every caller goes through here, so a
        model is trained, evaluated and attacked on the same inputs."""
        if cfg.colour_constancy != "none":
            x = COLOUR_CONSTANCY.get(cfg.colour_constancy)(x)
        return self.encode(x, cfg)

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        """The stored rows of (colour-corrected) uint8 images (N, S, S, 3), on the CPU."""
        raise NotImplementedError

    def train_views(self, xb: torch.Tensor, k: int, generator: torch.Generator, cfg: Any,
                    norm: Norm) -> torch.Tensor:
        """``k`` augmented views of each stored row, image-major: (B*k, ...)."""
        return xb.repeat_interleave(k, dim=0)

    def eval_inputs(self, xb: torch.Tensor, norm: Norm) -> torch.Tensor:
        """Un-augmented model inputs of stored rows."""
        return xb


#: name -> FrontEnd
FRONT_ENDS: Registry[FrontEnd] = Registry("front end")


def _register(cls: type) -> type:
    FRONT_ENDS.register(cls.name)(cls())
    return cls


@_register
class Pixels(FrontEnd):
    """The image: augmented, then normalised with fixed public constants."""

    name = "pixels"

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()

    def train_views(self, xb: torch.Tensor, k: int, generator: torch.Generator, cfg: Any,
                    norm: Norm) -> torch.Tensor:
        x = xb.float().div_(255.0).repeat_interleave(k, dim=0)
        x = augment(x, generator, flips=cfg.augment_flips, rot90=cfg.augment_rot90,
                    color=cfg.augment_color, translate=cfg.augment_translate,
                    rotate=cfg.augment_rotate, zoom=cfg.augment_zoom)
        return (x - norm[0]) / norm[1]

    def eval_inputs(self, xb: torch.Tensor, norm: Norm) -> torch.Tensor:
        return to_float(xb, *norm)


@_register
class Colour(FrontEnd):
    """Colour histograms (:func:`colour_features`); invariant to flips and rotations, so a
    training view is the stored row itself."""

    name = "colour"
    heads = ("colour_linear",)

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        return torch.from_numpy(colour_features(x))


@_register
class Derm(FrontEnd):
    """Dermoscopy features (:func:`derm_features`): colour, hue, colour moments and texture,
    invariant to flips and rotations, every row of norm :data:`DERM_NORM`."""

    name = "derm"
    heads = ("derm_linear",)
    norm_bound = DERM_NORM

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        return torch.from_numpy(derm_features(x))


@_register
class Scatter(FrontEnd):
    """Scattering coefficients (:func:`scatter_features`, cached on disk), augmented by
    dihedral views in feature space (:func:`feature_dihedral_views`)."""

    name = "scatter"
    heads = ("scatter_linear",)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if cfg.image_size % 4:
            raise ConfigError(f"image_size={cfg.image_size}: features='scatter' needs a multiple of 4")

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        from ..data.imagecache import cache_root

        return torch.from_numpy(scatter_features(x, cache_root(cfg.cache_dir),
                                                 progress=cfg.progress))

    def train_views(self, xb: torch.Tensor, k: int, generator: torch.Generator, cfg: Any,
                    norm: Norm) -> torch.Tensor:
        if not (cfg.augment_flips or cfg.augment_rot90):
            return xb.repeat_interleave(k, dim=0)
        return feature_dihedral_views(xb, k, generator)


@_register
class Given(FrontEnd):
    """Rows the caller encoded already: float (N, D) arrays in the data bundle, used as they
    are, with no augmentation (they are not images; e.g. MpLe's morphed samples, which only the
    key's holder could flip or rotate). Only through ``run(..., model_factory=...)``, whose
    network takes such rows."""

    name = "given"

    def encode(self, x: np.ndarray, cfg: Any) -> torch.Tensor:
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"features='given' takes float rows (N, D) in the data bundle, got "
                              f"{x.dtype} of shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class Inputs:
    """The run's input pipeline: stored rows of every split, and the model inputs of a batch.

    With ``aug_mult=K`` each image yields K training views, laid out image-major (B*K rows).
    On CUDA the stored rows (uint8 images or features) live on the GPU when they take at most
    a quarter of its free memory (batches then never cross the bus); otherwise each batch is
    gathered into pinned host memory and copied without blocking.
    """

    def __init__(self, cfg: Any, data: Any, device: torch.device) -> None:
        self.cfg, self.device, self.k = cfg, device, cfg.aug_mult
        self.front = FRONT_ENDS.get(cfg.features)
        self.train_x = self._place(self.front.rows(data.x_train, cfg))
        self.val_x = self._place(self.front.rows(data.x_val, cfg))
        self.eval_x = self.val_x if cfg.eval_split == "val" else self._place(
            self.front.rows(data.x_test, cfg))
        self.norm = normaliser(cfg.normalisation, device)
        self.pipeline_s = 0.0  # seconds spent preparing training batches (train_batch)

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return x
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        if x.numel() * x.element_size() <= free_bytes / 4:
            return x.to(self.device)
        return x

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored training rows ``idx`` on the run's device."""
        x = self.train_x
        if x.device == self.device:
            return x[idx.to(self.device)]
        xb = x[idx]
        if self.device.type == "cuda":  # pinned, so that the copy overlaps the computation
            return xb.pin_memory().to(self.device, non_blocking=True)
        return xb

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented training inputs of the training rows ``idx``: (B*K, ...). The time spent
        here (gather, copy, augmentation, normalisation; s) adds up in ``pipeline_s``."""
        t0 = time.perf_counter()
        out = self.front.train_views(self.rows(idx), self.k, generator, self.cfg, self.norm)
        self.pipeline_s += time.perf_counter() - t0
        return out

    def eval(self, xb: torch.Tensor) -> torch.Tensor:
        """Un-augmented inputs for evaluation."""
        return self.front.eval_inputs(xb.to(self.device), self.norm)
