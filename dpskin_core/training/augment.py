"""Batch augmentations and normalisation on tensors, vectorised over the batch.

Images stay uint8 (N, 3, S, S) in memory; each batch is converted to float, augmented with
per-sample random choices drawn from an explicit ``torch.Generator`` (so a run is
reproducible and a resumed run draws the same numbers), then normalised with fixed public
constants.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..constants import NORMALISATIONS
from ..errors import ConfigError


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


def augment(
    x: torch.Tensor,
    generator: Optional[torch.Generator],
    *,
    flips: bool = True,
    rot90: bool = True,
    color: float = 0.0,
) -> torch.Tensor:
    """Randomly flip / rotate by multiples of 90 degrees / colour-jitter a float batch in [0, 1].

    ``color`` is the jitter strength: brightness and contrast factors drawn uniformly from
    [1 - color, 1 + color] per image. Operates before normalisation.
    """
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device

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
