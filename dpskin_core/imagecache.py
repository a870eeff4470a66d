"""Decode JPEGs once per (files, size) into a cached uint8 array on disk.

Preprocessing is a centre square crop then a resize to ``size`` px (PIL, antialiased box
filter for downscaling: the HAM10000 lesions are roughly centred). The cache key hashes the
resolved paths, file sizes and modification times, the size and the preprocessing version,
so a changed file or a new size decodes again and anything else is read back with np.load.
The data folder itself is never written (it may be read-only).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError

PREPROCESS_VERSION = "centre-crop-box-v1"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """``cache_dir``, else ``$DPSKIN_CACHE``, else ``~/.cache/dpskin``."""
    return Path(cache_dir or os.environ.get("DPSKIN_CACHE") or Path.home() / ".cache" / "dpskin")


def crop_resize(im: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, resize to size x size, RGB uint8 (size, size, 3)."""
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.BOX if size < s else Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def decode(path: str, size: int) -> np.ndarray:
    """One image; a corrupt or unreadable file raises DataError naming it."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when possible
            return crop_resize(im, size)
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def cache_key(paths: List[str], size: int) -> str:
    h = hashlib.sha256(f"{PREPROCESS_VERSION}|{size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_cached(paths: List[str], size: int, cache_dir: Path) -> Tuple[np.ndarray, Path, float]:
    """(images (N, size, size, 3) uint8, cache file, seconds spent decoding (0 on a hit))."""
    file = Path(cache_dir) / f"images_{size}px_{cache_key(paths, size)}.npy"
    if file.is_file():
        return np.load(file), file, 0.0
    t0 = time.perf_counter()
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL frees the GIL
        for i, arr in enumerate(tqdm(pool.map(lambda p: decode(p, size), paths), total=len(paths),
                                     desc=f"decoding {len(paths)} images at {size}px",
                                     leave=False)):
            out[i] = arr
    seconds = time.perf_counter() - t0
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".images.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, out)
    os.replace(tmp, file)
    return out, file, seconds
