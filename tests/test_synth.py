"""The synthetic dataset: official ISIC 2018 Task 3 layout, HAM10000 proportions, determinism."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dpskin_core.constants import CLASSES, HAM10000_COUNTS
from dpskin_core.data.synth import CONFIRM_TYPES, allocate, generate

GT = "ISIC2018_Task3_Training_GroundTruth.csv"
GROUPS = "ISIC2018_Task3_Training_LesionGroupings.csv"
INPUT = "ISIC2018_Task3_Training_Input"


def _pixels(root: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / INPUT).glob("*.jpg"))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert generate(out, 150, 24, seed=3) == out
    return out


def test_official_layout_and_headers(synth):
    assert (synth / GT).read_text().splitlines()[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    assert (synth / GROUPS).read_text().splitlines()[0] == "image,lesion_id,diagnosis_confirm_type"
    gt, grp = pd.read_csv(synth / GT), pd.read_csv(synth / GROUPS)
    assert len(gt) == len(grp) == 150
    assert list(gt.image) == list(grp.image) == sorted(gt.image)
    assert all(re.fullmatch(r"ISIC_\d{7}", i) for i in gt.image)
    assert all(re.fullmatch(r"HAM_\d{7}", i) for i in grp.lesion_id)
    assert set(grp.diagnosis_confirm_type) <= set(CONFIRM_TYPES)
    files = sorted(p.name for p in (synth / INPUT).iterdir())
    assert files == sorted(f"{i}.jpg" for i in gt.image)
    readme = (synth / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "seed=3" in readme and "n=150" in readme


def test_one_hot_rows(synth):
    lines = (synth / GT).read_text().splitlines()[1:]
    for line in lines:
        values = line.split(",")[1:]
        assert sorted(values) == ["0.0"] * 6 + ["1.0"], line
    gt = pd.read_csv(synth / GT)
    assert (gt[list(CLASSES)].sum(axis=1) == 1.0).all()


def test_images_decode_at_requested_square_size(synth):
    for p in list((synth / INPUT).glob("*.jpg"))[:20]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (24, 24)


def test_rectangular_size_like_real_data(tmp_path):
    generate(tmp_path, 25, (200, 150), seed=1, images_per_lesion=(1, 1))
    for p in (tmp_path / INPUT).glob("*.jpg"):
        with Image.open(p) as im:
            assert im.size == (200, 150)  # PIL: (width, height)
        assert np.asarray(Image.open(p)).shape == (150, 200, 3)


def test_each_class_has_three_lesions_and_groups_are_consistent(synth):
    df = pd.read_csv(synth / GT).merge(pd.read_csv(synth / GROUPS), on="image")
    df["label"] = df[list(CLASSES)].values.argmax(1)
    assert (df.groupby("label").lesion_id.nunique().reindex(range(7), fill_value=0) >= 3).all()
    assert (df.groupby("lesion_id").label.nunique() == 1).all()       # one diagnosis per lesion
    assert (df.groupby("lesion_id").diagnosis_confirm_type.nunique() == 1).all()
    sizes = df.lesion_id.value_counts()
    assert sizes.max() > 1 and sizes.max() <= 4 and sizes.min() >= 1   # images_per_lesion=(1, 4)
    # views of one lesion are different images of the same lesion
    lesion = sizes.index[0]
    names = df.image[df.lesion_id == lesion].tolist()
    a, b = (np.asarray(Image.open(synth / INPUT / f"{n}.jpg"), np.int16) for n in names[:2])
    assert np.abs(a - b).mean() > 1.0


@pytest.mark.parametrize("n,ipl", [(100, (1, 4)), (21, (1, 1)), (1000, (2, 5)), (10015, (1, 4)), (100, (2, 2)), (300, (3, 4))])
def test_allocate_min_lesions_and_sizes(n, ipl):
    lesions = allocate(n, ipl, np.random.default_rng(0))
    assert sum(k for _, k in lesions) == n
    assert all(ipl[0] <= k <= ipl[1] for _, k in lesions)
    per_class = np.bincount([c for c, _ in lesions], minlength=7)
    assert (per_class >= 3).all()


def test_class_proportions_match_ham10000_for_1000():
    lesions = allocate(1000, (1, 4), np.random.default_rng(0))
    counts = np.bincount([c for c, _ in lesions], weights=[k for _, k in lesions], minlength=7)
    ham = np.array([HAM10000_COUNTS[c] for c in CLASSES], float)
    np.testing.assert_allclose(counts / 1000, ham / ham.sum(), atol=0.0025)
    assert counts[CLASSES.index("NV")] == max(counts)


def test_csv_counts_follow_allocation(synth):
    gt = pd.read_csv(synth / GT)
    counts = gt[list(CLASSES)].sum().to_numpy()
    ham = np.array([HAM10000_COUNTS[c] for c in CLASSES], float)
    assert counts.sum() == 150 and counts.min() >= 3
    assert np.argmax(counts) == CLASSES.index("NV")
    np.testing.assert_allclose(counts[:5] / 150, (ham / ham.sum())[:5], atol=0.02)


def test_too_small_n_and_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="n=20"):
        generate(tmp_path, 20, 16)
    with pytest.raises(ValueError, match="n=40"):
        generate(tmp_path, 40, 16, images_per_lesion=(2, 3))  # 7 classes x 3 lesions x 2 images
    with pytest.raises(ValueError, match="images_per_lesion"):
        generate(tmp_path, 100, 16, images_per_lesion=(3, 2))
    with pytest.raises(ValueError, match="cannot split"):
        generate(tmp_path, 101, 16, images_per_lesion=(2, 2))  # odd n: impossible
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path, 100, 4)


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a, b, c = (generate(tmp_path / name, 40, 16, seed=s)
               for name, s in (("a", 7), ("b", 7), ("c", 8)))
    for csv in (GT, GROUPS):
        assert (a / csv).read_bytes() == (b / csv).read_bytes()
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert (a / GT).read_bytes() != (c / GT).read_bytes() or (a / GROUPS).read_bytes() != (c / GROUPS).read_bytes()
    assert any(not np.array_equal(pa[k], pc[k]) for k in pa.keys() & pc.keys())


def test_artefacts_can_be_switched_off(tmp_path):
    # same seed: identical lesions and lighting; only hair/ruler pixels may differ
    on = _pixels(generate(tmp_path / "on", 60, 32, seed=2))
    off = _pixels(generate(tmp_path / "off", 60, 32, seed=2, hair=False, ruler=False))
    diff = [np.abs(on[k].astype(int) - off[k].astype(int)).max() for k in on]
    assert 0 < sum(d > 40 for d in diff) < len(diff)  # some images had artefacts, not all
