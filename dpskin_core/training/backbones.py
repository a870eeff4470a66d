"""Backbones by name: a small GroupNorm CNN for CPU runs and DP-compatible torchvision models.

Every backbone is built with random initialisation; pretrained weights come only from a
local file the user names (``pretrained_path``), never from the network. With
``dp_compatible=True`` (the default) no BatchNorm is left anywhere: BatchNorm mixes the
statistics of the examples in a batch, so per-example gradients (and therefore DP-SGD's
per-example clipping) would no longer bound one example's influence. It is replaced by
GroupNorm, which normalises each example on its own.

Usage::

    model = build_backbone("resnet18", num_classes=7)
    model = build_backbone("smallcnn", activation="relu")
    model = build_backbone("resnet18", pretrained_path="gn_resnet18.pt")
    model.pretrained_report      # which tensors were loaded / skipped
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..constants import NUM_CLASSES
from ..errors import ConfigError
from ..registry import Registry
from .frontends import COLOUR_DIM, DERM_DIM, SCATTER_CHANNELS

logger = logging.getLogger(__name__)

#: Backbone registry: name -> factory(num_classes: int, dp_compatible: bool, **kwargs) -> nn.Module
BACKBONES: Registry = Registry("backbone")

_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(inplace=False),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=False),
}


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``.

    32 groups (Wu & He, 2018) where that leaves >= 2 channels per group; otherwise the
    largest divisor of ``channels`` not above ``min(32, channels // 2)``, so that groups
    always divide the channels (torchvision widths like 24, 40, 88, 120 are not multiples
    of 32) and never degenerate to one channel per group (InstanceNorm) when avoidable.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    cap = max(1, min(max_groups, channels // 2))
    return max(d for d in range(1, cap + 1) if channels % d == 0)


# --------------------------------------------------------------------------------------
# smallcnn
# --------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A small GroupNorm CNN for 32 px inputs (any side >= 16 px works).

    ``len(widths)`` stages of ``convs_per_stage[i]`` 3x3 conv -> GroupNorm -> activation,
    2x2 pooling between stages (32 -> 16 -> 8 px), global average pooling and a linear
    head. The defaults (widths 32-64-128, convs 1-2-2, ~279k parameters) were chosen by
    measurement: about 610 img/s non-private and 300 img/s with per-sample gradients
    (SGD, batch 128, 32 px, tanh, 2 otherwise idle CPU cores; 16-32-64 was 2-3x faster but
    has only 24k parameters, 2 convs in every stage cost 20% more for 3% more parameters). ``activation="tanh"`` follows the DP-SGD CNNs of Papernot et al. (2021)
    and Tramer & Boneh (2021), whose bounded activations keep clipped gradients informative.

    ``input_stats=True`` joins the :func:`input_colour_stats` of the input image to the pooled
    features before the head (``smallcnn_stats``). GroupNorm removes each image's mean and
    scale per channel group from the first layer on, so without them the network sees a
    lesion's absolute colour only through spatial contrast; the statistics carry it to the
    head directly, without parameters.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        *,
        widths: Sequence[int] = (32, 64, 128),
        convs_per_stage: Union[int, Sequence[int]] = (1, 2, 2),
        activation: str = "tanh",
        pool: str = "max",
        in_channels: int = 3,
        dropout: float = 0.0,
        input_stats: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"smallcnn activation {activation!r} unknown; "
                              f"known: {', '.join(sorted(_ACTIVATIONS))}")
        if pool not in ("max", "avg"):
            raise ConfigError(f"smallcnn pool must be 'max' or 'avg', got {pool!r}")
        widths = tuple(int(w) for w in widths)
        convs = ((int(convs_per_stage),) * len(widths) if isinstance(convs_per_stage, int)
                 else tuple(int(c) for c in convs_per_stage))
        if not widths or len(convs) != len(widths) or min(convs) < 1 or min(widths) < 1:
            raise ConfigError(f"smallcnn widths {widths} and convs_per_stage {convs} must be "
                              "non-empty, positive and of equal length")
        layers: List[nn.Module] = []
        c_in = in_channels
        for i, (w, n) in enumerate(zip(widths, convs)):
            for _ in range(n):
                # no conv bias: GroupNorm's affine shift makes it redundant
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                           nn.GroupNorm(gn_groups(w), w), _ACTIVATIONS[activation]()]
                c_in = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size >= 2**(stages-1) px
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.input_stats = bool(input_stats)
        self.classifier = nn.Linear(c_in + (INPUT_STATS_DIM if self.input_stats else 0),
                                    num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.flatten(self.pool(self.features(x)), 1)
        if self.input_stats:
            f = torch.cat([f, input_colour_stats(x)], 1)
        return self.classifier(self.dropout(f))


#: width of :func:`input_colour_stats`: 3 channels x (mean, std, centre mean)
INPUT_STATS_DIM = 9


def input_colour_stats(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel of ``x`` (N, C=3, H, W; the network's normalised input): the mean
    and standard deviation over all pixels, and the mean over the centre (the middle half of
    each side, where a dermoscopy image's lesion lies), as (N, 9).

    A parameter-free function of one image, differentiable, and invariant to the flips and
    90-degree rotations of the augmentation. The skin's colour is a linear combination of the
    whole and centre means, so the head sees lesion, skin and their contrast.
    """
    if x.dim() != 4 or x.shape[1] != 3:  # 3 channels x 3 statistics = INPUT_STATS_DIM
        raise ConfigError(f"input_colour_stats takes (N, 3, H, W) images, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    centre = x[:, :, h // 4: h - h // 4, w // 4: w - w // 4]
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), centre.mean((2, 3))], 1)


@BACKBONES.register("smallcnn")
def _smallcnn(num_classes: int, dp_compatible: bool = True, **kwargs: Any) -> nn.Module:
    # GroupNorm either way, so private and non-private runs compare the same network
    return SmallCNN(num_classes, **kwargs)


@BACKBONES.register("smallcnn_fast")
def _smallcnn_fast(num_classes: int, dp_compatible: bool = True, **kwargs: Any) -> nn.Module:
    # one conv per stage (~94k parameters): ~1.8x the throughput of "smallcnn" (1100 vs
    # 610 img/s non-private, 670 vs 300 under DP), for sweeps and shadow models
    kwargs.setdefault("convs_per_stage", 1)
    return SmallCNN(num_classes, **kwargs)


@BACKBONES.register("smallcnn_stats")
def _smallcnn_stats(num_classes: int, dp_compatible: bool = True, **kwargs: Any) -> nn.Module:
    # smallcnn_fast whose head also reads the input's colour statistics (+63 parameters):
    # chosen on the validation split under DP-SGD at eps 8 (experiments.yml, cpu profile)
    kwargs.setdefault("convs_per_stage", 1)
    kwargs.setdefault("input_stats", True)
    return SmallCNN(num_classes, **kwargs)


# --------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------
def _replace_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm by GroupNorm (same eps, affine) in place; returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            gn = nn.GroupNorm(gn_groups(c), c, eps=child.eps, affine=child.affine)
            setattr(module, name, gn)
            n += 1
        else:
            n += _replace_batchnorm(child)
    return n


def _no_inplace(module: nn.Module) -> None:
    """Set ``inplace=False`` on every activation/dropout module.

    Opacus' backward hooks see module outputs; an in-place op on such an output breaks
    autograd's view tracking ("modified by an inplace operation").
    """
    for m in module.modules():
        if hasattr(m, "inplace") and isinstance(getattr(m, "inplace"), bool):
            m.inplace = False


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """BatchNorm -> GroupNorm and in-place activations off (in place); returns ``model``."""
    n = _replace_batchnorm(model)
    _no_inplace(model)
    _out_of_place_forwards(model)
    logger.debug("replaced %d BatchNorm layers by GroupNorm", n)
    return model


# torchvision adds residuals in place (``out += identity``) and DenseNet applies
# ``F.relu(..., inplace=True)`` to a norm layer's output. Opacus' full backward hooks wrap
# the outputs of trainable layers, and autograd forbids in-place ops on those wrapped views.
# These forwards are the torchvision ones with out-of-place ops; the module tree and
# state_dict keys are unchanged, only the class of the affected instances is swapped.
def _basicblock_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


def _bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


def _inverted_residual_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # MobileNetV3
    result = self.block(x)
    return result + x if self.use_res_connect else result


def _mbconv_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # EfficientNet (Fused)MBConv
    result = self.block(x)
    return self.stochastic_depth(result) + x if self.use_res_connect else result


def _densenet_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = torch.relu(self.features(x))
    out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, (1, 1)), 1)
    return self.classifier(out)


_SWAPPED: Dict[type, type] = {}


def _out_of_place_forwards(model: nn.Module) -> None:
    """Swap the class of torchvision blocks with in-place forwards (see above)."""
    import torchvision.models as tvm
    from torchvision.models import efficientnet, mobilenetv3, resnet

    forwards: Dict[type, Callable[..., torch.Tensor]] = {
        resnet.BasicBlock: _basicblock_forward, resnet.Bottleneck: _bottleneck_forward,
        mobilenetv3.InvertedResidual: _inverted_residual_forward,
        efficientnet.MBConv: _mbconv_forward, efficientnet.FusedMBConv: _mbconv_forward,
        tvm.DenseNet: _densenet_forward,
    }
    for m in model.modules():
        cls = type(m)
        if cls in forwards:
            if cls not in _SWAPPED:
                name = f"{cls.__name__}OutOfPlace"
                _SWAPPED[cls] = type(name, (cls,), {"forward": forwards[cls],
                                                    "__module__": __name__, "__qualname__": name})
                globals()[name] = _SWAPPED[cls]  # so that torch.save(model) can pickle it
            m.__class__ = _SWAPPED[cls]


def _torchvision(arch: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int, dp_compatible: bool = True, **kwargs: Any) -> nn.Module:
        import torchvision.models as tvm

        # weights=None: random init, nothing is ever downloaded
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes, **kwargs)
        return make_dp_compatible(model) if dp_compatible else model

    factory.__name__ = f"_tv_{arch}"
    factory.__doc__ = f"torchvision {arch}, random init; BatchNorm -> GroupNorm if dp_compatible."
    return factory


for _arch in ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_small",
              "vgg16"):
    BACKBONES.register(_arch)(_torchvision(_arch))


@BACKBONES.register("resnet18_stem3")
def _resnet18_stem3(num_classes: int, dp_compatible: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-18 for small images: a 3x3 stride-1 first convolution in place of torchvision's
    7x7 stride-2 one, its max pooling kept (He et al. 2016's CIFAR ResNets also begin with a
    3x3 stride-1 convolution, but without pooling: this stem halves the side once, theirs not).

    torchvision's stem divides the side by 4 before the first block: a 32 px image reaches the
    last block as 1x1 px. This stem divides it by 2 (32 px: blocks at 16, 8, 4, 2 px, the
    sides torchvision's stem gives a 64 px image), at ~3.5x the compute per image. The blocks,
    widths and head are torchvision's (11.2M parameters).
    """
    model = _torchvision("resnet18")(num_classes, dp_compatible, **kwargs)
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    # torchvision's initialisation of its convolutions
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


# --------------------------------------------------------------------------------------
# heads on the data-independent front ends (training.frontends)
# --------------------------------------------------------------------------------------
class ScatterHead(nn.Module):
    """GroupNorm (per sample: no data statistics) + pooling + a linear classifier, on
    scattering coefficients (243 maps)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = SCATTER_CHANNELS,
                 spatial: int = 4, groups: int = 27) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels, affine=False)
        # pool to spatial x spatial whatever the input size (16 px -> 4x4 maps)
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(spatial), nn.Flatten())
        self.fc = nn.Linear(in_channels * spatial * spatial, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.norm(x)))


class LinearHead(nn.Module):
    """A linear classifier on flat features (bias included), started at zero: the prior (with
    logit adjustment: the balanced prior)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_features: int = COLOUR_DIM) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class StandardisedLinearHead(LinearHead):
    """A linear classifier on standardised features: ``fc((x - shift) * scale)``, started at
    zero. ``shift`` and ``scale`` are buffers (not trained, not clipped, no noise), identity
    until :meth:`standardise` sets them from feature statistics: under DP from a counted
    Gaussian release (:func:`dpskin_core.training.technique.noisy_feature_stats`); they are part
    of the released model."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_features: int = DERM_DIM) -> None:
        super().__init__(num_classes, in_features)
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))

    @torch.no_grad()
    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Features to zero mean and variance 1 / D (D features: the row's norm is about 1,
        the scale the clipping bound and the learning rate were chosen for)."""
        d = self.shift.numel()
        self.shift.copy_(mean)
        self.scale.copy_(1.0 / (std * math.sqrt(d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x.flatten(1) - self.shift) * self.scale)


@BACKBONES.register("derm_linear")
def _derm_linear(num_classes: int, dp_compatible: bool = True, **kw: Any) -> nn.Module:
    return StandardisedLinearHead(num_classes, **kw)


@BACKBONES.register("scatter_linear")
def _scatter_linear(num_classes: int, dp_compatible: bool = True, **kw: Any) -> nn.Module:
    return ScatterHead(num_classes, **kw)


@BACKBONES.register("colour_linear")
def _colour_linear(num_classes: int, dp_compatible: bool = True, **kw: Any) -> nn.Module:
    return LinearHead(num_classes, **kw)


# --------------------------------------------------------------------------------------
# pretrained weights from a local file
# --------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with a checkpoint."""

    path: str
    loaded: List[str] = field(default_factory=list)          # copied into the model
    skipped_shape: List[str] = field(default_factory=list)   # in both, shapes differ (e.g. head)
    unexpected: List[str] = field(default_factory=list)      # in the file only (e.g. BN stats)
    missing: List[str] = field(default_factory=list)         # in the model only (kept at init)

    def summary(self) -> str:
        return (f"{self.path}: loaded {len(self.loaded)} tensors, skipped "
                f"{len(self.skipped_shape)} with mismatched shapes "
                f"({', '.join(self.skipped_shape[:4])}{'...' if len(self.skipped_shape) > 4 else ''}),"
                f" {len(self.unexpected)} unexpected, {len(self.missing)} missing")


_PREFIXES = ("_module.", "module.")  # Opacus GradSampleModule, DataParallel


def _extract_state_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], (Mapping, nn.Module)):
                return _extract_state_dict(obj[key], path)
        sd = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if sd:
            out: Dict[str, torch.Tensor] = {}
            for k, v in sd.items():
                for p in _PREFIXES:
                    while k.startswith(p):
                        k = k[len(p):]
                out[k] = v
            return out
    raise ConfigError(f"pretrained_path {path}: no state_dict found (expected a dict of tensors "
                      "or a checkpoint with a 'model' / 'state_dict' key)")


def load_pretrained(model: nn.Module, path: Union[str, Path]) -> LoadReport:
    """Copy the tensors of the local checkpoint ``path`` into ``model`` (in place).

    Accepts a state_dict or a checkpoint dict with a ``"model"``/``"state_dict"`` key;
    ``module.``/``_module.`` prefixes are stripped. Tensors whose name is unknown to the
    model or whose shape differs (e.g. a classifier head for another number of classes)
    are skipped and reported. Raises :class:`ConfigError` if the file is missing,
    unreadable, or nothing is loaded.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"pretrained_path {p}: file not found (weights are only read from "
                          "a local file; nothing is downloaded)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects beyond plain tensors/dicts
        raise ConfigError(f"pretrained_path {p}: cannot read it as a torch checkpoint ({e})") from e
    sd = _extract_state_dict(obj, str(p))
    own = model.state_dict()
    report = LoadReport(str(p))
    to_load: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.skipped_shape.append(k)
        else:
            to_load[k] = v
    # num_batches_tracked etc. are buffers that carry no learned information
    if not any(own[k].is_floating_point() for k in to_load):
        raise ConfigError(f"pretrained_path {p}: no tensor matches the model "
                          f"({len(sd)} in the file, e.g. {', '.join(list(sd)[:3])}; the model "
                          f"has e.g. {', '.join(list(own)[:3])})")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(set(own) - set(to_load))
    logger.info("pretrained weights %s", report.summary())
    return report


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------
def build_backbone(
    name: str,
    num_classes: int = NUM_CLASSES,
    *,
    pretrained_path: Optional[str] = None,
    dp_compatible: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone registered as ``name`` with a ``num_classes``-way head.

    ``dp_compatible=True`` guarantees no BatchNorm (GroupNorm instead) and no in-place
    activations, so Opacus' ``ModuleValidator.validate`` finds no error. ``kwargs`` go to
    the factory (e.g. ``activation``/``widths`` for smallcnn). With ``pretrained_path``
    the weights of that local file are loaded after the BatchNorm replacement, and the
    :class:`LoadReport` is attached as ``model.pretrained_report``.
    Raises :class:`UnknownNameError` for an unknown name and :class:`ConfigError` for a
    bad ``num_classes`` or checkpoint.
    """
    factory = BACKBONES.get(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
    model = factory(num_classes, dp_compatible=dp_compatible, **kwargs)
    if pretrained_path is not None:
        model.pretrained_report = load_pretrained(model, pretrained_path)  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm (1d/2d/3d/Sync) module is left in ``model``."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["BACKBONES", "LinearHead", "ScatterHead", "SmallCNN", "LoadReport", "build_backbone", "count_parameters",
           "gn_groups", "has_batchnorm", "load_pretrained", "make_dp_compatible"]
