"""Tests of dpskin_core.training.backbones: every backbone builds without BatchNorm, passes Opacus'
validator, classifies 32 px images and takes one DP-SGD step; local pretrained weights."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from dpskin_core.errors import ConfigError, UnknownNameError
from dpskin_core.training.backbones import (
    BACKBONES, INPUT_STATS_DIM, SmallCNN, build_backbone, count_parameters, gn_groups,
    has_batchnorm, input_colour_stats, load_pretrained,
)

from dpskin_core.training.frontends import FRONT_ENDS

# heads on the data-independent front ends take feature vectors, not images
# (tests/test_technique.py)
HEADS = {h for n in FRONT_ENDS for h in (FRONT_ENDS.get(n).heads or ())}
IMAGE_BACKBONES = [n for n in BACKBONES.names() if n not in HEADS]
TORCHVISION = ["densenet121", "efficientnet_b0", "mobilenet_v3_small", "resnet18", "resnet50",
               "vgg16"]


@pytest.fixture
def one_thread():
    """One intra-op thread: batches of 2 gain nothing from parallelism, and two OpenMP
    threads that spin-wait on a CPU shared with another job made these steps ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_lists_the_expected_backbones():
    assert set(TORCHVISION) | {"smallcnn"} <= set(IMAGE_BACKBONES)
    assert HEADS <= set(BACKBONES.names())


# the inputs need no gradient, so Opacus' full backward hooks warn that they fire on outputs
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_backbone_builds_validates_and_takes_a_dp_step(name, one_thread):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=7)
    assert not has_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    assert count_parameters(model) > 0

    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    model.train()

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode=False warning
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=2),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    # every trainable tensor got a per-sample gradient (nothing silently left out of clipping)
    for k, p in private.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 2, k
    optimizer.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == []


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_forward_at_224px(name):
    model = build_backbone(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)


def test_smallcnn_options():
    assert isinstance(build_backbone("smallcnn"), SmallCNN)
    relu = build_backbone("smallcnn", activation="relu")
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    assert not any(isinstance(m, nn.Tanh) for m in relu.modules())
    tanh = build_backbone("smallcnn")  # DP default: tanh
    assert any(isinstance(m, nn.Tanh) for m in tanh.modules())
    wide = build_backbone("smallcnn", widths=(16, 32), convs_per_stage=1, num_classes=3)
    with torch.no_grad():
        assert wide.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ConfigError, match="activation"):
        build_backbone("smallcnn", activation="sigmoidish")


def test_input_colour_stats():
    """Mean, std and centre mean per channel; the centre is the middle half of each side;
    invariant to the flips and 90-degree rotations the augmentation draws."""
    x = torch.zeros(2, 3, 8, 8)
    x[0, 0] = 1.0                      # image 0: channel 0 is 1 everywhere
    x[1, 2, 2:6, 2:6] = 4.0            # image 1: a 4x4 centre of 4 in channel 2
    s = input_colour_stats(x)
    assert s.shape == (2, INPUT_STATS_DIM)
    mean, std, centre = s[:, :3], s[:, 3:6], s[:, 6:]
    assert torch.allclose(mean, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))   # 16 * 4 / 64
    assert torch.allclose(centre, torch.tensor([[1.0, 0, 0], [0, 0, 4.0]]))
    assert torch.allclose(std[0], torch.zeros(3)) and std[1, 2] > 0
    y = torch.randn(4, 3, 12, 12)
    for t in (y.flip(-1), y.flip(-2), y.rot90(1, (-2, -1))):
        assert torch.allclose(input_colour_stats(t), input_colour_stats(y), atol=1e-5)
    with pytest.raises(ConfigError, match="input_colour_stats takes"):
        input_colour_stats(torch.zeros(2, 1, 8, 8))


def test_smallcnn_stats_head_reads_the_input_colour():
    """smallcnn_stats is smallcnn_fast with the statistics joined before the head, which
    reads them: its logits move by exactly the head's weights times the statistics' change."""
    torch.manual_seed(0)
    plain, stats = build_backbone("smallcnn_fast"), build_backbone("smallcnn_stats")
    assert count_parameters(stats) - count_parameters(plain) == INPUT_STATS_DIM * 7
    assert stats.classifier.in_features == plain.classifier.in_features + INPUT_STATS_DIM
    stats.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        w = stats.classifier.weight[:, -INPUT_STATS_DIM:].clone()
        base = stats(x)
        stats.classifier.weight[:, -INPUT_STATS_DIM:] = 0.0
        without = stats(x)
        assert torch.allclose(base - without, input_colour_stats(x) @ w.T, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small",
                                  "efficientnet_b0", "densenet121"])
def test_out_of_place_forwards_match_torchvision(name, one_thread):
    import copy

    torch.manual_seed(0)
    model = build_backbone(name).eval()
    original = copy.deepcopy(model)
    swapped = 0
    for m in original.modules():
        if type(m).__name__.endswith("OutOfPlace"):
            m.__class__ = type(m).__bases__[0]  # back to torchvision's own forward
            swapped += 1
    assert swapped > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_torchvision_without_dp_keeps_batchnorm():
    assert has_batchnorm(build_backbone("resnet18", dp_compatible=False))


def test_norm_batch_is_non_private_only_and_needs_a_batchnorm_network():
    """RunConfig.norm='batch' keeps torchvision's BatchNorm in a non-private run; refused
    under DP and on the GroupNorm-only small CNNs; at 'group' it leaves run ids as before.
    The profiles' reference_norm reaches the non-private references only."""
    from dpskin_core.book.registry import load_registry
    from dpskin_core.training.config import RunConfig
    from dpskin_core.training.recipes import RECIPES, Params
    from dpskin_core.training.trainer import build_network

    assert has_batchnorm(build_network(RunConfig(backbone="resnet18", norm="batch")))
    assert not has_batchnorm(build_network(RunConfig(backbone="resnet18")))
    assert "norm" not in RunConfig(backbone="resnet18").semantic_dict()
    assert RunConfig(backbone="resnet18", norm="batch").semantic_dict()["norm"] == "batch"
    with pytest.raises(ConfigError, match="norm='batch'.*dp"):
        RunConfig(backbone="resnet18", norm="batch", dp=True, target_epsilon=8.0)
    with pytest.raises(ConfigError, match="norm"):
        RunConfig(backbone="resnet18", norm="layer")
    with pytest.raises(ConfigError, match="'smallcnn' has no BatchNorm"):
        build_network(RunConfig(backbone="smallcnn", norm="batch"))
    p = load_registry().params("cpu")
    fields = {f: getattr(p, f) for f in Params.field_names()}
    q = Params(**{**fields, "backbones": ("resnet18",), "dp_backbones": ("resnet18",),
                  "reference_norm": "batch"})
    assert RECIPES.get("nonprivate-adam").config(q, seed=0).norm == "batch"
    assert RECIPES.get("dp-sgd").config(q, target_epsilon=8.0, seed=0).norm == "group"
    with pytest.raises(ConfigError, match="reference_norm"):
        Params(**{**fields, "reference_norm": "layer"})


@pytest.mark.parametrize("channels, groups", [(64, 32), (16, 8), (24, 12), (40, 20), (3, 1),
                                              (960, 32), (88, 22)])
def test_gn_groups_divide_channels(channels, groups):
    assert gn_groups(channels) == groups and channels % groups == 0


def test_unknown_backbone():
    with pytest.raises(UnknownNameError, match="resnet18"):  # lists the known names
        build_backbone("resnet19")
    with pytest.raises(ConfigError, match="num_classes"):
        build_backbone("smallcnn", num_classes=1)


# ---------------------------------------------------------------- pretrained weights
def _equal_except(a: nn.Module, b: nn.Module, skip_prefix: str = "\0"):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip_prefix))


def test_pretrained_state_dict_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("resnet18")
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_backbone("resnet18")
    assert not _equal_except(src, fresh)
    dst = build_backbone("resnet18", pretrained_path=str(path))
    assert _equal_except(src, dst)
    rep = dst.pretrained_report
    assert rep.skipped_shape == [] and rep.unexpected == [] and rep.missing == []
    assert len(rep.loaded) == len(src.state_dict())


def test_pretrained_other_head_and_checkpoint_dict(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("smallcnn", num_classes=10)
    path = tmp_path / "ckpt.pth"
    # a training checkpoint as Opacus leaves it: wrapped module prefix, extra entries
    sd = {f"_module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": sd, "epoch": 3, "config": {"lr": 0.1}}, path)
    torch.manual_seed(1)
    dst = build_backbone("smallcnn", num_classes=7, pretrained_path=str(path))
    assert _equal_except(src, dst, skip_prefix="classifier.")
    assert sorted(dst.pretrained_report.skipped_shape) == ["classifier.bias", "classifier.weight"]
    assert not torch.equal(dst.classifier.bias, src.classifier.bias[:7])
    assert dst(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_pretrained_batchnorm_weights_into_groupnorm(tmp_path):
    # a BatchNorm checkpoint (e.g. torchvision's): affine weights load, running stats are skipped
    torch.manual_seed(0)
    src = build_backbone("resnet18", dp_compatible=False)
    with torch.no_grad():
        src.bn1.weight.fill_(0.5)
    path = tmp_path / "bn.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = build_backbone("resnet18", pretrained_path=str(path))
    assert not has_batchnorm(dst)
    assert torch.equal(dst.bn1.weight, src.bn1.weight)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert "bn1.running_mean" in dst.pretrained_report.unexpected


def test_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("smallcnn", pretrained_path=str(tmp_path / "missing.pt"))
    torch.save(build_backbone("smallcnn").state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match="no tensor matches"):
        build_backbone("resnet18", pretrained_path=str(tmp_path / "small.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        load_pretrained(build_backbone("smallcnn"), tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "nosd.pt")
    with pytest.raises(ConfigError, match="no state_dict"):
        load_pretrained(build_backbone("smallcnn"), tmp_path / "nosd.pt")


def test_resnet18_stem3_keeps_twice_the_side_of_torchvisions_stem():
    """The small-image stem: a 3x3 stride-1 first convolution, so a 32 px image enters the
    first block at 16 px (torchvision's 7x7 stride-2 stem and max pooling give 8 px); the rest
    of the network is torchvision's ResNet-18 (same tensors but the first convolution)."""
    torch.manual_seed(0)
    small, plain = build_backbone("resnet18_stem3", num_classes=7), build_backbone("resnet18",
                                                                                   num_classes=7)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    sides = {}
    for name, net in (("small", small), ("plain", plain)):
        net.layer1.register_forward_hook(lambda m, i, o, name=name: sides.__setitem__(name, o.shape[-1]))
        net.eval()
        with torch.no_grad():
            assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sides == {"small": 16, "plain": 8}
    a, b = small.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].shape != b[k].shape] == ["conv1.weight"]
