"""Seeded, class-stratified splits grouped by lesion: no lesion in two splits."""
from __future__ import annotations

import numpy as np

from ..constants import CLASSES
from ..errors import DataError


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



def check_train_classes(labels: np.ndarray, split: np.ndarray, where: str) -> None:
    """DataError naming the first class without a training image (before any decoding)."""
    present = set(np.asarray(labels)[np.asarray(split) == "train"].tolist())
    for c, name in enumerate(CLASSES):
        if c not in present:
            raise DataError(f"class {name} has no training image after the split ({where})")


def split_by_site(labels: np.ndarray, lesion_ids: np.ndarray, sites: np.ndarray, held_out: str,
                  val_frac: float, seed: int) -> np.ndarray:
    """Leave one site out: every image of site ``held_out`` is "test"; the other sites' images
    are split into train and val by :func:`split_by_lesion` (``val_frac`` of their images).

    A lesion photographed at the held-out site and elsewhere goes to test with all its images
    (no lesion in two splits).
    """
    sites = np.asarray(sites).astype(str)
    known = sorted(set(sites.tolist()))
    if held_out not in known:
        raise DataError(f"split='site:{held_out}': unknown site; known: {', '.join(known)}")
    lesion_ids = np.asarray(lesion_ids).astype(str)
    test = np.isin(lesion_ids, np.unique(lesion_ids[sites == held_out]))
    out = np.full(len(sites), "test", dtype=object)
    rest = np.flatnonzero(~test)
    out[rest] = split_by_lesion(np.asarray(labels)[rest], lesion_ids[rest], val_frac, 0.0, seed)
    return out.astype(str)
