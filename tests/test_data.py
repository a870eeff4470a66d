"""Data loading: official layout, bad input, lesion-grouped split, decode cache, DermaMNIST."""
import hashlib
import os
import stat

import numpy as np
import pandas as pd
import pytest

from dpskin_core.data import imagecache
from dpskin_core.constants import CLASSES, HAM10000_COUNTS
from dpskin_core.data import DataSpec, load_data, read_isic2018, split_by_lesion
from dpskin_core.data.layout import sha_groups
from dpskin_core.errors import DataError, UnknownNameError

GT = "ISIC2018_Task3_Training_GroundTruth.csv"
GROUPS = "ISIC2018_Task3_Training_LesionGroupings.csv"
INPUT = "ISIC2018_Task3_Training_Input"


def spec(root, tmp_path, **kw):
    kw = {"image_size": 16, **kw}
    return DataSpec(dataset="isic2018", data_root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def _boom(*a, **k):
    raise AssertionError("decoded an image")


def test_loads_official_layout(isic_layout, tmp_path):
    root = isic_layout()
    b = load_data(spec(root, tmp_path))
    assert len(b.y_train) + len(b.y_val) + len(b.y_test) == 42
    assert b.x_train.shape[1:] == (16, 16, 3) and b.x_train.dtype == np.uint8
    assert b.y_train.dtype == np.int64
    assert list(b.meta.columns) == ["image", "label", "lesion_id", "split"]
    for s, y in (("train", b.y_train), ("val", b.y_val), ("test", b.y_test)):
        assert (b.meta[b.meta.split == s].label.to_numpy() == y).all()
    assert np.bincount(b.y_train, minlength=len(CLASSES)).min() >= 1  # every class trains
    # the bundle's info (recorded in every run's meta.json) holds no statistic of a split
    assert "counts" not in b.info
    assert os.path.isfile(b.info["cache_file"]) and b.info["decode_seconds"] > 0


def test_decoded_pixels_are_centre_crop(isic_layout, tmp_path):
    root = isic_layout(per_class=1, size=(48, 16))
    df = read_isic2018(root)
    b = load_data(spec(root, tmp_path, image_size=16, val_frac=0.0, test_frac=0.0))
    from PIL import Image
    full = np.asarray(Image.open(df.path[0]).convert("RGB"))
    i = b.meta.index[b.meta.image == df.image[0]][0]
    assert np.array_equal(b.x_train[i], full[:, 16:32])  # 16x16 centre of a 48x16 image


def test_csvs_in_official_subfolders(isic_layout):
    root = isic_layout(csv_in_subfolder=True, groupings_in_subfolder=True, images_per_lesion=3)
    assert not (root / GT).exists() and not (root / GROUPS).exists()
    df = read_isic2018(root)
    assert len(df) == 42 and df.lesion_id.nunique() == 14  # groupings were found
    assert list(df.columns) == ["image", "label", "lesion_id", "path"]


def test_no_groupings_means_one_lesion_per_image(isic_layout):
    df = read_isic2018(isic_layout(groupings=False))
    assert (df.lesion_id == df.image).all()


def _rewrite(name, fn):
    def breakage(root):
        p = root / name
        p.write_text(fn(p.read_text()))
    return breakage


def _set_row(k, values):
    """Replace the class values of data row k of the ground truth."""
    def fn(text):
        lines = text.splitlines()
        lines[k + 1] = lines[k + 1].split(",")[0] + "," + ",".join(values)
        return "\n".join(lines) + "\n"
    return fn


def _dup_first_row(text):
    lines = text.splitlines()
    return "\n".join(lines + [lines[1]]) + "\n"


@pytest.mark.parametrize("breakage,file,match", [
    (lambda r: (r / GT).unlink(), "ISIC2018_Task3_Training_GroundTruth", "not found"),
    (_rewrite(GT, lambda t: t.replace("image,MEL", "img,MEL", 1)), GT, "missing column.*image"),
    (_rewrite(GT, lambda t: t.replace(",VASC", ",SCC", 1)), GT, "missing column.*VASC.*unexpected column.*SCC"),
    (_rewrite(GT, lambda t: t.replace(",VASC", ",VASC,SCC", 1)), GT, "unexpected column.*SCC"),
    (_rewrite(GT, _set_row(2, ["0.0"] * 7)), GT, "unknown class for image.*ISIC_0000002"),
    (_rewrite(GT, _set_row(3, ["1.0", "1.0"] + ["0.0"] * 5)), GT, "unknown class for image.*ISIC_0000003"),
    (_rewrite(GT, _set_row(4, ["abc"] + ["0.0"] * 6)), GT, "non-numeric.*ISIC_0000004"),
    (_rewrite(GT, _dup_first_row), GT, "duplicate image id.*ISIC_0000000"),
    (_rewrite(GT, lambda t: t.split("\n")[0] + "\n"), GT, "no rows"),
    (lambda r: (r / INPUT / "ISIC_0000005.jpg").unlink(), GT, "missing.*ISIC_0000005.jpg"),
    (_rewrite(GROUPS, lambda t: t.replace("lesion_id", "lesion", 1)), GROUPS, "missing column.*lesion_id"),
    (_rewrite(GROUPS, _dup_first_row), GROUPS, "duplicate image id.*ISIC_0000000"),
    (_rewrite(GROUPS, lambda t: "\n".join(t.splitlines()[:-1]) + "\n"), GROUPS, "no lesion_id for image"),
])
def test_bad_input_names_file_and_field(isic_layout, tmp_path, monkeypatch, breakage, file, match):
    root = isic_layout()
    breakage(root)
    monkeypatch.setattr(imagecache, "decode", _boom)  # every check runs before decoding
    with pytest.raises(DataError, match=match) as e:
        read_isic2018(root)
    assert file in str(e.value)
    with pytest.raises(DataError, match=match):
        load_data(spec(root, tmp_path))


def test_missing_images_listed_up_to_five(isic_layout):
    root = isic_layout()
    for k in range(7):
        (root / INPUT / f"ISIC_00{k:05d}.jpg").unlink()
    with pytest.raises(DataError, match="^7 image") as e:
        read_isic2018(root)
    msg = str(e.value)
    assert "ISIC_0000004.jpg" in msg and "ISIC_0000005.jpg" not in msg and msg.endswith("...")


def test_missing_folders_and_names(tmp_path):
    with pytest.raises(DataError, match="not found.*nowhere"):
        read_isic2018(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=INPUT):
        read_isic2018(tmp_path / "empty")
    with pytest.raises(DataError, match="subset"):
        read_isic2018(tmp_path / "empty", "Train")


def test_isic2018_needs_a_root(monkeypatch):
    monkeypatch.delenv("DPSKIN_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="data_root.*dpskin download isic2018"):
        load_data(DataSpec(dataset="isic2018"))
    with pytest.raises(UnknownNameError, match="dataset.*dermamnist.*isic2018.*synthetic"):
        load_data(DataSpec(dataset="imagenet"))


def test_data_root_from_env(isic_layout, tmp_path, monkeypatch):
    monkeypatch.setenv("DPSKIN_DATA_ROOT", str(isic_layout()))
    b = load_data(DataSpec(dataset="isic2018", image_size=8, cache_dir=str(tmp_path / "c")))
    assert len(b.meta) == 42


def test_corrupt_image_named_when_loading(isic_layout, tmp_path):
    root = isic_layout()
    bad = root / INPUT / "ISIC_0000003.jpg"
    bad.write_bytes(b"not a jpeg")
    assert len(read_isic2018(root)) == 42  # reading the CSVs does not decode
    with pytest.raises(DataError, match="cannot decode image.*ISIC_0000003.jpg"):
        load_data(spec(root, tmp_path))
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-cached


def test_empty_class_after_split_fails_before_decoding(isic_layout, tmp_path, monkeypatch):
    root = isic_layout(per_class={**{c: 6 for c in CLASSES}, "DF": 0})
    monkeypatch.setattr(imagecache, "decode", _boom)
    with pytest.raises(DataError, match="class DF has no training image after the split"):
        load_data(spec(root, tmp_path))


def _toy_split_data():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(600), rng.integers(1, 5, 600))
    labels = (groups % 7 == 0).astype(int) + (groups % 11 == 0) * 2  # 3 imbalanced classes
    return labels, np.array([f"L{g}" for g in groups])


def test_split_grouped_stratified_deterministic():
    labels, groups = _toy_split_data()
    a = split_by_lesion(labels, groups, 0.15, 0.2, seed=1)
    assert set(a) == {"train", "val", "test"}
    assert (a == split_by_lesion(labels, groups, 0.15, 0.2, seed=1)).all()
    assert (a != split_by_lesion(labels, groups, 0.15, 0.2, seed=2)).any()
    # the order of the input rows does not matter
    perm = np.random.default_rng(5).permutation(len(labels))
    assert (split_by_lesion(labels[perm], groups[perm], 0.15, 0.2, seed=1) == a[perm]).all()
    df = pd.DataFrame({"g": groups, "s": a, "y": labels})
    assert df.groupby("g")["s"].nunique().max() == 1  # no lesion in two splits
    for c in range(3):
        fr = df[df.y == c].s.value_counts(normalize=True)
        assert abs(fr["test"] - 0.2) < 0.05 and abs(fr["val"] - 0.15) < 0.05, (c, fr)


def test_split_small_classes():
    # class 1: 3 lesions -> one per split; class 2: 2 lesions -> none in val/test at 15 %;
    # class 3: 1 lesion -> train
    labels = np.array([0] * 100 + [1] * 3 + [2] * 2 + [3])
    groups = np.array([f"a{i}" for i in range(100)] + ["b0", "b1", "b2", "c0", "c1", "d0"])
    for seed in range(5):
        s = split_by_lesion(labels, groups, 0.15, 0.15, seed)
        assert sorted(s[100:103]) == ["test", "train", "val"]
        assert list(s[103:]) == ["train"] * 3
    # a lesion's class is its majority label: a lesion with 2 MEL + 1 NV images is one MEL unit
    s = split_by_lesion(np.array([0, 0, 1, 1, 1]), np.array(["x", "x", "x", "y", "z"]), 0.3, 0.3, 0)
    assert len(set(s[:3])) == 1
    with pytest.raises(DataError, match="val_frac"):
        split_by_lesion(labels, groups, 0.6, 0.5, 0)


def test_identical_files_share_a_split_group(isic_layout, tmp_path):
    root = isic_layout(images_per_lesion=1)
    df = read_isic2018(root)
    sha = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in df.path]
    sha[10] = sha[3]  # pretend ISIC_0000010 is a byte copy of ISIC_0000003 (another lesion)
    sha[20] = sha[10]  # ... and ISIC_0000020 of both
    pd.DataFrame({"image": df.image, "sha256": sha}).to_csv(root / "HAM10000_metadata_extra.csv",
                                                            index=False)
    g = sha_groups(root, df)
    assert g[3] == g[10] == g[20] and len(set(g)) == 40
    for seed in range(4):
        b = load_data(spec(root, tmp_path, split_seed=seed))
        by_image = b.meta.set_index("image").split
        assert by_image["ISIC_0000003"] == by_image["ISIC_0000010"] == by_image["ISIC_0000020"]


def test_decode_cache_hit_and_readonly_root(isic_layout, tmp_path, monkeypatch):
    root = isic_layout()
    first = load_data(spec(root, tmp_path))
    before = sorted(p.name for p in root.rglob("*"))
    os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)  # read-only data folder
    try:
        monkeypatch.setattr(imagecache, "decode", _boom)
        second = load_data(spec(root, tmp_path))
        assert np.array_equal(first.x_train, second.x_train)
        assert second.info["decode_seconds"] == 0.0
        assert second.info["cache_file"] == first.info["cache_file"]
        monkeypatch.undo()
        # another size is another cache entry (decoded), and the data folder stays untouched
        third = load_data(spec(root, tmp_path, image_size=8))
    finally:
        os.chmod(root, stat.S_IRWXU)
    assert third.x_train.shape[1:] == (8, 8, 3) and third.info["cache_file"] != first.info["cache_file"]
    assert sorted(p.name for p in root.rglob("*")) == before
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp left


def test_changed_file_invalidates_cache(isic_layout, tmp_path):
    root = isic_layout()
    first = load_data(spec(root, tmp_path))
    p = root / INPUT / "ISIC_0000000.jpg"
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_data(spec(root, tmp_path))
    assert second.info["cache_file"] != first.info["cache_file"] and second.info["decode_seconds"] > 0


def test_official_split(isic_layout, tmp_path):
    root = isic_layout()
    with pytest.raises(DataError, match="Validation"):
        load_data(spec(root, tmp_path, split="official"))
    for sub, seed in (("Validation", 1), ("Test", 2)):
        isic_layout(subset=sub, per_class=2, seed=seed, csv_in_subfolder=seed == 2)
    b = load_data(spec(root, tmp_path, split="official"))
    assert (len(b.y_train), len(b.y_val), len(b.y_test)) == (42, 14, 14)
    assert b.meta[b.meta.split == "val"].image.str.startswith("ISIC_01").all()
    assert (b.meta.lesion_id[b.meta.split == "test"] == b.meta.image[b.meta.split == "test"]).all()
    with pytest.raises(DataError, match="split='bogus'"):
        load_data(spec(root, tmp_path, split="bogus"))


def test_leave_one_site_out_split(isic_layout, tmp_path):
    root = isic_layout(per_class=12)  # 84 images, lesions of 2 consecutive images
    gt = pd.read_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv")
    with pytest.raises(DataError, match="HAM10000_sites.csv: not found"):
        load_data(spec(root, tmp_path, split="site:A"))
    # sites A, B, C in turn by lesion; the last lesion was photographed at C and at A
    site = np.array(["ABC"[(i // 2) % 3] for i in range(len(gt))])
    assert site[-2] == "C"
    site[-1] = "A"
    pd.DataFrame({"image": gt["image"], "site": site}).to_csv(root / "HAM10000_sites.csv", index=False)
    b = load_data(spec(root, tmp_path, split="site:A"))
    m = b.meta.set_index("image")
    test_lesions = set(m.lesion_id[m.split == "test"])
    at_a = set(gt["image"][site == "A"])
    assert at_a <= set(m.index[m.split == "test"])  # the whole site is the test split
    assert test_lesions == set(m.lesion_id[list(at_a)])  # ... with the lesions photographed there
    assert m.split[gt["image"].iloc[-2]] == "test"       # (its image from site C too)
    assert not test_lesions & set(m.lesion_id[m.split != "test"])
    assert (m.split == "val").any() and (m.split == "train").any()
    assert b.info["split"] == "site:A"
    with pytest.raises(DataError, match="unknown site; known: A, B, C"):
        load_data(spec(root, tmp_path, split="site:Z"))
    pd.DataFrame({"image": gt["image"][:-3], "site": site[:-3]}).to_csv(root / "HAM10000_sites.csv", index=False)
    with pytest.raises(DataError, match="no site for 3 image"):
        load_data(spec(root, tmp_path, split="site:A"))


def test_site_split_in_the_config():
    from dpskin_core.errors import ConfigError
    from dpskin_core.training import RunConfig

    cfg = RunConfig(split="site:rosendahl")
    assert "test_frac" in cfg.inactive_fields()  # the held-out site is the test split
    for bad in ("site:", "bogus"):
        with pytest.raises(ConfigError, match="split"):
            RunConfig(split=bad)


def _dermamnist(path, **over):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 21), ("val", 7), ("test", 7)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 7).reshape(-1, 1)
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_dermamnist_npz(tmp_path):
    arrays = _dermamnist(tmp_path / "dermamnist.npz")
    b = load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path), image_size=32))
    assert b.x_train.shape == (21, 32, 32, 3) and (len(b.y_val), len(b.y_test)) == (7, 7)
    # DermaMNIST order: akiec, bcc, bkl, df, mel, nv, vasc
    expected = ["AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"]
    assert [CLASSES[y] for y in b.y_train[:7]] == expected
    same = load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path / "dermamnist.npz"),
                              image_size=28))
    assert np.array_equal(same.x_test, arrays["test_images"])  # no resize at 28 px


@pytest.mark.parametrize("over,match", [
    ({"val_labels": None}, "val_labels"),
    ({"test_labels": np.full((7, 1), 7)}, "test_labels"),
    ({"train_images": np.zeros((21, 28, 28), np.uint8)}, "train_images"),
    ({"val_images": np.zeros((6, 28, 28, 3), np.uint8)}, "val_images"),
])
def test_dermamnist_bad_npz(tmp_path, over, match):
    _dermamnist(tmp_path / "bad.npz", **over)
    with pytest.raises(DataError, match=match):
        load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path / "bad.npz")))
    with pytest.raises(DataError, match="not found"):
        load_data(DataSpec(dataset="dermamnist", data_root=str(tmp_path / "nothing")))


def test_synthetic_dataset_is_cached_and_readable(tmp_path, monkeypatch):
    s = DataSpec(synth_n=150, image_size=16, cache_dir=str(tmp_path))
    b = load_data(s)
    assert b.info["dataset"] == "synthetic" and len(b.meta) == 150
    assert b.meta.groupby("lesion_id").split.nunique().max() == 1
    assert (tmp_path / "synthetic_n150_seed0_v1" / ".complete").is_file()
    from dpskin_core.data import synth
    monkeypatch.setattr(synth, "generate", _boom)  # generated once,
    monkeypatch.setattr(imagecache, "decode", _boom)  # decoded once
    again = load_data(s)
    assert np.array_equal(again.x_test, b.x_test)
    assert not (load_data(DataSpec(synth_n=150, image_size=16, cache_dir=str(tmp_path), split_seed=1))
                .meta.split.to_numpy() == b.meta.split.to_numpy()).all()


def test_generated_synthetic_replaces_a_half_written_folder_and_reuses_a_complete_one(
        tmp_path, monkeypatch):
    from dpskin_core.data import synth
    from dpskin_core.data import generated_synthetic

    half = tmp_path / "pool"
    half.mkdir()
    (half / "stale.jpg").write_bytes(b"torn")  # an interrupted generation: no .complete
    root = generated_synthetic("pool", 40, 16, seed=3, cache_dir=str(tmp_path))
    assert root == half and (root / ".complete").is_file() and not (root / "stale.jpg").exists()
    assert len(list((root / "ISIC2018_Task3_Training_Input").glob("*.jpg"))) == 40
    assert not list(tmp_path.glob(".synth-*"))  # no temporary folder left behind
    monkeypatch.setattr(synth, "generate", _boom)  # complete: never generated again
    assert generated_synthetic("pool", 40, 16, seed=3, cache_dir=str(tmp_path)) == root


def test_real_data_csvs_and_split(shared_data):
    df = read_isic2018(shared_data)
    counts = df.label.map(dict(enumerate(CLASSES))).value_counts().to_dict()
    assert len(df) == 10015 and counts == HAM10000_COUNTS
    assert counts == {"NV": 6705, "MEL": 1113, "BKL": 1099, "BCC": 514, "AKIEC": 327,
                      "VASC": 142, "DF": 115}
    lesion = df.set_index("image").lesion_id
    # the two byte-identical pairs of HAM10000 are already the same lesion
    assert lesion["ISIC_0024366"] == lesion["ISIC_0029861"]
    assert lesion["ISIC_0024777"] == lesion["ISIC_0029938"]
    groups = sha_groups(shared_data, df)
    split = split_by_lesion(df.label.to_numpy(), groups, 0.15, 0.15, 0)
    frame = df.assign(split=split)
    assert frame.groupby("lesion_id").split.nunique().max() == 1
    by_image = frame.set_index("image").split
    for a, b in (("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938")):
        assert by_image[a] == by_image[b]
    table = pd.crosstab(frame.label, frame.split, normalize="index")
    assert ((table["test"] - 0.15).abs() < 0.04).all() and ((table["val"] - 0.15).abs() < 0.04).all()


@pytest.mark.slow
def test_real_data_full_decode(shared_data, tmp_path):
    """Decode all 10,015 JPEGs once at 32 px (~10 s on 2 cores)."""
    b = load_data(DataSpec(dataset="isic2018", data_root=str(shared_data), image_size=32,
                           cache_dir=str(tmp_path)))
    assert len(b.meta) == 10015 and b.x_train.shape[1:] == (32, 32, 3)
    x = np.concatenate([b.x_train, b.x_val, b.x_test])
    row = {im: i for i, im in enumerate(b.meta.image)}
    assert np.array_equal(x[row["ISIC_0024366"]], x[row["ISIC_0029861"]])
    assert 40 < x.mean() < 220  # real pictures, not blank
