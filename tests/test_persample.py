"""Per-sample gradient engines (dpskin_core.training.persample): every engine gives the hooks
mode's clipped, noised update for every image backbone, with the same per-sample norms and
the same accountant history; combinations a mode cannot serve are refused, naming both."""
from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dpskin_core.errors import ConfigError
from dpskin_core.training import trainer
from dpskin_core.training.backbones import BACKBONES, build_backbone
from dpskin_core.training.checkpoint import Checkpoint
from dpskin_core.training.config import RunConfig
from dpskin_core.training.persample import (GRAD_SAMPLE_MODES, MODE_CHOICES, BookKeeping,
                                            FastGradSample,
                                            conv2d_grad_sample, resolve_mode)

from test_models import IMAGE_BACKBONES, one_thread  # noqa: F401 (fixture)
from test_train import BASE, random_bundle


def dp_step(backbone: str, mode: str, x: torch.Tensor, y: torch.Tensor,
            loss: nn.Module | None = None, clip: float = 1.0):
    """One DP-SGD step of a fresh ``backbone`` through the trainer's make_private with ``mode``
    (loss ``loss``, clipping bound ``clip``): (parameters after the step, per-sample gradient
    norms or None, the engine used)."""
    gc.collect()  # the previous step's wrapped model sits in reference cycles (hooks): free it
    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=7)
    cfg = RunConfig(backbone=backbone, dp=True, target_epsilon=8.0, delta=1e-5, lr=0.5,
                    batch_size=len(x), grad_sample_mode=mode, dp_noise="seeded",
                    max_grad_norm=clip)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    g_noise = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' full-backward-hook notice (inputs need no grad)
        _, model, optimizer, criterion, _, _, _, used = trainer.make_private(
            cfg, model, optimizer, loss or nn.CrossEntropyLoss(), 10 * len(x), 10, (),
            torch.Generator(), g_noise)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
    norms = None
    if GRAD_SAMPLE_MODES.get(used).per_sample_rows:
        # summed in float64 (torch's float32 norm of a 7M-long row, densenet121, is off by
        # 2.5e-4), a slice at a time: a float64 copy of vgg16's rows would take ~3 GB
        sq = torch.zeros(len(x), dtype=torch.float64)
        for p in model.parameters():
            if p.requires_grad:
                for part in p.grad_sample.reshape(len(x), -1).split(1 << 22, dim=1):
                    sq += part.double().square().sum(1)
        norms = sq.sqrt().float()
    elif used == "bk":  # norms without rows: the engine keeps them
        norms = model.per_sample_engine.last_norms
    optimizer.step()
    after = {k: v.detach().clone() for k, v in trainer._unwrapped(model).state_dict().items()}
    return after, norms, used


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_per_sample_class_weights_are_neutralised_by_clipping(mode, one_thread):  # noqa: F811
    """Why the DP baselines do not weight their loss by class (beyond reading private counts):
    a per-sample weight only rescales that example's gradient, and clipping rescales every
    gradient above C to norm C, so once the examples are clipped (the usual regime of DP-SGD)
    balanced weights change nothing: the DP update with weights 1 : 25 equals the unweighted
    one; without clipping (C large) the weights do change it."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 7
    w = torch.tensor([1.0, 25.0, 3.0, 8.0, 2.0, 12.0, 5.0])  # like inverse ISIC class shares
    plain, n0, _ = dp_step("smallcnn_fast", mode, x, y, clip=1e-4)
    weighted, n1, _ = dp_step("smallcnn_fast", mode, x, y, nn.CrossEntropyLoss(weight=w), clip=1e-4)
    assert n0.min() > 1e-4 and n1.min() > 1e-4  # every example clipped
    assert all(torch.allclose(plain[k], weighted[k], atol=1e-7) for k in plain)
    c_big = 2 * float(max(n0.max(), n1.max()))  # clips nothing
    big_plain, *_ = dp_step("smallcnn_fast", mode, x, y, clip=c_big)
    big_weighted, *_ = dp_step("smallcnn_fast", mode, x, y, nn.CrossEntropyLoss(weight=w), clip=c_big)
    gap = max(float((big_plain[k] - big_weighted[k]).abs().max()) for k in big_plain)
    assert gap > 1e-3 * c_big  # float32 rounding of the shared noise is ~1e-7 of it


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_every_mode_gives_the_hooks_update(name, one_thread):  # noqa: F811
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 6])
    ref, ref_norms, _ = dp_step(name, "hooks", x, y)
    assert ref_norms is not None and (ref_norms > 0).all()
    for mode in GRAD_SAMPLE_MODES.names():
        if mode == "hooks":
            continue
        if name in dict(GRAD_SAMPLE_MODES.get(mode).refused_backbones):
            with pytest.raises(ConfigError, match=f"grad_sample_mode={mode!r} cannot train "
                                                  f"backbone {name!r}"):
                RunConfig(backbone=name, dp=True, target_epsilon=8.0, grad_sample_mode=mode)
            continue
        got, norms, used = dp_step(name, mode, x, y)
        assert used == mode
        for k in ref:
            # the noise (sigma C ~ 0.4 per coordinate, lr 0.5) dominates; rounding is ~1e-6
            assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5), (name, mode, k)
        assert norms is not None or mode == "ghost", (name, mode)  # ghost keeps no norms
        if norms is not None:
            assert torch.allclose(norms, ref_norms, rtol=1e-4), (name, mode)
    # "auto" takes the book-keeping engine on every image backbone of the project
    assert dp_step(name, "auto", x, y)[2] == "bk"


@pytest.mark.parametrize("positions", [64, 1024])  # below / above the grouped path's threshold
@pytest.mark.parametrize("cout, groups, stride", [(12, 1, 1), (12, 4, 1), (16, 8, 2)])  # 8: depthwise
def test_conv_grad_sample_matches_autograd_per_sample(positions, cout, groups, stride):
    side = int(positions ** 0.5)
    layer = nn.Conv2d(8, cout, 3, padding=1, stride=stride, groups=groups, bias=True)
    a = torch.randn(5, 8, side * stride, side * stride)
    g = torch.randn(5, cout, side, side)
    got = conv2d_grad_sample(layer, a, g)
    for i in range(5):
        layer.zero_grad()
        layer(a[i:i + 1]).backward(g[i:i + 1])
        assert torch.allclose(got[layer.weight][i], layer.weight.grad, atol=1e-4)
        assert torch.allclose(got[layer.bias][i], layer.bias.grad, atol=1e-4)


@pytest.mark.parametrize("mode", ["fast", "bk"])
def test_engines_read_channels_last_tensors_right(mode):
    """oneDNN returns channels-last maps for small inputs on CPU; the engines must give the
    per-sample gradients (bk: their clipped sum) of the contiguous computation."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 16, 3))
    x = torch.randn(4, 3, 4, 4).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    ref = [torch.autograd.grad(nn.functional.cross_entropy(conv(x[i:i + 1]), y[i:i + 1]),
                               list(conv.parameters())) for i in range(4)]
    engine = FastGradSample(conv) if mode == "fast" else BookKeeping(conv, max_grad_norm=1e9)
    nn.functional.cross_entropy(conv(x), y).backward()
    for j, p in enumerate(conv.parameters()):
        want = torch.stack([r[j] for r in ref])
        got = p.grad_sample if mode == "fast" else p.grad
        assert torch.allclose(got, want if mode == "fast" else want.sum(0), atol=1e-4), j
    engine.remove()


def test_fast_engine_leaves_the_flowing_gradient_alone():
    """Per-sample rows equal the per-example autograd gradients (a 2-D layer's bias row is a
    view of the output gradient: scaling it in place would corrupt every layer below)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    ref = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    FastGradSample(model)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # no summed weight gradient
    assert all(p.requires_grad for p in model.parameters())  # thawed after the forward pass
    check = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p, r in zip(check.parameters(), ref):
            p.copy_(r)
    for i in range(5):
        check.zero_grad()
        nn.functional.cross_entropy(check(x[i:i + 1]), y[i:i + 1]).backward()
        for p, q in zip(model.parameters(), check.parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(aug_mult=2), dict(logit_adjust=True),
                                      dict(max_physical_batch_size=16)])
def test_ghost_refuses_what_needs_per_sample_rows(settings):
    with pytest.raises(ConfigError, match=r"grad_sample_mode='ghost'.*" + next(iter(settings))):
        RunConfig(**BASE, dp=True, target_epsilon=3.0, grad_sample_mode="ghost", **settings)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_lesion_units_and_views_refuse_norm_only_modes(mode):
    for settings, what in ((dict(privacy_unit="lesion"), "privacy_unit='lesion'"),
                           (dict(aug_mult=2), "aug_mult=2")):
        with pytest.raises(ConfigError, match=f"grad_sample_mode='{mode}'.*{what}"):
            RunConfig(**BASE, dp=True, target_epsilon=3.0, grad_sample_mode=mode, **settings)


def test_unknown_mode_and_unsupported_layers():
    with pytest.raises(ConfigError, match="grad_sample_mode='bookkeeping'; expected one of auto, "):
        RunConfig(**BASE, dp=True, target_epsilon=3.0, grad_sample_mode="bookkeeping")
    assert set(MODE_CHOICES) == {"auto", *GRAD_SAMPLE_MODES.names()}

    class Scale(nn.Module):  # a layer no per-sample formula knows
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(ConfigError, match="'fast' has no per-sample gradient for the Scale "
                                          "layer.*backbone 'mine'"):
        resolve_mode("fast", model, backbone="mine")
    assert resolve_mode("auto", model, backbone="mine").name == "hooks"
    with pytest.raises(ConfigError, match="'bk' has no per-sample gradient for the Scale"):
        resolve_mode("bk", model, backbone="mine")
    # auto: bk where the settings allow it, else the fast engine (which keeps per-sample rows)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    assert resolve_mode("auto", conv).name == "bk"
    assert resolve_mode("auto", conv, aug_mult=2).name == "fast"
    assert resolve_mode("auto", conv, privacy_unit="lesion").name == "fast"


def test_every_backbone_resolves_before_any_run_folder(tmp_path, monkeypatch):
    """The engine is checked against the backbone's layers before the run folder exists."""
    from dpskin_core.training import persample

    monkeypatch.setattr(persample, "unsupported_layers", lambda model: ["Conv2d"])
    cfg = RunConfig(**BASE, dp=True, target_epsilon=3.0, delta=1e-4, grad_sample_mode="fast")
    with pytest.raises(ConfigError, match="'fast' has no per-sample gradient for the Conv2d"):
        trainer.run(cfg, tmp_path, data=random_bundle())
    assert not any(tmp_path.iterdir())
    monkeypatch.undo()
    for name in BACKBONES.names():
        with torch.device("meta"):
            model = build_backbone(name, num_classes=7)
        assert resolve_mode("auto", model, backbone=name).name == "bk"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [dict(aug_mult=2), dict(privacy_unit="lesion"),
                                   dict(max_physical_batch_size=8), dict(logit_adjust=True)])
def test_fast_and_hooks_runs_agree_with_every_lever(tmp_path, extra):
    """Whole runs (Poisson sampling, noise, accountant) with each lever: the fast engine ends
    with the hooks engine's weights (rounding aside), eps and privacy history."""
    data = random_bundle()
    if extra.get("privacy_unit") == "lesion":  # lesions of two images
        data.meta.loc[data.meta["split"] == "train", "lesion_id"] = [f"L{i // 2}" for i in range(240)]
    out = {}
    modes = ["hooks", "fast"] + (["bk"] if not {"aug_mult", "privacy_unit"} & set(extra) else [])
    for mode in modes:
        cfg = RunConfig(**dict(BASE, epochs=2), dp=True, target_epsilon=4.0, delta=1e-4,
                        dp_noise="seeded", grad_sample_mode=mode, **extra)
        res = trainer.run(cfg, tmp_path / mode, data=data)
        out[mode] = (res, Checkpoint.load(res.run_dir / "checkpoints").model)
    rh, wh = out.pop("hooks")
    assert rh.meta["grad_sample_mode"] == "hooks"
    for mode, (rf, wf) in out.items():
        assert rf.meta["grad_sample_mode"] == mode
        assert rh.epsilon == rf.epsilon and rh.meta["privacy_history"] == rf.meta["privacy_history"]
        for k in wh:
            if wh[k].dtype.is_floating_point:
                assert torch.allclose(wh[k], wf[k], rtol=1e-3, atol=1e-4), (mode, k)
        assert np.isclose(rh.final_metrics["nll"], rf.final_metrics["nll"], rtol=1e-3), mode
