"""Writing files so that a crash never leaves a torn one: the one atomic-write helper.

Every file dpskin writes that another process may read (run records, checkpoints, decoded
image caches, feature caches) goes through :func:`write_atomic`: the bytes go to a temporary
file in the same folder, which is then renamed over the target (``os.replace`` is atomic on
POSIX), so a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` via a temporary sibling + rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    """Indented, key-sorted JSON, atomically (values JSON cannot hold become strings)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: PathLike, array: Any) -> None:
    """``np.save`` atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def save_torch(path: PathLike, obj: Any) -> None:
    """``torch.save`` atomically (the previous file survives a crash mid-save)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


__all__ = ["read_json", "save_npy", "save_torch", "write_atomic", "write_json"]
