"""The service provider's side of MpLe: the augmented first layer and the network behind it.

The first convolution C_r of a network (Cin -> Cout, k x k, stride s, zero padding p, no
groups) is a linear map of the padded, flattened image: a (d, Cout H' W') matrix, built here by
convolving the d basis images (:func:`unroll_conv`). The augmented layer
``C_ac = M^-1 C_r P`` (P a secret permutation of the Cout output channels) takes a morphed
sample ``x M`` to ``x C_r P``: the plain first layer's feature maps with their channels
permuted. The rest of the network (everything after C_r, :func:`split_first_conv`) is then
trained on those by the service provider, who never sees an image. C_ac is frozen (MoLe trains
the layers after it); its bias, if C_r has one, is C_r's bias permuted.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .keys import MorphKey


def _check_conv(conv: nn.Module, key: MorphKey) -> None:
    s = key.spec
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"mple: the first layer must be an nn.Conv2d, got {type(conv).__name__}")
    bad = []
    if conv.in_channels != s.channels:
        bad.append(f"in_channels {conv.in_channels} != the key's {s.channels} channels")
    if conv.padding != (s.pad, s.pad) or conv.padding_mode != "zeros":
        bad.append(f"padding {conv.padding} ({conv.padding_mode}) != the key's zero padding {s.pad}")
    if conv.groups != 1 or conv.dilation != (1, 1):
        bad.append(f"groups {conv.groups} / dilation {conv.dilation} (need 1 / (1, 1))")
    if bad:
        raise ConfigError("mple: first layer of the wrong shape for the key: " + "; ".join(bad))


def out_side(conv: nn.Conv2d, key: MorphKey) -> Tuple[int, int]:
    """(H', W') of the first layer's output on the key's images."""
    k, st = conv.kernel_size, conv.stride
    side = key.spec.side
    return (side - k[0]) // st[0] + 1, (side - k[1]) // st[1] + 1


@torch.no_grad()
def unroll_conv(conv: nn.Conv2d, key: MorphKey, chunk: int = 512) -> torch.Tensor:
    """C_r as a (d, Cout H' W') float64 matrix: row i is the conv (no bias) of basis image i."""
    _check_conv(conv, key)
    s = key.spec
    w = conv.weight.detach().to(torch.float64).cpu()
    h, wd = out_side(conv, key)
    out = torch.empty(key.d, conv.out_channels * h * wd, dtype=torch.float64)
    for i in range(0, key.d, chunk):
        j = min(key.d, i + chunk)
        basis = torch.zeros(j - i, key.d, dtype=torch.float64)
        basis[torch.arange(j - i), torch.arange(i, j)] = 1.0
        out[i:j] = F.conv2d(basis.reshape(-1, s.channels, s.side, s.side), w,
                            stride=conv.stride).reshape(j - i, -1)
    return out


def permutation(n: int, seed: int) -> np.ndarray:
    """A secret permutation of ``n`` channels (from the provider's secret ``seed``)."""
    return np.random.default_rng(seed).permutation(n)


class AugmentedConv(nn.Module):
    """``z -> (z C_ac).reshape(n, Cout, H', W') + b_P`` for morphed samples z (n, d); frozen."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], out_shape: Tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32).reshape(1, -1, 1, 1))
        self.out_shape = tuple(int(v) for v in out_shape)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, key: MorphKey, perm: np.ndarray) -> "AugmentedConv":
        """``M^-1 C_r P`` from the plain first layer ``conv``, the key and the permutation."""
        perm = np.asarray(perm)
        if sorted(perm.tolist()) != list(range(conv.out_channels)):
            raise ConfigError(f"mple: the permutation must reorder the {conv.out_channels} output "
                              f"channels of the first layer, got {len(perm)} entries")
        cr = unroll_conv(conv, key)
        h, w = out_side(conv, key)
        cac = (torch.from_numpy(key.inverse) @ cr).reshape(key.d, conv.out_channels, h * w)
        cac = cac[:, torch.as_tensor(perm)].reshape(key.d, -1)  # output channel j is C_r's perm[j]
        bias = None if conv.bias is None else conv.bias.detach()[torch.as_tensor(perm)]
        return cls(cac, bias, (conv.out_channels, h, w))

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.d:
            raise ConfigError(f"mple: morphed samples of shape {tuple(z.shape)}; the augmented "
                              f"layer takes (n, {self.d})")
        out = (z @ self.weight).reshape(z.shape[0], *self.out_shape)
        return out if self.bias is None else out + self.bias


def first_conv_path(model: nn.Module) -> str:
    """Dotted name of the first nn.Conv2d of ``model`` (the one its input meets first in the
    backbones supported here: SmallCNN's and VGG's ``features.0``)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ConfigError(f"mple: {type(model).__name__} has no Conv2d to augment")


def split_first_conv(model: nn.Module) -> Tuple[nn.Conv2d, nn.Module]:
    """(the first conv, a copy of ``model`` with it replaced by the identity: the rest)."""
    if getattr(model, "input_stats", False):
        raise ConfigError(f"mple: this {type(model).__name__}'s head reads the colour statistics "
                          "of its input image (smallcnn_stats), which MpLe's morphed input hides; "
                          "use smallcnn_fast")
    path = first_conv_path(model)
    if path not in ("features.0",):
        raise ConfigError(f"mple: the first conv of {type(model).__name__} is {path!r}; only "
                          "networks whose input meets features.0 first (smallcnn*, vgg*) are supported")
    rest = copy.deepcopy(model)
    conv = rest.features[0]
    rest.features[0] = nn.Identity()
    return conv, rest


class ChannelPermute(nn.Module):
    """Reorder channels: ``x[:, index]``."""

    def __init__(self, index: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(np.asarray(index), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


class MpLeModel(nn.Module):
    """The service provider's network: the augmented layer, then the rest (trainable)."""

    def __init__(self, augmented: AugmentedConv, rest: nn.Module) -> None:
        super().__init__()
        self.augmented = augmented
        self.rest = rest

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.rest(self.augmented(z))


def build_mple(model: nn.Module, key: MorphKey, perm_seed: int) -> Tuple[MpLeModel, np.ndarray]:
    """(the MpLe network of ``model``'s architecture and first layer, the permutation)."""
    conv, rest = split_first_conv(model)
    perm = permutation(conv.out_channels, perm_seed)
    return MpLeModel(AugmentedConv.from_conv(conv, key, perm), rest), perm


def parity_model(model: nn.Module, key: MorphKey, perm_seed: int) -> MpLeModel:
    """The MpLe network computing ``model`` exactly: the augmented layer's permuted channels
    put back in order (``P^-1``) before ``model``'s own rest. Only who knows P can build it;
    it checks that ``z C_ac = x C_r P`` (the scheme's claim of no performance penalty)."""
    net, perm = build_mple(model, key, perm_seed)
    net.rest = nn.Sequential(ChannelPermute(np.argsort(perm)), net.rest)
    return net


__all__ = ["AugmentedConv", "ChannelPermute", "MpLeModel", "build_mple", "first_conv_path",
           "out_side", "parity_model", "permutation", "split_first_conv", "unroll_conv"]
