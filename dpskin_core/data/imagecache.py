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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import save_npy

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
    """Hash of the preprocessing version, ``size`` and every file's resolved path, size and
    mtime (ns): a changed, added or reordered file gives a new key."""
    h = hashlib.sha256(f"{PREPROCESS_VERSION}|{size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from None
        h.update(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_all(paths: List[str], size: int, workers: int = 2) -> np.ndarray:
    """Decode ``paths`` into (N, size, size, 3) uint8 with a tqdm bar; DataError names a bad file."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    # threads: PIL releases the GIL while decoding/resizing; 2 workers match the CI's 2 cores
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        it = pool.map(lambda p: decode(p, size), paths)
        for i, arr in enumerate(tqdm(it, total=len(paths), leave=False,
                                     desc=f"decoding {len(paths)} images at {size}px")):
            out[i] = arr
    return out


def decode_cached(paths: List[str], size: int, cache_dir: Path) -> Tuple[np.ndarray, Path, float]:
    """(images (N, size, size, 3) uint8, cache file, seconds spent decoding (0 on a hit)).

    The cache file is written atomically (:func:`dpskin_core.files.save_npy`) under
    ``cache_dir``, never next to the images. An unreadable or wrongly shaped cache file is decoded again.
    """
    file = Path(cache_dir) / f"images_{size}px_{cache_key(paths, size)}.npy"
    if file.is_file():
        try:
            x = np.load(file)
            if x.shape == (len(paths), size, size, 3) and x.dtype == np.uint8:
                return x, file, 0.0
        except (OSError, ValueError):
            pass  # truncated by a crash outside our atomic write: rebuild it
    t0 = time.perf_counter()
    out = decode_all(paths, size)
    seconds = time.perf_counter() - t0
    try:
        save_npy(file, out)
    except OSError as e:
        raise DataError(f"cannot write the image cache in {file.parent} ({e}); set cache_dir "
                        f"or $DPSKIN_CACHE to a writable folder") from None
    return out, file, seconds
