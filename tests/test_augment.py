"""Random translation of training images (``augment_translate``): what it computes, where the
recipes use it, and the values it rejects."""
from __future__ import annotations

import pytest
import torch

from dpskin_core.errors import ConfigError
from dpskin_core.training.augment import augment, translate_batch
from dpskin_core.training.config import RunConfig


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
