"""The data layer: ISIC 2018 Task 3 in its official layout, lesion-grouped splits, the decoded
image cache, the embedded synthetic lesion generator and the download command.

    from dpskin_core.data import DataSpec, load_data
    bundle = load_data(DataSpec(dataset="isic2018", data_root="...", image_size=32))

Nothing here imports the training, attack or book layers.
"""
from __future__ import annotations

from .datasets import (DATASETS, DataBundle, DataSpec, generated_synthetic, load_data,
                       load_official_layout)
from .layout import SUBSETS, read_isic2018
from .splits import split_by_lesion

__all__ = ["DATASETS", "DataBundle", "DataSpec", "SUBSETS", "generated_synthetic",
           "load_data", "load_official_layout", "read_isic2018", "split_by_lesion"]
