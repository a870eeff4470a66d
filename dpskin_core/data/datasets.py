"""Datasets by name: the decoded, split :class:`DataBundle` a run trains on.

``isic2018`` (a folder in the official layout, :mod:`.layout`), ``synthetic`` (the embedded
generator, :mod:`.synth`, rendered once into the cache) and ``dermamnist`` (MedMNIST's npz).
Every check on the files runs before anything is decoded, and decoding (which finds corrupt
JPEGs) runs before any training: bad input fails early, naming the file or field. Decoded
images are cached as uint8 arrays (:mod:`.imagecache`), so later runs never decode again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from ..constants import CLASSES
from ..errors import DataError
from ..registry import Registry
from .imagecache import cache_root, decode_cached
from .layout import read_isic2018, read_sites, sha_groups
from .splits import check_train_classes, split_by_lesion, split_by_site


@dataclass(frozen=True)
class DataBundle:
    """Decoded, split data ready for training.

    Images are uint8 arrays of shape (N, S, S, 3) (HWC, RGB); labels int64 in [0, 7).
    ``meta`` has one row per image of every split with columns
    ``image, label, lesion_id, split`` (split in {"train", "val", "test"}), in the same
    order as the arrays of each split.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    meta: pd.DataFrame
    classes: tuple = CLASSES
    info: Dict[str, object] = field(default_factory=dict)


#: Dataset registry: name -> loader(spec: DataSpec) -> DataBundle
DATASETS: Registry = Registry("dataset")


@dataclass(frozen=True)
class DataSpec:
    """What to load. Mirrors the data fields of the run config."""

    dataset: str = "synthetic"          # registry name: "synthetic", "isic2018", "dermamnist"
    data_root: Optional[str] = None     # folder in the official layout (None: default location)
    image_size: int = 32                # side of the square images after centre crop + resize, px
    split: str = "lesion"               # "lesion" (seeded, grouped by lesion_id), "official", or
    #                                     "site:<site>" (that HAM10000 site is the test split)
    val_frac: float = 0.15
    test_frac: float = 0.15
    split_seed: int = 0
    cache_dir: Optional[str] = None     # where decoded uint8 arrays are cached
    synth_n: int = 1200                 # synthetic dataset: number of images


def load_data(spec: DataSpec) -> DataBundle:
    """Build the dataset named by ``spec.dataset`` from the registry and return it."""
    return DATASETS.get(spec.dataset)(spec)


def _bundle(x: np.ndarray, df: pd.DataFrame, split: np.ndarray, info: dict) -> DataBundle:
    """Cut decoded images ``x`` (rows of ``df``) into the three splits."""
    check_train_classes(df["label"].to_numpy(), split, f"{info.get('dataset')}, {info.get('root')}")
    df = df.assign(split=split)
    parts = {}
    for s in ("train", "val", "test"):
        idx = np.flatnonzero(df["split"].to_numpy() == s)
        parts[s] = (x[idx], df["label"].to_numpy()[idx].astype(np.int64), idx)
    order = np.concatenate([parts[s][2] for s in ("train", "val", "test")])
    meta = df.iloc[order][["image", "label", "lesion_id", "split"]].reset_index(drop=True)
    return DataBundle(parts["train"][0], parts["train"][1], parts["val"][0], parts["val"][1],
                      parts["test"][0], parts["test"][1], meta, CLASSES, info)


def load_official_layout(root: Path, spec: DataSpec, dataset: str) -> DataBundle:
    """Read, split, decode (cached) a folder in the official layout."""
    cache = cache_root(spec.cache_dir)
    train = read_isic2018(root, "Training")
    if spec.split == "official":
        try:
            val, test = read_isic2018(root, "Validation"), read_isic2018(root, "Test")
        except DataError as e:
            raise DataError(f"split='official' needs the official Validation and Test folders: {e}") from None
        df = pd.concat([train, val, test], ignore_index=True)
        split = np.array(["train"] * len(train) + ["val"] * len(val) + ["test"] * len(test))
    elif spec.split == "lesion":
        df = train
        split = split_by_lesion(df["label"].to_numpy(), sha_groups(root, df), spec.val_frac,
                                spec.test_frac, spec.split_seed)
    elif spec.split.startswith("site:"):
        df = train
        split = split_by_site(df["label"].to_numpy(), sha_groups(root, df),
                              read_sites(root, df["image"]), spec.split[len("site:"):],
                              spec.val_frac, spec.split_seed)
    else:
        raise DataError(f"split={spec.split!r}; expected 'lesion', 'official' or 'site:<site>'")
    check_train_classes(df["label"].to_numpy(), split, f"{dataset}, {root}")
    if not (isinstance(spec.image_size, int) and spec.image_size > 0):
        raise DataError(f"image_size={spec.image_size!r}: expected a positive int (px)")
    x, cache_file, seconds = decode_cached(df["path"].tolist(), spec.image_size, cache)
    info = {"dataset": dataset, "root": str(root), "split": spec.split, "split_seed": spec.split_seed,
            "image_size": spec.image_size, "cache_file": str(cache_file), "decode_seconds": seconds}
    return _bundle(x, df, split, info)


@DATASETS.register("isic2018")
def _isic2018(spec: DataSpec) -> DataBundle:
    root = spec.data_root or os.environ.get("DPSKIN_DATA_ROOT")
    if not root:
        raise DataError("dataset 'isic2018' needs data_root (or $DPSKIN_DATA_ROOT): a folder in the "
                        "official ISIC 2018 Task 3 layout; get one with `dpskin download isic2018 "
                        "--dest DIR` and point --data-root (data_root in the config) at DIR")
    return load_official_layout(Path(root), spec, "isic2018")


def generated_synthetic(name: str, n: int, size: int, seed: int,
                        cache_dir: Optional[str] = None) -> Path:
    """The folder ``<cache>/<name>`` holding ``n`` images of :func:`dpskin_core.synth.generate`
    (``size`` px, ``seed``) in the official layout, generated on the first call only.

    Written into a temporary sibling and renamed into place, so a reader sees all of it or
    nothing, an interrupted call leaves no folder marked complete, and of two concurrent calls the
    second finds the first's folder.
    """
    from .synth import generate

    root = cache_root(cache_dir) / name
    if not (root / ".complete").is_file():
        import shutil
        import tempfile

        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".synth-"))
        try:
            generate(tmp, n=n, size=size, seed=seed)
            (tmp / ".complete").write_text("ok\n")
            if root.exists() and not (root / ".complete").is_file():
                shutil.rmtree(root)  # half-written by an older, interrupted version
            try:
                os.replace(tmp, root)  # atomic: readers see all of it or nothing
            except OSError:
                if not (root / ".complete").is_file():  # not a concurrent run that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@DATASETS.register("synthetic")
def _synthetic(spec: DataSpec) -> DataBundle:
    """The embedded dataset: generated once into the cache (seed 0), then read like real data."""
    from .synth import GENERATOR_VERSION

    # rendered at 64 px (enough for the usual 32 px runs); larger runs get larger renders
    gen_size = max(64, int(spec.image_size))
    name = f"synthetic_n{spec.synth_n}_seed0_v{GENERATOR_VERSION}" + (
        f"_s{gen_size}" if gen_size != 64 else "")
    root = generated_synthetic(name, spec.synth_n, gen_size, 0, spec.cache_dir)
    return load_official_layout(root, spec, "synthetic")


# DermaMNIST's label order (MedMNIST INFO["dermamnist"]["label"]) -> our CLASSES order
_DERMAMNIST_ORDER = ("AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC")


@DATASETS.register("dermamnist")
def _dermamnist(spec: DataSpec) -> DataBundle:
    """MedMNIST's dermamnist.npz with its official splits (no lesion ids: one per image)."""
    if not spec.data_root:
        raise DataError("dataset 'dermamnist' needs data_root: dermamnist.npz or its folder "
                        "(`dpskin download dermamnist --dest DIR`)")
    path = Path(spec.data_root)
    path = path if path.suffix == ".npz" else path / "dermamnist.npz"
    if not path.is_file():
        raise DataError(f"DermaMNIST file not found: {path}")
    remap = np.array([CLASSES.index(c) for c in _DERMAMNIST_ORDER])
    try:
        z = np.load(path)
    except Exception as e:  # not an npz / truncated download
        raise DataError(f"{path}: cannot read as .npz ({e})") from None
    with z:
        xs, ys = [], []
        for s in ("train", "val", "test"):
            for k in (f"{s}_images", f"{s}_labels"):
                if k not in z.files:
                    raise DataError(f"{path}: missing array {k!r}")
            x, y = z[f"{s}_images"], z[f"{s}_labels"].reshape(-1)
            if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
                raise DataError(f"{path}: {s}_images has shape {x.shape}, expected (N, H, W, 3) "
                                f"matching {s}_labels ({len(y)})")
            if len(y) == 0 or y.min() < 0 or y.max() >= len(CLASSES):
                raise DataError(f"{path}: {s}_labels is empty or has values outside "
                                f"0..{len(CLASSES) - 1}")
            xs.append(_resize_array(x.astype(np.uint8), spec.image_size))
            ys.append(remap[y.astype(np.int64)])
    n = [len(y) for y in ys]
    df = pd.DataFrame({"image": [f"dermamnist_{i}" for i in range(sum(n))],
                       "label": np.concatenate(ys)})
    df["lesion_id"] = df["image"]
    split = np.repeat(["train", "val", "test"], n)
    return _bundle(np.concatenate(xs), df, split, {"dataset": "dermamnist", "root": str(path),
                                                   "split": "official", "image_size": spec.image_size,
                                                   "cache_file": None, "decode_seconds": 0.0})


def _resize_array(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1] == size and x.shape[2] == size:
        return x
    from .imagecache import crop_resize

    from PIL import Image

    return np.stack([crop_resize(Image.fromarray(im), size) for im in x])
