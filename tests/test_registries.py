"""Every name list agrees with the registry that builds the named things, and every registry
refuses an unknown name."""
from __future__ import annotations

import itertools

import pytest
import torch

from dpskin_core.attacks import ATTACKS, MEMBERSHIP_ATTACKS
from dpskin_core.attacks.registry import KINDS
from dpskin_core.book.registry import load_registry
from dpskin_core.cli import build_parser
from dpskin_core.data import DATASETS
from dpskin_core.data.download import DOWNLOADS
from dpskin_core.errors import ConfigError, UnknownNameError
from dpskin_core.training import privacy
from dpskin_core.training.backbones import BACKBONES
from dpskin_core.training.config import METHODS, RunConfig
from dpskin_core.training.frontends import FRONT_ENDS
from dpskin_core.training.optim import OPTIMIZERS, build_optimizer
from dpskin_core.training.recipes import ATTACK_MODELS, RECIPES


def test_every_optimizer_name_builds_and_only_those_validate():
    for name in OPTIMIZERS.names():
        cfg = RunConfig(optimizer=name)
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
        assert isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(ConfigError, match="optimizer='rmsprop'; expected one of adam, sgd"):
        RunConfig(optimizer="rmsprop")


def test_training_accountants_are_registered_and_known_to_opacus():
    from opacus.accountants import create_accountant

    assert set(privacy.TRAINING_ACCOUNTANTS) <= set(privacy.ACCOUNTANTS.names())
    for name in privacy.TRAINING_ACCOUNTANTS:
        create_accountant(name)  # Opacus' PrivacyEngine(accountant=name) keeps this one
        RunConfig(accountant=name)
    with pytest.raises(ConfigError, match="accountant='pld'"):  # the reference only
        RunConfig(accountant="pld")


def test_methods_are_exactly_the_values_config_method_takes():
    seen = set()
    for dp, technique, opt in itertools.product((False, True), (False, True), OPTIMIZERS.names()):
        kw = dict(dp=dp, optimizer=opt, target_epsilon=3.0 if dp else None, ema_decay=0.9 if technique else None)
        seen.add(RunConfig(**kw).method)
    assert seen == set(METHODS)


def test_front_ends_and_their_heads():
    assert FRONT_ENDS.names() == ["colour", "derm", "given", "pixels", "scatter"]
    heads = {h for n in FRONT_ENDS for h in (FRONT_ENDS.get(n).heads or ())}
    assert heads <= set(BACKBONES.names())
    for name in FRONT_ENDS:
        for head in FRONT_ENDS.get(name).heads or ():
            RunConfig(features=name, backbone=head)
            with pytest.raises(ConfigError, match="image backbones take features='pixels'"):
                RunConfig(features="pixels", backbone=head)
    with pytest.raises(ConfigError, match="features: unknown front end 'hsv'"):
        RunConfig(features="hsv")
    with pytest.raises(ConfigError, match="backbone: backbone 'resnet7' unknown"):
        RunConfig(backbone="resnet7")


def test_recipes_build_valid_configs_for_every_profile():
    reg = load_registry()
    labels = [RECIPES.get(n).label for n in RECIPES]
    assert len(set(n for n in RECIPES)) == len(RECIPES.names())
    assert set(ATTACK_MODELS.values()) <= set(RECIPES.names())
    for profile in reg.profiles:
        p = reg.params(profile)
        for name in RECIPES:
            r = RECIPES.get(name)
            cfgs = r.configs(p, n_train=5000)
            # a leave-one-site-out recipe has no grid where the profile lists no sites
            assert cfgs or ("site" in r.axes and not p.loso_sites), (profile, name)
            assert all(c.recipe == name for c in cfgs)
            assert all(c.dp == r.private for c in cfgs), name
    # the plain recipes' labels are distinct (the tables group by them)
    plain = [RECIPES.get(n).label for n in RECIPES if "/" not in n]
    assert len(plain) == len(set(plain)), labels
    with pytest.raises(UnknownNameError, match="unknown recipe 'dp-sdg'"):
        RECIPES.get("dp-sdg")


def test_attack_registry_kinds_and_membership_names():
    assert set(ATTACKS.get(n).kind for n in ATTACKS) <= set(KINDS)
    assert {n for n in ATTACKS if ATTACKS.get(n).kind == "membership"} == set(MEMBERSHIP_ATTACKS)


def test_cli_choices_are_the_registries():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    download = sub.choices["download"]
    name = next(a for a in download._actions if a.dest == "name")
    assert sorted(name.choices) == DOWNLOADS.names()
    assert {"isic2018", "synthetic", "dermamnist"} == set(DATASETS.names())


def test_reference_dp_and_loso_recipes_use_the_profile_levers():
    """The non-private references train to convergence, the DP baselines carry the profile's
    DP levers, a site axis becomes a site split, and the attacked models keep plain schedules
    (the attacks chapter measures fixed-epoch models)."""
    reg = load_registry()
    p = reg.params("cpu")
    ref = RECIPES.get("nonprivate-adam").config(p, backbone="mobilenet_v3_small", seed=1)
    assert (ref.early_stopping_patience, ref.warmup_epochs, ref.lr_schedule, ref.augment_color,
            ref.class_weights, ref.epochs) == (p.patience, p.warmup_epochs, p.lr_schedule,
                                               p.augment_color, "balanced", p.epochs)
    dp = RECIPES.get("dp-sgd").config(p, backbone="smallcnn_fast", target_epsilon=3.0, seed=0)
    assert (dp.logit_adjust, dp.la_tau, dp.la_tau_kept, dp.ema_decay, dp.aug_mult, dp.epochs,
            dp.batch_size, dp.early_stopping_patience, dp.class_weights, dp.augment_color) == (
        p.dp_logit_adjust, p.dp_la_tau, p.dp_la_tau_kept, p.dp_ema, p.dp_aug_mult,
        p.dp_epochs_at(3.0), p.dp_batch_size, None, "none", 0.0)
    loso = RECIPES.get("loso-adam").configs(p, backbones=["smallcnn_fast"], seeds=[0])
    assert [c.split for c in loso] == [f"site:{s}" for s in p.loso_sites]
    assert all(c.replace(split="lesion") == ref.replace(backbone="smallcnn_fast", seed=0,
                                                         recipe="loso-adam", name="loso-adam")
               for c in loso)
    for name in ("attack/nonprivate", "attack/nonprivate-no-augmentation", "attack/dp-sgd"):
        c = RECIPES.get(name).configs(p, n_train=5000)[0]
        assert (c.early_stopping_patience, c.lr_schedule, c.warmup_epochs, c.augment_color) == (
            None, "constant", 0.0, 0.0)
        assert not c.logit_adjust and c.ema_decay is None
    with pytest.raises(ConfigError, match="not swept over site"):
        RECIPES.get("dp-sgd").config(p, site="rosendahl")


def test_private_recipes_sweep_the_dp_backbones():
    """A profile may train more networks without privacy than under DP (``dp_backbones``); the
    list must be a non-empty subset of ``backbones``."""
    import dataclasses

    from dpskin_core.training.recipes import Params

    p = load_registry().params("cpu")
    assert p.dp_backbones and set(p.dp_backbones) < set(p.backbones)
    assert {c.backbone for c in RECIPES.get("dp-sgd").configs(p)} == set(p.dp_backbones)
    assert {c.backbone for c in RECIPES.get("nonprivate-sgd").configs(p)} == set(p.backbones)
    every = dataclasses.replace(p, dp_backbones=None)
    assert {c.backbone for c in RECIPES.get("dp-adam").configs(every)} == set(p.backbones)
    for bad in (["resnet18"], []):
        with pytest.raises(ConfigError, match="dp_backbones must be a non-empty subset"):
            Params.from_mapping({**dataclasses.asdict(p), "dp_backbones": bad})


def test_the_technique_sees_its_own_image_size():
    """The second generation describes images at ``proposed_image_size``; its non-private
    ceiling and ablations follow it, except the ablation that restores the profile's size, the
    pixel ablation (an end-to-end network) and the attacked model (chapter 05 attacks every
    model with the same images); None falls back to ``image_size``."""
    import dataclasses

    p = load_registry().params("cpu")
    assert p.proposed_image_size and p.proposed_image_size != p.image_size
    size = {n: RECIPES.get(n).config(p, seed=0, **({"target_epsilon": 8.0}
                                                    if RECIPES.get(n).private else {})).image_size
            for n in ("proposed", "proposed-nonprivate", "ablation/no-ema",
                      "ablation/profile-resolution", "ablation/no-front-end",
                      "ablation/scatter-front-end", "proposed-colour")}
    assert size == {"proposed": p.proposed_image_size, "proposed-nonprivate": p.proposed_image_size,
                    "ablation/no-ema": p.proposed_image_size,
                    "ablation/profile-resolution": p.image_size,
                    "ablation/no-front-end": p.image_size,
                    "ablation/scatter-front-end": p.image_size, "proposed-colour": p.image_size}
    assert RECIPES.get("attack/proposed").configs(p, n_train=5000)[0].image_size == p.image_size
    same = dataclasses.replace(p, proposed_image_size=None)
    assert RECIPES.get("proposed").config(same, target_epsilon=8.0, seed=0).image_size == p.image_size


def test_the_technique_corrects_colour_and_its_ablation_does_not():
    """The second generation divides each image by its Shades of Gray illuminant; everything
    built from it keeps that step except the ablation that removes it; the first generation and
    the end-to-end baselines see the images as stored."""
    p = load_registry().params("cpu")

    def cc(n: str) -> str:
        r = RECIPES.get(n)
        kw = {"target_epsilon": 8.0} if r.private else {}
        return r.config(p, seed=0, **kw).colour_constancy

    assert {n: cc(n) for n in ("proposed", "proposed-nonprivate", "ablation/no-ema",
                               "ablation/no-colour-constancy", "proposed-colour", "dp-sgd",
                               "nonprivate-adam")} == {
        "proposed": "shades-of-gray", "proposed-nonprivate": "shades-of-gray",
        "ablation/no-ema": "shades-of-gray", "ablation/no-colour-constancy": "none",
        "proposed-colour": "none", "dp-sgd": "none", "nonprivate-adam": "none"}
    assert RECIPES.get("attack/proposed").configs(p, n_train=5000)[0].colour_constancy == \
        "shades-of-gray"


@pytest.mark.parametrize("field", ["proposed_image_size", "proposed_colour_epochs"])
@pytest.mark.parametrize("bad", [0, -32, 1.5, True, "64"])
def test_technique_sides_and_epochs_must_be_positive_integers(field, bad):
    import dataclasses

    from dpskin_core.training.recipes import Params

    p = load_registry().params("cpu")
    with pytest.raises(ConfigError, match=f"{field} must be a positive integer"):
        Params.from_mapping({**dataclasses.asdict(p), field: bad})


def test_a_network_can_have_its_own_dp_learning_rate():
    """``lr_dp_by_backbone`` gives one network its own DP-SGD / DP-Adam rate; the others, and
    the optimiser left out, keep the profile's; every recipe built on the DP baselines follows
    the network of its grid point."""
    import dataclasses

    p = dataclasses.replace(load_registry().params("cpu"),
                            backbones=("smallcnn_stats", "mobilenet_v3_small"), dp_backbones=None,
                            lr_dp_by_backbone={"mobilenet_v3_small": {"sgd": 0.1}})
    assert p.lr_dp_sgd != 0.1
    for name, opt in (("dp-sgd", "sgd"), ("dp-adam", "adam"), ("dp-sgd-lesion", "sgd"),
                      ("dp-adam-lesion", "adam"), ("mple/dp-sgd", "sgd")):
        lr = {c.backbone: c.lr for c in RECIPES.get(name).configs(p, epsilons=[8.0], seeds=[0])}
        mobile = 0.1 if opt == "sgd" else p.lr_dp_adam
        default = p.lr_dp_sgd if opt == "sgd" else p.lr_dp_adam
        assert lr == {"smallcnn_stats": default, "mobilenet_v3_small": mobile}, name
    assert p.dp_lr("mobilenet_v3_small", "adam") == p.lr_dp_adam
    with pytest.raises(ConfigError, match="DP optimizer must be one of"):
        p.dp_lr("mobilenet_v3_small", "rmsprop")


@pytest.mark.parametrize("bad, match", [
    ({"mobilenet_v4": {"sgd": 0.1}}, "unknown backbone 'mobilenet_v4'"),
    ({"resnet18": {"momentum": 0.1}}, "unknown optimizer 'momentum'"),
    ({"resnet18": {}}, "lr_dp_by_backbone.resnet18 must be a non-empty mapping"),
    ({"resnet18": 0.1}, "lr_dp_by_backbone.resnet18 must be a non-empty mapping"),
    ({"resnet18": {"sgd": 0.0}}, "resnet18.sgd must be a finite positive number"),
    ({"resnet18": {"adam": float("nan")}}, "resnet18.adam must be a finite positive number"),
    ({"resnet18": {"sgd": True}}, "resnet18.sgd must be a finite positive number"),
    ([0.1], "must be a mapping"),
])
def test_per_network_dp_rates_are_checked(bad, match):
    import dataclasses

    from dpskin_core.training.recipes import Params

    p = load_registry().params("cpu")
    with pytest.raises(ConfigError, match=match):
        Params.from_mapping({**dataclasses.asdict(p), "lr_dp_by_backbone": bad})


def test_the_dp_schedule_can_depend_on_the_budget():
    """``dp_epochs_by_epsilon`` sets the DP baselines' epochs at one budget; the other budgets,
    and the recipes that fix their own epochs (the attacked models), keep theirs; the pixel
    ablation of the technique follows the baselines."""
    import dataclasses

    p = dataclasses.replace(load_registry().params("cpu"), epsilons=(1.0, 3.0, 8.0),
                            dp_epochs_by_epsilon={8.0: 33})
    assert p.dp_epochs != 33
    for name in ("dp-sgd", "dp-adam", "dp-sgd-lesion", "mple/dp-sgd", "ablation/no-front-end"):
        r = RECIPES.get(name)
        epochs = {c.target_epsilon: c.epochs for c in r.configs(p, seeds=[0])}
        assert epochs == {1.0: p.dp_epochs, 3.0: p.dp_epochs, 8.0: 33}, name
    assert RECIPES.get("dp-sgd").config(p, backbone=p.backbones[0], target_epsilon=8,
                                        seed=0).epochs == 33   # an int budget is the same budget
    assert {c.epochs for c in RECIPES.get("attack/dp-sgd").configs(p, seeds=[0])} == \
        {p.attack_epochs}


@pytest.mark.parametrize("bad, match", [
    ({8.0: 0}, "epochs must be a positive integer"),
    ({8.0: 2.5}, "epochs must be a positive integer"),
    ({-1.0: 20}, "budget -1.0 must be a finite positive number"),
    ({float("inf"): 20}, "budget inf must be a finite positive number"),
    ([20], "must be a mapping"),
])
def test_per_budget_dp_epochs_are_checked(bad, match):
    import dataclasses

    from dpskin_core.training.recipes import Params

    p = load_registry().params("cpu")
    with pytest.raises(ConfigError, match=match):
        Params.from_mapping({**dataclasses.asdict(p), "dp_epochs_by_epsilon": bad})
