"""MpLe's secret morphing key: a dense (or block-diagonal) d x d matrix, built by name.

The data provider normalises an image, zero-pads it by ``pad`` pixels and flattens it channel
first (MoLe's layout, Shen et al. 2018): ``d = channels x (size + 2 pad)^2`` numbers (3468 for a
32 px RGB image padded by 1). The morphed sample is ``x M``. The key ``M`` has uniform [0, 1)
entries, either dense (``kind="dense"``) or ``blocks`` equal blocks on the diagonal
(``kind="block"``). Its 2-norm condition number is computed at creation and recorded: every
product with ``M^-1`` (the augmented layer, an attacker's inversion) loses about
``log10(cond)`` decimal digits, so a key above :data:`MAX_CONDITION` is refused (fp32 keeps ~7).

The key, its seed and the channel permutation are the provider's secrets: only
:attr:`MorphKey.fingerprint` (a hash) may be published, to say which key a dataset was made with.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

#: refuse keys whose condition number exceeds this: cond x fp32's 6e-8 must stay well below 1
#: for the augmented layer's features to match the plain ones (a dense 8 px key of seed 0 has
#: cond 5.5e5; the parity test states the error reached)
MAX_CONDITION = 1e7


@dataclass(frozen=True)
class KeySpec:
    """What a key is made for: image side ``image_size`` (px), ``channels``, zero padding
    ``pad`` (px) and its construction (``kind``, ``blocks``); ``seed`` is secret."""

    image_size: int
    channels: int = 3
    pad: int = 1
    kind: str = "dense"
    blocks: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "blocks"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"mple key {name} must be a positive integer, got {v!r}")
        if not isinstance(self.pad, (int, np.integer)) or self.pad < 0:
            raise ConfigError(f"mple key pad must be a non-negative integer, got {self.pad!r}")
        if self.d % self.blocks:
            raise ConfigError(f"mple key blocks={self.blocks} does not divide d={self.d}")
        KEY_KINDS.get(self.kind)  # unknown kinds raise, naming the known ones

    @property
    def side(self) -> int:
        """The padded side, px."""
        return self.image_size + 2 * self.pad

    @property
    def d(self) -> int:
        """Length of a flattened padded image (the key's side)."""
        return self.channels * self.side ** 2


@dataclass(frozen=True, eq=False)
class MorphKey:
    """A key: ``matrix`` M (d, d) and its ``inverse`` (float64), the ``condition`` number."""

    spec: KeySpec
    matrix: np.ndarray
    inverse: np.ndarray
    condition: float

    @property
    def d(self) -> int:
        return self.spec.d

    @property
    def fingerprint(self) -> str:
        """A public name of the key (sha256 of the matrix, 16 hex digits); reveals nothing of it."""
        return hashlib.sha256(np.ascontiguousarray(self.matrix).tobytes()).hexdigest()[:16]

    def check_images(self, shape, what: str = "images") -> None:
        """Refuse images of another shape than (channels, image_size, image_size)."""
        want = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if tuple(shape[-3:]) != want or len(shape) != 4:
            raise ConfigError(f"{what} of shape {tuple(shape)} do not fit the mple key made for "
                              f"(n, {want[0]}, {want[1]}, {want[2]}) images")


KEY_KINDS: Registry[Callable[[KeySpec, np.random.Generator], np.ndarray]] = Registry("mple key kind")


@KEY_KINDS.register("dense")
def _dense(spec: KeySpec, rng: np.random.Generator) -> np.ndarray:
    if spec.blocks != 1:
        raise ConfigError(f"mple key kind 'dense' takes blocks=1, got {spec.blocks}")
    return rng.random((spec.d, spec.d))


@KEY_KINDS.register("block")
def _block(spec: KeySpec, rng: np.random.Generator) -> np.ndarray:
    """``blocks`` copies of one uniform block on the diagonal (MoLe's kappa)."""
    return np.kron(np.eye(spec.blocks), rng.random((spec.d // spec.blocks,) * 2))


def _condition(spec: KeySpec, m: np.ndarray) -> float:
    if spec.kind == "block":  # the block's own (the copies share its singular values)
        b = spec.d // spec.blocks
        return float(np.linalg.cond(m[:b, :b]))
    return float(np.linalg.cond(m))


def make_key(spec: KeySpec, max_condition: float = MAX_CONDITION) -> MorphKey:
    """The key of ``spec`` (deterministic in its secret seed); refuses an ill-conditioned one."""
    m = KEY_KINDS.get(spec.kind)(spec, np.random.default_rng(spec.seed))
    return key_from_matrix(spec, m, max_condition)


def key_from_matrix(spec: KeySpec, matrix: np.ndarray, max_condition: float = MAX_CONDITION) -> MorphKey:
    """A key from a given matrix: refused when not (d, d), not finite, singular or with a
    condition number above ``max_condition``."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (spec.d, spec.d):
        raise ConfigError(f"mple key matrix of shape {m.shape}; images of {spec.channels} x "
                          f"{spec.image_size} px padded by {spec.pad} need ({spec.d}, {spec.d})")
    if not np.isfinite(m).all():
        raise ConfigError("mple key matrix has non-finite entries")
    cond = _condition(spec, m)
    if not np.isfinite(cond) or cond > max_condition:
        raise ConfigError(f"mple key is singular or ill-conditioned: condition number {cond:.3g} "
                          f"> {max_condition:.3g} (products with its inverse would lose "
                          f"~{np.log10(max(cond, 1.0)) if np.isfinite(cond) else float('inf'):.0f} "
                          "decimal digits; draw another seed)")
    return MorphKey(spec, m, np.linalg.inv(m), cond)


__all__ = ["KEY_KINDS", "KeySpec", "MAX_CONDITION", "MorphKey", "key_from_matrix", "make_key"]
