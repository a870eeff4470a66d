"""MpLe (dpskin_core.mple): keys, morphing, the augmented layer's parity, the known-plaintext
attack, and the refusals of bad input. Small images (8 px: d = 3 x 10 x 10 = 300) keep the
d x d algebra fast; the scheme is the same at 32 px (d = 3468)."""
import numpy as np
import pytest
import torch
from torch import nn

from dpskin_core.errors import ConfigError, DataError, UnknownNameError
from dpskin_core.mple import KeySpec, build_mple, make_key, morph, parity_model, read_morphed, write_morphed
from dpskin_core.mple.attacks import known_plaintext
from dpskin_core.mple.keys import key_from_matrix
from dpskin_core.mple.layer import AugmentedConv, split_first_conv, unroll_conv
from dpskin_core.training.backbones import build_backbone


@pytest.fixture(scope="module")
def key():
    return make_key(KeySpec(8, seed=11))


def test_key_is_seeded_and_recorded(key):
    again = make_key(KeySpec(8, seed=11))
    assert key.fingerprint == again.fingerprint and np.array_equal(key.matrix, again.matrix)
    assert make_key(KeySpec(8, seed=12)).fingerprint != key.fingerprint
    assert key.matrix.shape == (300, 300) and 1 < key.condition < 1e7
    assert np.allclose(key.matrix @ key.inverse, np.eye(300), atol=1e-6)
    block = make_key(KeySpec(8, kind="block", blocks=3, seed=1))
    b = block.matrix[:100, :100]
    assert np.array_equal(block.matrix, np.kron(np.eye(3), b))
    assert block.condition == pytest.approx(np.linalg.cond(block.matrix), rel=1e-6)


@pytest.mark.parametrize("kind, blocks", [("dense", 1), ("block", 3)])
def test_augmented_layer_computes_the_plain_network(kind, blocks):
    """z C_ac = x C_r P: the MpLe network on morphed inputs gives the plain logits."""
    torch.manual_seed(0)
    k = make_key(KeySpec(8, kind=kind, blocks=blocks, seed=5))
    model = build_backbone("smallcnn_fast", num_classes=7).eval()
    x = torch.randn(16, 3, 8, 8)
    z = morph(x, k)
    with torch.no_grad():
        plain, ours = model(x), parity_model(model, k, perm_seed=3).eval()(z)
    assert (plain - ours).abs().max() < 2e-3, (plain - ours).abs().max()
    # the first layer's features come out with their channels permuted by the secret P
    conv, _ = split_first_conv(model)
    net, perm = build_mple(model, k, perm_seed=3)
    with torch.no_grad():
        feats = net.augmented(z)
        assert torch.allclose(feats, conv(x)[:, torch.as_tensor(perm)], atol=2e-3)
    assert not np.array_equal(perm, np.arange(len(perm)))
    # the morphed samples are not the images
    assert z.shape == (16, 300) and not torch.allclose(z[:, :192], x.reshape(16, -1), atol=0.5)


def test_unrolled_conv_is_the_conv(key):
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cr = unroll_conv(conv, key)
    flat = nn.functional.pad(x, (1, 1, 1, 1)).reshape(2, -1)
    got = (flat @ cr).reshape(2, 4, 8, 8)
    assert torch.allclose(got, nn.functional.conv2d(x, conv.weight.double(), padding=1), atol=1e-10)


def test_known_plaintext_recovers_the_key_from_enough_pairs(key):
    torch.manual_seed(1)
    xs = torch.randn(260, 3, 8, 8)
    zs = morph(xs, key)
    full = known_plaintext(xs[:200], zs[:200], xs[200:], zs[200:], key)  # 200 >= 3 x 8 x 8 = 192
    few = known_plaintext(xs[:60], zs[:60], xs[200:], zs[200:], key)
    ridge = known_plaintext(xs[:60], zs[:60], xs[200:], zs[200:], key, ridge=1.0)
    assert full["unknown_rows"] == 192 and full["key_rel_error"] < 1e-3 and full["psnr_db"] > 60
    assert few["key_rel_error"] > 0.3 and few["psnr_db"] < 30
    assert np.isfinite(ridge["psnr_db"])


def test_the_shipped_dataset_holds_no_key(tmp_path, key):
    x = torch.randn(5, 3, 8, 8)
    path = write_morphed(tmp_path / "ship" / "train.npz", x, np.arange(5), key)
    with np.load(path) as f:
        assert set(f.files) == {"morphed", "labels", "fingerprint", "shape"}
    z, y, fp = read_morphed(path, key)
    assert torch.allclose(z, morph(x, key)) and list(y) == list(range(5)) and fp == key.fingerprint
    with pytest.raises(ConfigError, match="was made with key"):
        read_morphed(path, make_key(KeySpec(8, seed=99)))
    with pytest.raises(DataError, match="does not exist"):
        read_morphed(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="5 images but 4 labels"):
        write_morphed(tmp_path / "bad.npz", x, np.arange(4), key)


def test_bad_keys_images_and_layers_are_refused(key):
    spec = KeySpec(8)
    with pytest.raises(ConfigError, match=r"shape \(299, 299\).*need \(300, 300\)"):
        key_from_matrix(spec, np.eye(299))
    with pytest.raises(ConfigError, match="singular or ill-conditioned"):
        key_from_matrix(spec, np.zeros((300, 300)))
    bad = np.eye(300)
    bad[0, 0] = 1e-9  # condition number 1e9
    with pytest.raises(ConfigError, match="condition number 1e"):
        key_from_matrix(spec, bad)
    with pytest.raises(ConfigError, match="non-finite"):
        key_from_matrix(spec, np.full((300, 300), np.nan))
    with pytest.raises(UnknownNameError, match="unknown mple key kind 'diagonal'"):
        KeySpec(8, kind="diagonal")
    with pytest.raises(ConfigError, match="blocks=7 does not divide d=300"):
        KeySpec(8, kind="block", blocks=7)
    with pytest.raises(ConfigError, match=r"\(4, 3, 16, 16\) do not fit the mple key"):
        morph(torch.zeros(4, 3, 16, 16), key)
    with pytest.raises(DataError, match="non-finite"):
        morph(torch.full((1, 3, 8, 8), float("inf")), key)
    for conv, what in ((nn.Conv2d(1, 8, 3, padding=1), "in_channels 1"),
                       (nn.Conv2d(3, 8, 3, padding=0), "padding"),
                       (nn.Conv2d(3, 8, 3, padding=1, groups=1, dilation=2), "dilation")):
        with pytest.raises(ConfigError, match=what):
            AugmentedConv.from_conv(conv, key, np.arange(8))
    with pytest.raises(ConfigError, match="permutation must reorder the 8"):
        AugmentedConv.from_conv(nn.Conv2d(3, 8, 3, padding=1), key, np.arange(7))
    with pytest.raises(ConfigError, match=r"takes \(n, 300\)"):
        build_mple(build_backbone("smallcnn_fast", num_classes=7), key, 0)[0](torch.zeros(2, 301))
    with pytest.raises(ConfigError, match="only networks whose input meets features.0"):
        split_first_conv(build_backbone("resnet18", num_classes=7))
    # a head that reads the input image would read MpLe's conv output instead: refused
    with pytest.raises(ConfigError, match="reads the colour statistics of its input image"):
        split_first_conv(build_backbone("smallcnn_stats", num_classes=7))


def test_vgg16s_first_layer_is_split_off():
    conv, rest = split_first_conv(build_backbone("vgg16", num_classes=7))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 64, (3, 3))
    assert isinstance(rest.features[0], nn.Identity)


def test_the_model_gives_away_the_key_and_the_permutation():
    """The service provider's C_ac and a known C_r recover P (leverage scores) and M^-1 (least
    squares), and with them every image; a wrong C_r guess does not."""
    from dpskin_core.mple.attacks import from_model, psnr
    from dpskin_core.mple.morph import unmorph

    torch.manual_seed(0)
    k = make_key(KeySpec(8, seed=4))
    model = build_backbone("smallcnn_fast", num_classes=7)
    net, perm = build_mple(model, k, perm_seed=9)
    conv, _ = split_first_conv(model)
    got = from_model(net.augmented, conv, k)
    assert np.array_equal(got["perm"], perm) and got["gap"] > 0
    x = torch.randn(10, 3, 8, 8)
    back = unmorph(morph(x, k), got["m_inv"], k)
    assert psnr(x, back, float(x.max() - x.min())).min() > 60
    wrong = from_model(net.augmented, nn.Conv2d(3, conv.out_channels, 3, padding=1, bias=False), k)
    assert psnr(x, unmorph(morph(x, k), wrong["m_inv"], k), float(x.max() - x.min())).mean() < 30


def test_ssim_and_the_second_order_attack():
    """SSIM is 1 on equal images and low on noise; the ciphertext-only attack matches the
    morphed rows' first two moments to the public images' (which is all it can do)."""
    from dpskin_core.mple.attacks import second_order, ssim

    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12)
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    assert ssim(x, torch.rand(4, 3, 12, 12)).max() < 0.3
    with pytest.raises(ConfigError, match="ssim: images of shapes"):
        ssim(x, x[:, :2])
    k = make_key(KeySpec(4, seed=2))                       # d = 3 x 6 x 6 = 108, 48 pixels
    base = torch.randn(48, 3) @ torch.randn(3, 48)         # images on a 3-d subspace + noise
    xs = (torch.randn(3000, 48) @ base / 4 + 0.1 * torch.randn(3000, 48)).reshape(-1, 3, 4, 4)
    guess = second_order(morph(xs, k), xs, k)
    assert guess.shape == xs.shape
    flat, gflat = xs.reshape(len(xs), -1).double(), guess.reshape(len(xs), -1).double()
    assert torch.allclose(gflat.mean(0), flat.mean(0), atol=1e-4)
    cov, gcov = torch.cov(flat.T), torch.cov(gflat.T)
    assert (gcov - cov).abs().max() < 1e-3 * cov.abs().max()


def test_given_rows_need_a_model_factory(tmp_path):
    from dpskin_core.training import RunConfig, run

    cfg = RunConfig(features="given", epochs=1, synth_n=60, image_size=16, batch_size=8, progress=False)
    with pytest.raises(ConfigError, match="features='given'.*model_factory missing"):
        run(cfg, tmp_path)
    with pytest.raises(ConfigError, match="features='pixels'.*model_factory given"):
        run(cfg.replace(features="pixels"), tmp_path, model_factory=lambda: nn.Linear(2, 7))


@pytest.mark.parametrize("dp", [False, True])
def test_training_on_morphed_data_through_run(tmp_path, monkeypatch, dp):
    """The provider ships morphed rows (no key in them; the secret in a private folder), the
    service provider trains the rest behind the frozen C_ac through ``run`` (DP-SGD too), the
    released model's membership inference is recorded, and a finished run is read back
    without building the key again."""
    from dpskin_core.mple import train as mt
    from dpskin_core.training import RunConfig

    cfg = RunConfig(features="given", backbone="smallcnn_fast", epochs=1, synth_n=120,
                    image_size=8, batch_size=16, optimizer="adam", lr=1e-3, progress=False,
                    augment_flips=False, augment_rot90=False, dp=dp,
                    target_epsilon=8.0 if dp else None, delta=1e-3, recipe="mple/test")
    spec = mt.MpleSpec("block", 3)
    got = mt.train(cfg, spec, tmp_path)
    root = mt.mple_root(spec, tmp_path)
    assert got.result.run_dir.parent == root and got.result.meta["status"] == "complete"
    assert (got.result.epsilon is not None) == dp and 0 <= got.membership["auc"] <= 1
    assert (root / "private" / "secret.json").is_file() and got.key["d"] == 300
    shipped = sorted((root / "shipped").rglob("*.npz"))
    assert [p.name for p in shipped] == ["test.npz", "train.npz", "val.npz"]
    for p in shipped:
        with np.load(p) as f:
            assert set(f.files) == {"morphed", "labels", "fingerprint", "shape"}
    # the trained rest: only it has weights in the checkpoint (C_ac is the provider's)
    ck = torch.load(got.result.run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert not any("weight" in k and v.numel() > 10**5 for k, v in ck["model"].items())
    monkeypatch.setattr(mt, "make_key", lambda *a, **k: pytest.fail("the key was built again"))
    again = mt.train(cfg, spec, tmp_path)
    assert again.result.reused and again.membership == got.membership
    with pytest.raises(ConfigError, match="features='given'"):
        mt.provide(cfg.replace(features="pixels"), spec, None, root)
    with pytest.raises(ConfigError, match="kind 'dense' takes blocks=1"):
        mt.MpleSpec("dense", 2)


def test_the_membership_game_attacks_the_released_predictor(tmp_path, monkeypatch):
    """A DP MpLe run that keeps part of its noisy prior (``la_tau_kept``) is attacked through
    its released predictor: the game sees the logits of the same network as the run that keeps
    none (seeded noise: the same training) plus exactly the shift the run recorded."""
    from dpskin_core.mple import train as mt
    from dpskin_core.training import RunConfig
    from dpskin_core.training.records import prediction_shift

    seen = []
    real_game = mt.loss_threshold_game

    def game(lm, ym, lo, yo):
        seen.append((lm, lo))
        return real_game(lm, ym, lo, yo)

    monkeypatch.setattr(mt, "loss_threshold_game", game)
    cfg = RunConfig(features="given", backbone="smallcnn_fast", epochs=1, synth_n=120,
                    image_size=8, batch_size=16, optimizer="sgd", lr=0.5, progress=False,
                    augment_flips=False, augment_rot90=False, dp=True, target_epsilon=8.0,
                    delta=1e-3, dp_noise="seeded", logit_adjust=True, recipe="mple/test")
    spec = mt.MpleSpec("block", 3)
    plain = mt.train(cfg, spec, tmp_path)
    kept = mt.train(cfg.replace(la_tau_kept=0.5), spec, tmp_path)
    shift = prediction_shift(kept.result.meta)
    assert shift is not None and prediction_shift(plain.result.meta) is None
    (lm0, lo0), (lm1, lo1) = seen
    np.testing.assert_allclose(lm1 - lm0, np.broadcast_to(shift, lm0.shape), atol=1e-5)
    np.testing.assert_allclose(lo1 - lo0, np.broadcast_to(shift, lo0.shape), atol=1e-5)
    assert kept.membership != plain.membership


def test_the_cost_rows_count_what_they_say():
    from dpskin_core.mple.evaluate import cost

    k = make_key(KeySpec(8, seed=1))
    torch.manual_seed(0)
    x8 = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(x8).permute(0, 3, 1, 2).float() / 255
    rows = {r["quantity"]: r for r in cost(build_backbone("smallcnn_fast", num_classes=7), k, x, x8,
                                           batch=16, repeats=1)}
    assert rows["first layer: parameters"]["plain"] == 32 * 3 * 9
    assert rows["first layer: parameters"]["mple"] == 300 * 32 * 8 * 8
    assert rows["bytes shipped (uint8 vs float32 morphed)"]["ratio"] == pytest.approx(4 * 300 / 192)
    assert all(r["mple"] > 0 for r in rows.values())


def test_vgg16_trains_behind_its_augmented_layer(tmp_path):
    """MpLe's own network: VGG-16 (GroupNorm) split at features.0, the rest trained on the
    feature maps of a 64-channel C_ac (one epoch on a few 32 px images)."""
    from dpskin_core.mple import train as mt
    from dpskin_core.training import RunConfig

    cfg = RunConfig(features="given", backbone="vgg16", epochs=1, synth_n=60, image_size=32,
                    batch_size=16, optimizer="adam", lr=1e-4, progress=False, val_frac=0.2,
                    test_frac=0.2, augment_flips=False, augment_rot90=False)
    got = mt.train(cfg, mt.MpleSpec("block", 12), tmp_path)
    assert got.result.meta["status"] == "complete" and got.key["d"] == 3468
    assert 0 <= got.result.final_metrics["balanced_accuracy"] <= 1
