"""ISIC 2018 Task 3 data: the official layout, lesion-grouped splits, cached decoding.

Every check on the files (folders, CSV columns, one-hot rows, listed-but-missing images)
runs before anything is decoded, and decoding (which finds corrupt JPEGs) runs before any
training: bad input fails early, naming the file or field. Decoded images are cached as
uint8 arrays (see :mod:`dpskin_core.imagecache`), so later runs never decode again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from .constants import CLASSES
from .errors import DataError
from .imagecache import cache_root, decode_cached
from .registry import Registry

SUBSETS = ("Training", "Validation", "Test")


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
    split: str = "lesion"               # "lesion" (seeded, grouped by lesion_id) or "official"
    val_frac: float = 0.15
    test_frac: float = 0.15
    split_seed: int = 0
    cache_dir: Optional[str] = None     # where decoded uint8 arrays are cached
    synth_n: int = 1200                 # synthetic dataset: number of images


def load_data(spec: DataSpec) -> DataBundle:
    """Build the dataset named by ``spec.dataset`` from the registry and return it."""
    return DATASETS.get(spec.dataset)(spec)


# --------------------------------------------------------------------------- official layout
def _find_csv(root: Path, name: str) -> Optional[Path]:
    """``<root>/<name>.csv`` or, as the official zips unpack, ``<root>/<name>/<name>.csv``."""
    for p in (root / f"{name}.csv", root / name / f"{name}.csv"):
        if p.is_file():
            return p
    return None


def _read_csv(path: Path, required: tuple, exact: bool = False) -> pd.DataFrame:
    """Read a CSV with string image ids; DataError naming the file for missing (or, if
    ``exact``, extra) columns."""
    try:
        df = pd.read_csv(path, dtype={"image": str})
    except Exception as e:  # empty or unparsable file
        raise DataError(f"{path}: cannot read CSV ({e})") from None
    cols = [str(c) for c in df.columns]
    missing = [c for c in required if c not in cols]
    extra = [c for c in cols if c not in required] if exact else []
    if missing or extra:
        what = "; ".join(x for x in (
            f"missing column(s) {', '.join(missing)}" if missing else "",
            f"unexpected column(s) {', '.join(extra)} (unknown class?)" if extra else "") if x)
        raise DataError(f"{path}: {what}; expected columns {','.join(required)}, "
                        f"found {','.join(cols)}")
    return df


def read_isic2018(root: os.PathLike, subset: str = "Training") -> pd.DataFrame:
    """Read one subset of the official ISIC 2018 Task 3 layout (nothing is decoded).

    Returns columns ``image, label, lesion_id, path``. Raises :class:`DataError` naming the
    file or field for: a missing folder or CSV, wrong columns, a row that is not one-hot
    (no class or several: an unknown class), duplicate ids, listed images missing on disk.
    Lesion groups come from ``..._LesionGroupings.csv`` when present, else each image is its
    own lesion (the Validation/Test subsets have no groupings).
    """
    root = Path(root)
    if subset not in SUBSETS:
        raise DataError(f"subset={subset!r}; expected one of {', '.join(SUBSETS)}")
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    img_dir = root / f"ISIC2018_Task3_{subset}_Input"
    if not img_dir.is_dir():
        raise DataError(f"{root}: no image folder {img_dir.name}/ (official ISIC 2018 Task 3 layout)")
    gt_name = f"ISIC2018_Task3_{subset}_GroundTruth"
    gt_path = _find_csv(root, gt_name)
    if gt_path is None:
        raise DataError(f"{root}: ground truth {gt_name}.csv not found (at the top or in {gt_name}/)")
    gt = _read_csv(gt_path, ("image",) + CLASSES, exact=True)
    if gt.empty:
        raise DataError(f"{gt_path}: no rows")
    if gt["image"].isna().any():
        raise DataError(f"{gt_path}: empty image id in line(s) "
                        f"{', '.join(str(i + 2) for i in np.flatnonzero(gt['image'].isna())[:5])}")
    onehot = gt[list(CLASSES)].apply(pd.to_numeric, errors="coerce")
    bad = onehot.isna().any(axis=1)
    if bad.any():
        raise DataError(f"{gt_path}: non-numeric class value in row(s) of image(s) "
                        f"{', '.join(gt.loc[bad, 'image'].head(5))}")
    vals = onehot.to_numpy()
    is_onehot = np.isin(vals, (0.0, 1.0)).all(axis=1) & (vals.sum(axis=1) == 1)
    if not is_onehot.all():
        raise DataError(f"{gt_path}: unknown class for image(s) "
                        f"{', '.join(gt.loc[~is_onehot, 'image'].head(5))}: each row must be "
                        f"one-hot, exactly one of {', '.join(CLASSES)} equal to 1")
    dup = gt["image"].duplicated()
    if dup.any():
        raise DataError(f"{gt_path}: duplicate image id(s) {', '.join(gt.loc[dup, 'image'].head(5))}")
    df = pd.DataFrame({"image": gt["image"].astype(str), "label": vals.argmax(axis=1).astype(np.int64)})
    groups_path = _find_csv(root, f"ISIC2018_Task3_{subset}_LesionGroupings")
    if groups_path is not None:
        groups = _read_csv(groups_path, ("image", "lesion_id"))
        dup = groups["image"].duplicated()
        if dup.any():  # a merge would silently duplicate rows
            raise DataError(f"{groups_path}: duplicate image id(s) "
                            f"{', '.join(groups.loc[dup, 'image'].head(5))}")
        df = df.merge(groups[["image", "lesion_id"]], on="image", how="left")
        missing = df["lesion_id"].isna()
        if missing.any():
            raise DataError(f"{groups_path}: no lesion_id for image(s) "
                            f"{', '.join(df.loc[missing, 'image'].head(5))}")
        df["lesion_id"] = df["lesion_id"].astype(str)
    else:
        df["lesion_id"] = df["image"]
    df["path"] = [str(img_dir / f"{i}.jpg") for i in df["image"]]
    absent = [p for p in df["path"] if not os.path.isfile(p)]
    if absent:
        raise DataError(f"{len(absent)} image(s) listed in {gt_path} are missing from "
                        f"{img_dir}: {', '.join(Path(a).name for a in absent[:5])}"
                        f"{' ...' if len(absent) > 5 else ''}")
    return df


# --------------------------------------------------------------------------- splitting
def split_by_lesion(labels: np.ndarray, lesion_ids: np.ndarray, val_frac: float,
                    test_frac: float, seed: int) -> np.ndarray:
    """Seeded split names ("train"/"val"/"test") per image, grouped and class-stratified.

    A lesion never straddles two splits. Within each class (a lesion's class is its majority
    label, ties to the lower index) the lesions are shuffled, then assigned to test and val
    in turn while the split's image count stays within half a lesion of its fraction of the
    class's *images*; the rest go to train. With >= 3 lesions in a class, every split with
    a non-zero fraction receives at least one; train always keeps at least one.
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(f"val_frac={val_frac}, test_frac={test_frac}: need both >= 0 "
                        f"and val_frac + test_frac < 1")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"negative label {labels.min()}")
    names, inverse = np.unique(np.asarray(lesion_ids).astype(str), return_inverse=True)
    if len(labels) != len(inverse):
        raise DataError(f"{len(labels)} labels but {len(inverse)} lesion ids")
    # per lesion: image count and per-class counts -> majority class
    per_class = np.zeros((len(names), int(labels.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(per_class, (inverse, labels), 1)
    sizes, cls_of = per_class.sum(axis=1), per_class.argmax(axis=1)
    rng = np.random.default_rng(seed)
    out = np.full(len(names), "train", dtype=object)
    for cls in np.unique(cls_of):  # sorted: the rng stream is deterministic
        members = np.flatnonzero(cls_of == cls)  # sorted by lesion name
        members = members[rng.permutation(len(members))]
        counts, total, i = sizes[members], sizes[members].sum(), 0
        plan = [(name, frac) for name, frac in (("test", test_frac), ("val", val_frac)) if frac > 0]
        for k, (split, frac) in enumerate(plan):
            target, taken = frac * total, 0
            # lesions that must stay for the later splits and train (>= 3 lesions), else for train
            keep = (len(plan) - k) if len(members) >= 3 else 1
            while i < len(members) - keep:
                force = taken == 0 and len(members) >= 3
                if not force and taken + counts[i] / 2 > target:
                    break
                out[members[i]] = split
                taken += counts[i]
                i += 1
    return out[inverse].astype(str)


def _sha_groups(root: Path, df: pd.DataFrame) -> np.ndarray:
    """Split groups: lesion ids, merged (union-find) across byte-identical files.

    ``HAM10000_metadata_extra.csv``, when present, lists each JPEG's sha256. Images with the
    same hash go to the same split even if their lesion ids differ, so an identical file can
    never sit in train and test at once. (In HAM10000 the two identical pairs
    ISIC_0024366 = ISIC_0029861 and ISIC_0024777 = ISIC_0029938 already share a lesion id;
    the merge is a safeguard.)
    """
    groups = df["lesion_id"].astype(str).to_numpy()
    extra = root / "HAM10000_metadata_extra.csv"
    if not extra.is_file():
        return groups
    sha = pd.read_csv(extra, dtype=str)
    if not {"image", "sha256"} <= set(sha.columns):  # optional metadata without hashes
        return groups
    sha = sha.drop_duplicates("image")
    hashes = df[["image"]].merge(sha[["image", "sha256"]], on="image", how="left")["sha256"]
    parent: Dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    first: Dict[str, str] = {}
    for g, h in zip(groups, hashes):
        if isinstance(h, str) and h:
            a, b = find(first.setdefault(h, g)), find(g)
            if a != b:
                parent[max(a, b)] = min(a, b)  # deterministic representative
    return np.array([find(g) for g in groups])


def _check_train_classes(labels: np.ndarray, split: np.ndarray, where: str) -> None:
    """DataError naming the first class without a training image (before any decoding)."""
    present = set(np.asarray(labels)[np.asarray(split) == "train"].tolist())
    for c, name in enumerate(CLASSES):
        if c not in present:
            raise DataError(f"class {name} has no training image after the split ({where})")


def _bundle(x: np.ndarray, df: pd.DataFrame, split: np.ndarray, info: dict) -> DataBundle:
    """Cut decoded images ``x`` (rows of ``df``) into the three splits."""
    _check_train_classes(df["label"].to_numpy(), split, f"{info.get('dataset')}, {info.get('root')}")
    df = df.assign(split=split)
    parts = {}
    for s in ("train", "val", "test"):
        idx = np.flatnonzero(df["split"].to_numpy() == s)
        parts[s] = (x[idx], df["label"].to_numpy()[idx].astype(np.int64), idx)
    order = np.concatenate([parts[s][2] for s in ("train", "val", "test")])
    meta = df.iloc[order][["image", "label", "lesion_id", "split"]].reset_index(drop=True)
    info = dict(info, counts={s: np.bincount(parts[s][1], minlength=len(CLASSES)).tolist()
                              for s in parts})
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
        split = split_by_lesion(df["label"].to_numpy(), _sha_groups(root, df), spec.val_frac,
                                spec.test_frac, spec.split_seed)
    else:
        raise DataError(f"split={spec.split!r}; expected 'lesion' or 'official'")
    _check_train_classes(df["label"].to_numpy(), split, f"{dataset}, {root}")
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


def class_counts(bundle: DataBundle) -> pd.DataFrame:
    """Images per split (rows) and class (columns), with totals."""
    t = pd.crosstab(bundle.meta["split"], bundle.meta["label"].map(dict(enumerate(CLASSES))))
    t = t.reindex(index=["train", "val", "test"], columns=list(CLASSES), fill_value=0)
    t["total"] = t.sum(axis=1)
    return t
