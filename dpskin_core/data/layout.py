"""Reading the official ISIC 2018 Task 3 layout, with every check on the files.

Folders, CSV columns, one-hot rows (an unknown class), duplicate ids and listed-but-missing
images are all checked before anything is decoded; each failure is a :class:`DataError`
naming the file or field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from ..constants import CLASSES
from ..errors import DataError

SUBSETS = ("Training", "Validation", "Test")


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



def sha_groups(root: Path, df: pd.DataFrame) -> np.ndarray:
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


#: the file of the acquisition site of each HAM10000 image (``image,site``)
SITES_CSV = "HAM10000_sites.csv"


def read_sites(root: os.PathLike, images: pd.Series) -> np.ndarray:
    """The acquisition site of each of ``images``, from ``<root>/HAM10000_sites.csv``;
    DataError naming the file when it is missing, malformed or lacks an image."""
    path = Path(root) / SITES_CSV
    if not path.is_file():
        raise DataError(f"{path}: not found; a site split needs the site of every image "
                        "(columns image,site)")
    sites = _read_csv(path, ("image", "site")).drop_duplicates("image").set_index("image")["site"]
    site = images.map(sites)
    missing = images[site.isna()]
    if len(missing):
        raise DataError(f"{path}: no site for {len(missing)} image(s), e.g. {missing.iloc[0]}")
    return site.astype(str).to_numpy()
