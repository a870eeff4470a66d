"""The data provider's side of MpLe: morph normalised images with the secret key, in batches,
and ship a morphed dataset (morphed vectors, labels and the key's public fingerprint only)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .keys import MorphKey

PathLike = Union[str, Path]


def flatten_padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, C (H + 2 pad) (W + 2 pad)): zero padding, then channel-first rows."""
    return F.pad(x, (pad, pad, pad, pad)).reshape(x.shape[0], -1)


def unflatten(v: torch.Tensor, key: MorphKey) -> torch.Tensor:
    """(n, d) -> the (n, C, H, W) images inside the padding (inverse of :func:`flatten_padded`)."""
    s, p = key.spec, key.spec.pad
    x = v.reshape(v.shape[0], s.channels, s.side, s.side)
    return x[:, :, p:p + s.image_size, p:p + s.image_size]


def interior(key: MorphKey) -> np.ndarray:
    """Indices of the flattened padded image that hold pixels (not the always-zero padding)."""
    s, p = key.spec, key.spec.pad
    mask = np.zeros((s.channels, s.side, s.side), bool)
    mask[:, p:p + s.image_size, p:p + s.image_size] = True
    return np.flatnonzero(mask.ravel())


def morph(x: torch.Tensor, key: MorphKey, batch_size: int = 1024) -> torch.Tensor:
    """Morphed samples ``flatten_padded(x) M`` (n, d), float32, of normalised images ``x``
    (n, C, H, W), ``batch_size`` images at a time (the product is taken in float64)."""
    key.check_images(tuple(x.shape))
    if not torch.isfinite(x).all():
        raise DataError("mple morph: the images have non-finite values")
    m = torch.from_numpy(key.matrix)
    out = torch.empty(x.shape[0], key.d, dtype=torch.float32)
    for i in range(0, x.shape[0], batch_size):
        flat = flatten_padded(x[i:i + batch_size].to(torch.float64), key.spec.pad)
        out[i:i + batch_size] = (flat @ m).to(torch.float32)
    return out


def unmorph(z: torch.Tensor, key_inverse: np.ndarray, key: MorphKey) -> torch.Tensor:
    """Images back from morphed samples with an inverse (the true one, or an attacker's)."""
    return unflatten((z.to(torch.float64) @ torch.from_numpy(np.asarray(key_inverse, np.float64)))
                     .to(torch.float32), key)


def write_morphed(path: PathLike, x: torch.Tensor, y: np.ndarray, key: MorphKey,
                  batch_size: int = 1024) -> Path:
    """What the provider ships: ``morphed`` (n, d) float32, ``labels`` and the key's
    ``fingerprint`` and image shape (never the key, its seed or the permutation), as .npz."""
    y = np.asarray(y)
    if len(y) != x.shape[0]:
        raise DataError(f"mple write_morphed: {x.shape[0]} images but {len(y)} labels")
    z = morph(x, key, batch_size).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = key.spec
    np.savez(path, morphed=z, labels=y, fingerprint=key.fingerprint,
             shape=np.array([s.channels, s.image_size, s.image_size, s.pad]))
    return path


def read_morphed(path: PathLike, key: Optional[MorphKey] = None):
    """(morphed (n, d) float32, labels, fingerprint) of a shipped file; with ``key``, refuses a
    file morphed with another key (fingerprints differ)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"morphed dataset {path} does not exist")
    with np.load(path) as f:
        missing = {"morphed", "labels", "fingerprint"} - set(f.files)
        if missing:
            raise DataError(f"morphed dataset {path} lacks {', '.join(sorted(missing))}")
        z, y, fp = f["morphed"], f["labels"], str(f["fingerprint"])
    if key is not None and fp != key.fingerprint:
        raise ConfigError(f"morphed dataset {path} was made with key {fp}, not {key.fingerprint}")
    return torch.from_numpy(z), y, fp


__all__ = ["flatten_padded", "interior", "morph", "read_morphed", "unflatten", "unmorph", "write_morphed"]
