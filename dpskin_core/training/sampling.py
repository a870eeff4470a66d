"""Poisson sampling of privacy units, as the accountant assumes.

Every unit (an image, or a lesion with all its images) enters each batch independently with
probability q, and an epoch is exactly ``steps`` batches: the accountant composes
``steps x epochs`` subsampled Gaussian steps at this same q (a test checks that the record,
the accountant and this sampler agree). A batch may be empty; the trainer still takes the
(noise-only) step, which the accountant counts.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..errors import ConfigError


class PoissonSampler(Sampler[List[int]]):
    """``steps`` batches of image indices; unit u is in a batch with probability ``sample_rate``.

    ``groups`` lists the image indices of each unit (None: each image is its own unit; then
    the draws are those of Opacus' UniformWithReplacementSampler for the same generator).
    ``shard = (rank, world)``: this process draws only units rank, rank + world, ... (each with
    probability q, from its own generator); the union of the ranks' batches is one Poisson
    batch of all units (:mod:`.distributed`).
    """

    def __init__(self, n_images: int, sample_rate: float, steps: int,
                 generator: Optional[torch.Generator] = None,
                 groups: Optional[Sequence[np.ndarray]] = None,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        if not 0 < sample_rate <= 1 or steps < 1:
            raise ConfigError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ConfigError(f"need 0 <= rank < world size, got shard {shard}")
        self.n_images, self.sample_rate, self.steps = n_images, sample_rate, steps
        self.generator = generator
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups] if groups is not None else None
        self.n_units = len(self.groups) if self.groups is not None else n_images
        self.owned = torch.arange(rank, self.n_units, world)  # the units this rank samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            chosen = (torch.rand(len(self.owned), generator=self.generator) < self.sample_rate)
            units = self.owned[chosen].tolist()
            if self.groups is None:
                yield units
            else:
                yield np.concatenate([self.groups[u] for u in units]).tolist() if units else []


def _collate(batch: List[tuple]) -> tuple:
    """(index tensor,) of a batch, also of an empty one."""
    if not batch:
        return (torch.zeros(0, dtype=torch.long),)
    return (torch.stack([b[0] for b in batch]),)


def poisson_loader(n_images: int, sample_rate: float, steps: int, generator: torch.Generator,
                   groups: Optional[Sequence[np.ndarray]] = None,
                   shard: Tuple[int, int] = (0, 1)) -> DataLoader:
    """A DataLoader of ``(image index tensor,)`` batches drawn by :class:`PoissonSampler`;
    ``len(loader) == steps``, so Opacus reads back q = 1 / steps."""
    sampler = PoissonSampler(n_images, sample_rate, steps, generator, groups, shard)
    # the loader's own generator is the sampler's, as Opacus' DPDataLoader has it (each epoch's
    # iterator draws one number from it first), so seeded runs repeat earlier versions' batches
    return DataLoader(TensorDataset(torch.arange(n_images)), batch_sampler=sampler,
                      collate_fn=_collate, generator=generator)


def lesion_groups(lesion_ids: Sequence[str]) -> List[np.ndarray]:
    """Image indices of each lesion, in order of first appearance (the privacy units)."""
    ids = np.asarray(lesion_ids).astype(str)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)                        # units in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    unit = rank[inverse]
    return [np.flatnonzero(unit == u) for u in range(len(order))]


def unit_index(groups: Sequence[np.ndarray], n_images: int) -> np.ndarray:
    """(n_images,) the unit of each image."""
    out = np.full(n_images, -1, dtype=np.int64)
    for u, g in enumerate(groups):
        out[g] = u
    if (out < 0).any():
        raise ConfigError("every training image must belong to exactly one privacy unit")
    return out


def grad_samples(model: torch.nn.Module) -> Iterator[Tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its per-sample gradients (B, ...)) for each parameter Opacus' hooks filled."""
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is not None:
            yield p, torch.cat(gs) if isinstance(gs, list) else gs


def aggregate_grad_samples(model: torch.nn.Module, units: torch.Tensor) -> int:
    """Replace Opacus' per-image gradients (rows of ``grad_sample``) by per-unit means: rows with
    the same ``units`` value (B,) are averaged, so the optimizer clips one gradient per unit
    (user-level DP-SGD). Returns the number of units in the batch."""
    uniq, inverse = torch.unique(units, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(uniq)).clamp_(min=1)
    for p, gs in grad_samples(model):
        inv = inverse.to(gs.device)
        out = torch.zeros((len(uniq),) + tuple(gs.shape[1:]), dtype=gs.dtype, device=gs.device)
        out.index_add_(0, inv, gs)
        p.grad_sample = out / counts.to(gs.device).view(-1, *([1] * (gs.dim() - 1)))
    return len(uniq)


__all__ = ["PoissonSampler", "aggregate_grad_samples", "grad_samples", "lesion_groups",
           "poisson_loader", "unit_index"]
