"""Shared fixtures: a writer of tiny datasets in the official ISIC 2018 Task 3 layout."""
import os
from pathlib import Path
from typing import Dict, Union

import numpy as np
import pytest
from PIL import Image

from dpskin_core.constants import CLASSES

SHARED = Path(os.environ.get("DPSKIN_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared/data/isic2018_task3_200x150"))


def write_isic_layout(root: Path, per_class: Union[int, Dict[str, int], None] = None, *,
                      subset="Training", csv_in_subfolder=False, images_per_lesion=2,
                      size=(40, 30), seed=0, groupings=True, groupings_in_subfolder=False) -> Path:
    """Write random JPEGs + ground truth (+ lesion groupings) CSVs in the official layout.

    per_class: images per class (an int for all 7 classes, or {class: n}; default 6).
    csv_in_subfolder: put the CSVs in ``<name>/<name>.csv`` as the official zips unpack.
    images_per_lesion: consecutive images of a class share a lesion id (HAM_xxxxxxx).
    size: (width, height) of the JPEGs, px. seed: pixels and the image id prefix ISIC_<seed>.
    groupings: write ISIC2018_Task3_Training_LesionGroupings.csv (Training subset only), at the
    top (as the official single-CSV download) or, with groupings_in_subfolder, in a subfolder.
    """
    if per_class is None or isinstance(per_class, int):
        per_class = {c: 6 if per_class is None else per_class for c in CLASSES}
    rng = np.random.default_rng(seed)
    img_dir = root / f"ISIC2018_Task3_{subset}_Input"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_rows, grp_rows, k, lesion = [], [], 0, 0
    for cls, n in per_class.items():
        for i in range(n):
            if i % images_per_lesion == 0:
                lesion += 1
            name = f"ISIC_{seed:02d}{k:05d}"
            k += 1
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(img_dir / f"{name}.jpg", quality=90)
            gt_rows.append(f"{name}," + ",".join("1.0" if c == cls else "0.0" for c in CLASSES))
            grp_rows.append(f"{name},HAM_{lesion:07d},histo")
    gt_name = f"ISIC2018_Task3_{subset}_GroundTruth"
    gt_dir = root / gt_name if csv_in_subfolder else root
    gt_dir.mkdir(parents=True, exist_ok=True)
    (gt_dir / f"{gt_name}.csv").write_text("image," + ",".join(CLASSES) + "\n" + "\n".join(gt_rows) + "\n")
    if groupings and subset == "Training":
        grp_dir = root / "ISIC2018_Task3_Training_LesionGroupings" if groupings_in_subfolder else root
        grp_dir.mkdir(exist_ok=True)
        (grp_dir / "ISIC2018_Task3_Training_LesionGroupings.csv").write_text(
            "image,lesion_id,diagnosis_confirm_type\n" + "\n".join(grp_rows) + "\n")
    return root


@pytest.fixture
def isic_layout(tmp_path):
    """A callable writing an official-layout folder under tmp_path (see write_isic_layout)."""
    def make(name="isic", **kw):
        return write_isic_layout(tmp_path / name, **kw)
    return make


@pytest.fixture
def make_isic_layout(isic_layout):
    """Alias of :func:`isic_layout`."""
    return isic_layout


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "ISIC2018_Task3_Training_GroundTruth.csv").is_file():
        pytest.skip(f"real ISIC 2018 data not found at {SHARED} (set DPSKIN_SHARED_DATA)")
    return SHARED
