"""Constants of ISIC 2018 Task 3 shared by every module."""
from __future__ import annotations

from typing import Dict, Tuple

#: The 7 diagnostic classes, in the column order of the official ground-truth CSV.
CLASSES: Tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NUM_CLASSES: int = len(CLASSES)

#: HAM10000 class proportions (training set counts / 10,015), used by the synthetic generator.
HAM10000_COUNTS: Dict[str, int] = {
    "MEL": 1113, "NV": 6705, "BCC": 514, "AKIEC": 327, "BKL": 1099, "DF": 115, "VASC": 142,
}

#: Fixed normalisation constants. They are public (ImageNet statistics), never statistics of
#: the private training data, so normalising costs no privacy budget.
NORMALISATIONS: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
