"""Random translation of training images (``augment_translate``): what it computes, where the
recipes use it, and the values it rejects."""
from __future__ import annotations

import math

import pytest
import torch

from dpskin_core.errors import ConfigError
from dpskin_core.training.augment import augment, translate_batch
from dpskin_core.training.config import RunConfig
from dpskin_core.training.records import config_hash


def _offsets(out: torch.Tensor, x: torch.Tensor, t: int) -> list:
    """For each image, the (dy, dx) window of the reflect-padded input it equals (None: none)."""
    padded = torch.nn.functional.pad(x, (t, t, t, t), mode="reflect")
    h, w = x.shape[2:]
    found = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * t + 1) for dx in range(2 * t + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        found.append(hits[0] if hits else None)
    return found


def test_each_image_is_a_reflected_window_shifted_by_its_own_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 9, 7, generator=g)
    out = translate_batch(x, 3, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.is_contiguous()
    offsets = _offsets(out, x, 3)
    assert None not in offsets
    # per-image draws spread over the whole range of offsets, the centre (no shift) among them
    assert len(set(offsets)) > 20
    assert {dy for dy, _ in offsets} == set(range(7)) and {dx for _, dx in offsets} == set(range(7))


def test_translation_is_reproducible_from_its_generator_and_off_at_zero():
    x = torch.rand(16, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(5), flips=False, rot90=False, translate=2)
    b = augment(x, torch.Generator().manual_seed(5), flips=False, rot90=False, translate=2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # translate=0 draws nothing: the other options' draws are those of the code without it
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment(x, g1, color=0.2, translate=0), augment(x, g2, color=0.2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_a_shift_as_large_as_the_image_is_rejected_naming_the_field():
    with pytest.raises(ConfigError, match="augment_translate=8"):
        translate_batch(torch.rand(2, 3, 8, 8), 8, None)
    for bad in (32, 40):
        with pytest.raises(ConfigError, match="augment_translate"):
            RunConfig(image_size=32, augment_translate=bad)
    for bad in (-1, 1.5, True, float("nan")):
        with pytest.raises(ConfigError, match="augment_translate"):
            RunConfig(augment_translate=bad)
    assert RunConfig(image_size=32, augment_translate=31).augment_translate == 31


def test_the_recipes_shift_references_and_dp_runs_by_their_own_parameters_only():
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    q = Params(**{**fields, "augment_translate": 4, "dp_augment_translate": 2})
    assert RECIPES.get("nonprivate-adam").config(q, seed=0).augment_translate == 4
    assert RECIPES.get("loso-adam").configs(q, seeds=[0])[0].augment_translate == 4
    assert RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0).augment_translate == 2
    assert RECIPES.get("dp-adam").config(q, target_epsilon=8.0, seed=0).augment_translate == 2
    # the attacked models and MpLe's runs see their images unshifted, as measured
    for name in ("attack/nonprivate", "attack/nonprivate-no-augmentation", "attack/dp-sgd", "attack/dp-adam",
                 "mple/plain-no-augmentation", "mple/dp-sgd"):
        assert RECIPES.get(name).configs(q, n_train=5000)[0].augment_translate == 0, name
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ConfigError, match="dp_augment_translate"):
            Params(**{**fields, "dp_augment_translate": bad})


def test_the_references_own_weight_decay_and_imbalance_remedy():
    """weight_decay and reference_la_tau reach the non-private references only; a logit-adjusted
    reference trains by the exact-count prior in place of the class weights."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    base = RECIPES.get("nonprivate-adam").config(p, seed=0)
    assert (base.weight_decay, base.logit_adjust, base.class_weights) == (0.0, False, "balanced")
    q = Params(**{**fields, "weight_decay": 5e-4, "reference_la_tau": 1.0})
    for name in ("nonprivate-adam", "nonprivate-sgd"):
        c = RECIPES.get(name).config(q, seed=0)
        got = (c.weight_decay, c.logit_adjust, c.la_tau, c.class_weights)
        assert got == (5e-4, True, 1.0, "none"), name
    assert RECIPES.get("loso-adam").configs(q, seeds=[0])[0].logit_adjust
    dp = RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0)
    assert dp.weight_decay == 0.0 and dp.la_tau == p.dp_la_tau
    for name, bad in (("weight_decay", -1e-4), ("reference_la_tau", float("nan")),
                      ("weight_decay", "0.1")):
        with pytest.raises(ConfigError, match=name):
            Params(**{**fields, name: bad})


def test_the_references_own_weight_average():
    """reference_ema reaches the non-private references only (the DP recipes keep dp_ema); off
    by default, so the references' run ids are those recorded before the field existed."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    assert RECIPES.get("nonprivate-adam").config(p, seed=0).ema_decay is None
    q = Params(**{**fields, "reference_ema": 0.995})
    for name in ("nonprivate-adam", "nonprivate-sgd"):
        assert RECIPES.get(name).config(q, seed=0).ema_decay == 0.995, name
    assert RECIPES.get("loso-adam").configs(q, seeds=[0])[0].ema_decay == 0.995
    assert RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0).ema_decay == p.dp_ema
    for bad in (1.0, 0.0, -0.5, float("nan"), "0.99"):
        with pytest.raises(ConfigError, match="reference_ema"):
            Params(**{**fields, "reference_ema": bad})


def test_the_references_own_colour_constancy():
    """reference_colour_constancy reaches the non-private references only (the DP recipes keep
    the plain images); "none" by default; an unknown name raises naming the field."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    assert RECIPES.get("nonprivate-adam").config(p, seed=0).colour_constancy == "none"
    q = Params(**{**fields, "reference_colour_constancy": "shades-of-gray"})
    for name in ("nonprivate-adam", "nonprivate-sgd"):
        assert RECIPES.get(name).config(q, seed=0).colour_constancy == "shades-of-gray", name
    assert RECIPES.get("loso-adam").configs(q, seeds=[0])[0].colour_constancy == "shades-of-gray"
    assert RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0).colour_constancy == "none"
    for bad in ("sog", "", None):
        with pytest.raises(ConfigError, match="reference_colour_constancy"):
            Params(**{**fields, "reference_colour_constancy": bad})


def test_mixup_blends_each_image_with_its_partner():
    from dpskin_core.training.augment import mix_batch

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out, perm, lam = mix_batch(x, "mixup", 0.4, torch.Generator().manual_seed(1))
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(16))
    assert torch.allclose(out, lam * x + (1 - lam) * x[perm])
    again = mix_batch(x, "mixup", 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out) and again[2] == lam  # one generator: the same draws


def test_cutmix_pastes_one_box_whose_area_is_the_label_share():
    from dpskin_core.training.augment import mix_batch

    x = torch.rand(8, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    lams = []
    for seed in range(20):
        out, perm, lam = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(seed))
        from_partner = (out == x[perm]).all(1) & (out != x).any(1)  # (N, H, W) pixels pasted
        pasted = (out != x).any(1)
        assert torch.equal(pasted, from_partner)  # every changed pixel is the partner's
        kept = (out == x).all(1).float().mean(dim=(1, 2))  # share of each image left as is
        moved = perm != torch.arange(8)
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam))
        lams.append(lam)
    assert len(set(lams)) > 5 and min(lams) <= 0.5 < max(lams)  # lam varies across batches


def test_mixing_is_refused_under_dp_and_without_images():
    base = dict(dataset="synthetic", epochs=1)
    assert "mixing" not in RunConfig(**base).semantic_dict()  # off: run ids as before
    assert RunConfig(**base, mixing="mixup", mixing_alpha=0.2).semantic_dict()["mixing_alpha"] == 0.2
    with pytest.raises(ConfigError, match="mixing='cutmix'.*dp"):
        RunConfig(**base, mixing="cutmix", dp=True, target_epsilon=8.0)
    with pytest.raises(ConfigError, match="mixing"):
        RunConfig(**base, mixing="mixup", features="colour", backbone="colour_linear")
    for bad in ("mix", None):
        with pytest.raises(ConfigError, match="mixing"):
            RunConfig(**base, mixing=bad)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="mixing_alpha"):
            RunConfig(**base, mixing="mixup", mixing_alpha=bad)


def test_the_references_own_mixing_and_every_ema_checked_early():
    """reference_mixing reaches the non-private references only; every EMA decay of a profile
    is checked when the profile is read, before any run."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    assert RECIPES.get("nonprivate-adam").config(p, seed=0).mixing == "none"
    q = Params(**{**fields, "reference_mixing": "cutmix", "reference_mixing_alpha": 0.5})
    cfg = RECIPES.get("nonprivate-adam").config(q, seed=0)
    assert (cfg.mixing, cfg.mixing_alpha) == ("cutmix", 0.5)
    assert RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0).mixing == "none"
    with pytest.raises(ConfigError, match="reference_mixing"):
        Params(**{**fields, "reference_mixing": "blend"})
    for name in ("dp_ema", "proposed_ema", "proposed_colour_ema"):
        for bad in (1.0, 0.0, float("nan"), "0.9"):
            with pytest.raises(ConfigError, match=name):
                Params(**{**fields, name: bad})


# --------------------------------------------------------------------------- rotation and zoom
def test_rotate_zoom_is_the_identity_at_angle_zero_and_rot90_at_a_quarter_turn():
    from dpskin_core.training.augment import rotate_zoom

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate_zoom(x, torch.zeros(3), torch.ones(3)), x, atol=1e-6)
    quarter = rotate_zoom(x, torch.full((3,), math.pi / 2), torch.ones(3))
    assert torch.allclose(quarter, torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert not torch.allclose(quarter, torch.rot90(x, -1, (2, 3)), atol=1e-2)
    # a non-square image turned by a half turn is the image reversed on both axes (rigid)
    r = torch.rand(2, 1, 6, 10)
    half = rotate_zoom(r, torch.full((2,), math.pi), torch.ones(2))
    assert torch.allclose(half, r.flip(2).flip(3), atol=1e-5)


def test_zoom_magnifies_about_the_centre():
    from dpskin_core.training.augment import rotate_zoom

    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    out = rotate_zoom(ramp, torch.zeros(1), torch.full((1,), 2.0))
    # twice the magnification halves the slope across the columns, about the centre (7.5)
    slope = out[0, 0, 8, 9] - out[0, 0, 8, 8]
    assert math.isclose(float(slope), 0.5, abs_tol=1e-5)
    assert math.isclose(float(out[0, 0, 8, 7:9].mean()), 7.5, abs_tol=1e-5)
    shrunk = rotate_zoom(ramp, torch.zeros(1), torch.full((1,), 0.8))
    assert math.isclose(float(shrunk[0, 0, 8, 9] - shrunk[0, 0, 8, 8]), 1.25, abs_tol=1e-5)


def test_random_rotation_and_zoom_draw_per_image_reproducibly_and_nothing_when_off():
    from dpskin_core.training.augment import rotate_zoom_batch

    x = torch.rand(32, 3, 12, 12)
    a = augment(x, torch.Generator().manual_seed(5), rotate=True, zoom=0.2)
    b = augment(x, torch.Generator().manual_seed(5), rotate=True, zoom=0.2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # each image its own angle: the images' changes differ
    diffs = {round(float((a[i] - x[i]).abs().mean()), 4) for i in range(32)}
    assert len(diffs) > 20
    # off: no draw, so the other options' draws are those of the code without them
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment(x, g1, color=0.2, rotate=False, zoom=0.0), augment(x, g2, color=0.2))
    assert torch.equal(g1.get_state(), g2.get_state())
    # zoom alone keeps the orientation: a constant image stays constant, a blank stays blank
    c = torch.full((4, 3, 12, 12), 0.3)
    assert torch.allclose(rotate_zoom_batch(c, True, 0.5, torch.Generator().manual_seed(0)), c)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="augment_zoom"):
            rotate_zoom_batch(x, False, bad, None)


def test_rotation_and_zoom_are_checked_and_left_out_of_the_run_id_when_off():
    base = RunConfig()
    assert "augment_rotate" not in base.semantic_dict()
    assert "augment_zoom" not in base.semantic_dict()
    on = RunConfig(augment_rotate=True, augment_zoom=0.2)
    assert on.semantic_dict()["augment_rotate"] is True
    assert on.semantic_dict()["augment_zoom"] == 0.2
    assert len({config_hash(c, "v") for c in (base, on, RunConfig(augment_zoom=0.2))}) == 3
    for bad in (1.0, 1.5, -0.1, float("inf"), "0.2", True):
        with pytest.raises(ConfigError, match="augment_zoom"):
            RunConfig(augment_zoom=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match="augment_rotate"):
            RunConfig(augment_rotate=bad)


def test_the_recipes_rotate_and_zoom_references_and_dp_runs_by_their_own_parameters_only():
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.recipes import RECIPES, Params

    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    q = Params(**{**fields, "augment_rotate": True, "augment_zoom": 0.2,
                  "dp_augment_rotate": False, "dp_augment_zoom": 0.1})
    for name in ("nonprivate-adam", "nonprivate-sgd"):
        c = RECIPES.get(name).config(q, seed=0)
        assert (c.augment_rotate, c.augment_zoom) == (True, 0.2), name
    c = RECIPES.get("loso-adam").configs(q, seeds=[0])[0]
    assert (c.augment_rotate, c.augment_zoom) == (True, 0.2)
    for name in ("dp-sgd", "dp-adam"):
        c = RECIPES.get(name).config(q, target_epsilon=8.0, seed=0)
        assert (c.augment_rotate, c.augment_zoom) == (False, 0.1), name
    # the attacked models and MpLe's runs see their images as they are, as measured
    for name in ("attack/nonprivate", "attack/nonprivate-no-augmentation", "attack/dp-sgd",
                 "attack/dp-adam", "mple/plain-no-augmentation", "mple/dp-sgd"):
        c = RECIPES.get(name).configs(q, n_train=5000)[0]
        assert (c.augment_rotate, c.augment_zoom) == (False, 0.0), name
    for name, bad in (("augment_zoom", 1.0), ("dp_augment_zoom", -0.5), ("augment_rotate", 1),
                      ("dp_augment_rotate", "true")):
        with pytest.raises(ConfigError, match=name):
            Params(**{**fields, name: bad})
