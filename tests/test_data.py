"""Data loading: official layout, bad input, lesion-grouped split, decode cache, DermaMNIST."""
import os
import stat

import numpy as np
import pandas as pd
import pytest

from dpskin_core import imagecache
from dpskin_core.constants import CLASSES
from dpskin_core.data import DataSpec, class_counts, load_data, read_isic2018, split_by_lesion
from dpskin_core.errors import DataError, UnknownNameError

GT = "ISIC2018_Task3_Training_GroundTruth.csv"


def spec(root, tmp_path, **kw):
    return DataSpec(dataset="isic2018", data_root=str(root), image_size=16,
                    cache_dir=str(tmp_path / "cache"), **kw)


def test_loads_official_layout(isic_layout, tmp_path):
    root = isic_layout()
    b = load_data(spec(root, tmp_path))
    n = len(b.y_train) + len(b.y_val) + len(b.y_test)
    assert n == 42 and b.x_train.shape[1:] == (16, 16, 3) and b.x_train.dtype == np.uint8
    assert list(b.meta.columns) == ["image", "label", "lesion_id", "split"]
    assert (b.meta[b.meta.split == "train"].label.to_numpy() == b.y_train).all()
    assert class_counts(b).loc["train", list(CLASSES)].min() >= 1


def test_csv_in_official_subfolder(isic_layout):
    root = isic_layout(csv_in_subfolder=True)
    assert len(read_isic2018(root)) == 42


def _rewrite(root, fn):
    p = root / GT
    p.write_text(fn(p.read_text()))


@pytest.mark.parametrize("breakage,match", [
    (lambda r: (r / GT).unlink(), "GroundTruth.csv not found"),
    (lambda r: _rewrite(r, lambda t: t.replace("image,MEL", "img,MEL", 1)), "missing column"),
    (lambda r: _rewrite(r, lambda t: t.replace(",VASC", ",VASC,SCC", 1)), "SCC"),
    (lambda r: _rewrite(r, lambda t: t.replace("1.0", "0.0", 1)), "exactly one known class"),
    (lambda r: _rewrite(r, lambda t: t.replace("0.0", "abc", 1)), "non-numeric"),
    (lambda r: next((r / "ISIC2018_Task3_Training_Input").glob("*.jpg")).unlink(), "missing"),
    (lambda r: (r / "ISIC2018_Task3_Training_LesionGroupings.csv").write_text("image,lesion\n"), "lesion_id"),
])
def test_bad_input_names_file_or_field(isic_layout, breakage, match):
    root = isic_layout()
    breakage(root)
    with pytest.raises(DataError, match=match):
        read_isic2018(root)


def test_missing_folders(tmp_path, isic_layout):
    with pytest.raises(DataError, match="not found"):
        read_isic2018(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="ISIC2018_Task3_Training_Input"):
        read_isic2018(tmp_path / "empty")
    with pytest.raises(DataError, match="data_root"):
        load_data(DataSpec(dataset="isic2018"))  # no root given
    with pytest.raises(UnknownNameError, match="dataset"):
        load_data(DataSpec(dataset="imagenet"))


def test_corrupt_image_named(isic_layout, tmp_path):
    root = isic_layout()
    bad = sorted((root / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[3]
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=bad.name):
        load_data(spec(root, tmp_path))


def test_empty_class_after_split(isic_layout, tmp_path):
    root = isic_layout(per_class={**{c: 6 for c in CLASSES}, "DF": 0})
    with pytest.raises(DataError, match="class DF has no training image"):
        load_data(spec(root, tmp_path))


def test_split_grouped_stratified_deterministic():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(400), rng.integers(1, 4, 400))
    labels = (groups % 7 == 0).astype(int) + (groups % 11 == 0) * 2  # 3 imbalanced classes
    a = split_by_lesion(labels, groups, 0.15, 0.15, seed=1)
    assert (a == split_by_lesion(labels, groups, 0.15, 0.15, seed=1)).all()
    assert (a != split_by_lesion(labels, groups, 0.15, 0.15, seed=2)).any()
    df = pd.DataFrame({"g": groups, "s": a, "y": labels})
    assert df.groupby("g")["s"].nunique().max() == 1  # no lesion in two splits
    for c in range(3):
        frac = (df[df.y == c].s == "test").mean()
        assert 0.08 < frac < 0.25, (c, frac)
        assert set(df[df.y == c].s) == {"train", "val", "test"}


def test_decode_cache_hit_and_readonly_root(isic_layout, tmp_path, monkeypatch):
    root = isic_layout()
    first = load_data(spec(root, tmp_path))
    os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)  # read-only data folder
    try:
        def boom(*a, **k):
            raise AssertionError("decoded again")
        monkeypatch.setattr(imagecache, "decode", boom)
        second = load_data(spec(root, tmp_path))
    finally:
        os.chmod(root, stat.S_IRWXU)
    assert np.array_equal(first.x_train, second.x_train)
    assert second.info["decode_seconds"] == 0.0
    assert not list(root.glob("*.npy"))


def test_official_split(isic_layout, tmp_path):
    root = isic_layout()
    with pytest.raises(DataError, match="Validation"):
        load_data(spec(root, tmp_path, split="official"))
    for sub, seed in (("Validation", 1), ("Test", 2)):
        isic_layout(subset=sub, per_class={c: 2 for c in CLASSES}, seed=seed)
    b = load_data(spec(root, tmp_path, split="official"))
    assert (len(b.y_train), len(b.y_val), len(b.y_test)) == (42, 14, 14)


def test_dermamnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 21), ("val", 7), ("test", 7)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 7).reshape(-1, 1)
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    b = load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path), image_size=32))
    assert b.x_train.shape == (21, 32, 32, 3)
    # DermaMNIST label 0 is akiec, 4 is mel
    assert b.y_train[0] == CLASSES.index("AKIEC") and b.y_train[4] == CLASSES.index("MEL")
    del arrays["val_labels"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match="val_labels"):
        load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path / "bad.npz")))


def test_synthetic_dataset_is_cached_and_readable(tmp_path):
    s = DataSpec(synth_n=150, image_size=16, cache_dir=str(tmp_path))
    b = load_data(s)
    assert b.info["dataset"] == "synthetic" and len(b.meta) == 150
    assert b.meta.groupby("lesion_id").split.nunique().max() == 1
    assert np.array_equal(load_data(s).x_test, b.x_test)


def test_real_data(shared_data, tmp_path):
    df = read_isic2018(shared_data)
    counts = df.label.map(dict(enumerate(CLASSES))).value_counts().to_dict()
    assert len(df) == 10015
    assert counts == {"NV": 6705, "MEL": 1113, "BKL": 1099, "BCC": 514, "AKIEC": 327, "VASC": 142, "DF": 115}
    from dpskin_core.data import _sha_groups

    groups = _sha_groups(shared_data, df)
    split = split_by_lesion(df.label.to_numpy(), groups, 0.15, 0.15, 0)
    frame = df.assign(split=split)
    assert frame.groupby("lesion_id").split.nunique().max() == 1
    by_image = frame.set_index("image").split
    for a, b in (("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938")):
        assert by_image[a] == by_image[b]  # byte-identical files never straddle splits
