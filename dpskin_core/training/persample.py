"""How DP-SGD's per-sample gradients are computed: engines by name (``grad_sample_mode``).

Every engine feeds the same Opacus ``DPOptimizer`` (clip each sample's gradient to
``max_grad_norm``, sum, add N(0, sigma^2 C^2), divide by the expected batch size) and the same
accountant; they differ only in how the per-sample gradients (or their norms) are obtained, so
they give the same update up to floating-point rounding (a test checks it for every image
backbone):

========== ============================================================================
``fast``   this module's engine: per-sample gradients from Opacus' per-layer formulas, with
           the parameters frozen during the forward pass, so autograd computes input
           gradients only and not the summed weight gradient that DP-SGD throws away (the
           hooks mode computes both); 3x3 convolutions at large spatial size use one grouped
           weight-gradient convolution for the whole batch instead of unfold + matmul.
``hooks``  Opacus' module hooks (the reference).
``ew``     PyTorch's ExpandedWeights through Opacus.
``functorch`` Opacus' hooks with ``torch.func`` per-sample gradients for every layer.
``ghost``  Opacus' fast gradient clipping (ghost clipping): per-sample norms without
           per-sample gradients, then a second backward pass of the re-weighted loss.
``bk``     this module's book-keeping engine (:class:`BookKeeping`): one backward pass,
           per-sample norms layer by layer (ghost norm where it is cheaper, else from the
           per-sample gradient), then the clipped sum as one re-weighted weight gradient.
========== ============================================================================

``auto`` (the default) takes the first of ``bk``, ``fast``, ``hooks`` that serves the backbone's
layers and the run's settings (``benchmarks/bench_dp_modes.py`` measures them side by side).
``ghost`` and ``bk`` compute no per-sample gradient rows, so they refuse augmentation
multiplicity (views averaged before clipping) and lesion-level units (images summed before
clipping); ``ghost`` also refuses physical batch splitting and the logit-adjusted loss (its
loss wrapper needs a per-sample loss). A refusal names the mode and the setting, before any
run folder exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry


@dataclass(frozen=True)
class GradSampleMode:
    """One engine: the mode Opacus' ``make_private`` is given, and whether per-sample rows
    exist (needed to average views, sum a lesion's images or split physical batches)."""

    name: str
    opacus_mode: str
    per_sample_rows: bool
    summary: str
    #: backbones the mode is known to fail on (found by tests/test_persample.py), with why
    refused_backbones: Tuple[Tuple[str, str], ...] = ()
    #: settings it cannot serve, of aug_mult, privacy_unit, max_physical_batch_size, logit_adjust
    refuses: Tuple[str, ...] = ()

    def refusal(self, model: Optional[nn.Module] = None, *, aug_mult: int = 1, privacy_unit: str = "image",
                max_physical_batch_size: Optional[int] = None, logit_adjust: bool = False,
                backbone: str = "?") -> Optional[str]:
        """Why this mode cannot train ``model`` with these settings (None: it can); without a
        model only the settings are checked."""
        for field, bad, what, why in (
                ("aug_mult", aug_mult > 1, f"aug_mult={aug_mult}",
                 "averages per-sample gradients over views before clipping"),
                ("privacy_unit", privacy_unit != "image", f"privacy_unit={privacy_unit!r}",
                 "sums a lesion's per-sample gradients before clipping"),
                ("max_physical_batch_size", max_physical_batch_size is not None,
                 f"max_physical_batch_size={max_physical_batch_size}",
                 "accumulates per-sample gradients over physical batches"),
                ("logit_adjust", logit_adjust, "logit_adjust=True",
                 "needs a per-sample loss the two-pass wrapper can re-weight")):
            if bad and field in self.refuses:
                return (f"grad_sample_mode={self.name!r} computes no per-sample gradients, "
                        f"but {what} {why}; use 'fast' or 'hooks'")
        for name, why in self.refused_backbones:
            if backbone == name:
                return f"grad_sample_mode={self.name!r} cannot train backbone {name!r}: {why}"
        if self.name in ("fast", "bk") and model is not None:
            missing = unsupported_layers(model)
            if missing:
                return (f"grad_sample_mode={self.name!r} has no per-sample gradient for the "
                        f"{', '.join(missing)} layer(s) of backbone {backbone!r}; use 'hooks'")
        return None

    def attach(self, model: nn.Module, max_grad_norm: float) -> Optional["FastGradSample"]:
        """This module's engine on ``model`` (``fast``, ``bk``), before Opacus wraps it with
        ``no_op``; None for Opacus' own engines."""
        if self.name == "fast":
            return FastGradSample(model)
        if self.name == "bk":
            return BookKeeping(model, max_grad_norm)
        return None


GRAD_SAMPLE_MODES: Registry = Registry("grad_sample_mode")
for _m in (GradSampleMode("fast", "no_op", True, "per-sample gradients, no summed weight gradient"),
           GradSampleMode("hooks", "hooks", True, "Opacus' module hooks (reference)"),
           GradSampleMode("ew", "ew", True, "PyTorch ExpandedWeights", refused_backbones=(
               ("densenet121", "PyTorch's ExpandedWeights convolution fails on its concatenated "
                               "(non-contiguous) feature maps; use 'fast' or 'hooks'"),)),
           GradSampleMode("functorch", "functorch", True, "torch.func per-sample gradients"),
           GradSampleMode("ghost", "ghost", False, "Opacus' ghost clipping (two backward passes)",
                          refuses=("aug_mult", "privacy_unit", "max_physical_batch_size",
                                   "logit_adjust")),
           GradSampleMode("bk", "no_op", False, "book-keeping: per-sample norms (ghost or "
                          "instantiated per layer), one re-weighted weight gradient",
                          refuses=("aug_mult", "privacy_unit"))):
    GRAD_SAMPLE_MODES.register(_m.name)(_m)
#: what ``auto`` tries, in order: measured fastest first (benchmarks/bench_dp_modes.py)
AUTO_ORDER = ("bk", "fast", "hooks")
#: every value of RunConfig.grad_sample_mode
MODE_CHOICES = ("auto", *GRAD_SAMPLE_MODES.names())


def resolve_mode(name: str, model: nn.Module, backbone: str = "?", **settings) -> GradSampleMode:
    """The engine for ``name`` ("auto": the first of :data:`AUTO_ORDER` that serves the model
    and the settings); raises :class:`ConfigError` naming mode, backbone and setting when an
    explicitly named mode cannot serve them."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            mode = GRAD_SAMPLE_MODES.get(candidate)
            if mode.refusal(model, backbone=backbone, **settings) is None:
                return mode
    mode = GRAD_SAMPLE_MODES.get(name)
    why = mode.refusal(model, backbone=backbone, **settings)
    if why:
        raise ConfigError(why)
    return mode


# --------------------------------------------------------------------------- the fast engine
def _samplers() -> Dict[type, Callable]:
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS


def trainable_layers(model: nn.Module) -> List[nn.Module]:
    """Modules that own trainable parameters directly."""
    return [m for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def unsupported_layers(model: nn.Module) -> List[str]:
    """Names of the layer types of ``model`` the fast engine has no formula for."""
    known = _samplers()
    return sorted({type(m).__name__ for m in trainable_layers(model) if type(m) not in known})


#: 3x3 convolutions whose output has at least this many positions (H x W) take the grouped
#: weight-gradient path; below it unfold + batched matmul was faster (2 CPU cores, fp32)
GROUPED_MIN_POSITIONS = 256


def conv2d_grad_sample(layer: nn.Conv2d, a: torch.Tensor,
                       g: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d from its input ``a`` (n, Cin, H, W) and output gradient
    ``g`` (n, Cout, H', W'): the batch becomes ``n * groups`` groups of one convolution, whose
    weight gradient (n*Cout, Cin/groups, k, k) holds every sample's gradient. Falls back to
    Opacus' formula (unfold + einsum) for small outputs and string paddings."""
    n = a.shape[0]
    positions = g.shape[2] * g.shape[3]
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return _samplers()[nn.Conv2d](layer, [a], g)
    if positions < GROUPED_MIN_POSITIONS:
        return _unfold_grad_sample(layer, a, g) if layer.groups > 1 \
            else _samplers()[nn.Conv2d](layer, [a], g)
    w = layer.weight
    # only the weight's shape is read when just the weight gradient is asked for: a stride-0 view
    shape_only = torch.zeros((), dtype=a.dtype, device=a.device).expand(n * w.shape[0], *w.shape[1:])
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * w.shape[0], *g.shape[2:]), a.reshape(1, n * a.shape[1], *a.shape[2:]),
        shape_only, None, layer.stride, layer.padding, layer.dilation, False, (0, 0),
        n * layer.groups, (False, True, False))
    out = {w: gw.reshape(n, *w.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=(2, 3))
    return out


def _unfold_grad_sample(layer: nn.Conv2d, a: torch.Tensor,
                        g: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a grouped (e.g. depthwise) Conv2d by unfold + one product per
    group. Opacus' formula multiplies every output channel with every input column and then
    keeps the block diagonal, ``groups`` times the work: for MobileNetV3-small's depthwise
    layers at 32 px that product was ~80 % of a DP step (batch 256, 2 CPU cores)."""
    from opacus.utils.tensor_utils import unfold2d

    n, G = a.shape[0], layer.groups
    A = unfold2d(a, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                 dilation=layer.dilation)                 # (n, Cin * kh * kw, T)
    T = A.shape[-1]
    A = A.reshape(n, G, -1, T)                            # (n, G, Cin/G * kh * kw, T)
    B = g.reshape(n, G, -1, T)                            # (n, G, Cout/G, T)
    out = {layer.weight: torch.matmul(B, A.transpose(2, 3)).reshape(n, *layer.weight.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=(2, 3))
    return out


class FastGradSample:
    """Attach the fast engine to ``model`` (before Opacus wraps it with ``no_op``).

    A forward pre-hook on the module the trainer calls (:meth:`bind`: Opacus' wrapper, which
    calls ``model.forward`` directly, past ``model``'s own hooks) freezes the trainable
    parameters for the forward pass (autograd then records no weight gradients) and its
    forward hook thaws them;
    each trainable layer keeps its input and, through a hook on its output, receives the
    output's gradient, from which it writes ``p.grad_sample`` (n, *p.shape) of the per-sample
    loss (the mean-reduced loss's gradient times n, as Opacus' hooks scale it). A layer whose
    input needs no gradient (the first one) gets a detached output that does, so backward
    stops there. ``remove()`` detaches every hook.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = trainable_layers(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._saved: Dict[nn.Module, List[torch.Tensor]] = {}
        self._fresh: set = set()  # parameters written in this backward pass
        self._handles = [m.register_forward_hook(self._capture) for m in self.layers]
        self.bind(model)

    def bind(self, root: nn.Module) -> "FastGradSample":
        """Freeze and thaw around the forward passes of ``root`` (the module called in training)."""
        for h in self._handles[len(self.layers):]:
            h.remove()
        del self._handles[len(self.layers):]
        self._handles += [root.register_forward_pre_hook(self._freeze),
                          root.register_forward_hook(self._thaw)]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _active(self) -> bool:
        return torch.is_grad_enabled() and self.model.training

    def _freeze(self, module: nn.Module, args: Tuple) -> None:
        if self._active():
            self._fresh = set()
            for p in self.params:
                p.requires_grad_(False)

    def _thaw(self, module: nn.Module, args: Tuple, out: torch.Tensor) -> None:
        for p in self.params:
            p.requires_grad_(True)

    def _capture(self, layer: nn.Module, args: Tuple, out: torch.Tensor):
        if not self._active():
            return None
        self._saved.setdefault(layer, []).append(args[0].detach())
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        out.register_hook(lambda g, layer=layer: self._grad_sample(layer, g))
        return out

    @torch.no_grad()
    def _grad_sample(self, layer: nn.Module, g: torch.Tensor) -> None:
        a = self._saved[layer].pop()  # backward visits a reused layer's calls in reverse
        # oneDNN may hand over channels-last tensors (small maps on CPU); Opacus' unfold2d
        # reads its input as contiguous and silently returns wrong rows for them
        a, g = a.contiguous(), g.detach().contiguous()
        n = g.shape[0]
        params = [p for p in layer.parameters(recurse=False)]
        if n == 0:  # an empty Poisson batch: no rows (the optimizer clips nothing, adds noise)
            grads = {p: p.new_zeros((0, *p.shape)) for p in params}
        else:  # (the parameters require grad again: the model's forward hook thawed them)
            grads = (conv2d_grad_sample(layer, a, g) if type(layer) is nn.Conv2d
                     else _samplers()[type(layer)](layer, [a], g))
        shared = g.untyped_storage().data_ptr()
        for p, gs in grads.items():
            # per-sample loss = n x (mean-reduced loss); a formula may return a view of g (a bias
            # of a 2-D layer), which is the gradient flowing on: never scale that in place
            if n:
                gs = gs * n if gs.untyped_storage().data_ptr() == shared else gs.mul_(n)
            if p in self._fresh:
                p.grad_sample = p.grad_sample + gs
            else:
                p.grad_sample = gs
                self._fresh.add(p)


class BookKeeping(FastGradSample):
    """The ``bk`` engine (book-keeping, Bu et al. 2023): one backward pass keeps each layer's
    input and output gradient; when the last layer's gradient arrives, every sample's gradient
    norm is computed layer by layer, by the ghost norm ``<A_i A_i^T, G_i G_i^T>`` (T x T Gram
    matrices over the T output positions) where ``2 T^2 < d p`` (d inputs, p outputs per
    position), else from the instantiated per-sample gradient; then each parameter's
    ``p.grad`` is set to the clipped sum ``sum_i min(1, C / (|g_i| + 1e-6)) g_i``, computed
    as one weight gradient of the re-weighted output gradients (or from the rows where they
    were instantiated). Opacus' ``DPOptimizerFastGradientClipping`` then adds the noise, exactly
    as after its own ghost clipping. Accumulating over physical batches adds clipped sums.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        super().__init__(model)
        self.max_grad_norm = float(max_grad_norm)
        self._kept: List[Tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._pending = 0
        #: per-sample gradient norms (n,) of the last batch, of the per-sample losses
        self.last_norms: Optional[torch.Tensor] = None

    def _freeze(self, module: nn.Module, args: Tuple) -> None:
        super()._freeze(module, args)
        if self._active():
            self._kept, self._pending = [], 0

    def _capture(self, layer: nn.Module, args: Tuple, out: torch.Tensor):
        out = super()._capture(layer, args, out)
        if out is not None:
            self._pending += 1
        return out

    @torch.no_grad()
    def _grad_sample(self, layer: nn.Module, g: torch.Tensor) -> None:
        # contiguous: see FastGradSample._grad_sample (channels-last tensors from oneDNN)
        self._kept.append((layer, self._saved[layer].pop().contiguous(), g.detach().contiguous()))
        self._pending -= 1
        if self._pending == 0:  # the whole backward pass is in: norms, then clipped sums
            self._clipped_sums()

    def _layer_terms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor):
        """(squared per-sample norm of the layer's gradients (n,), rows or None): rows are the
        instantiated per-sample gradients {param: (n, ...)}; None means the ghost path."""
        n = g.shape[0]
        if type(layer) is nn.Linear and a.dim() == 2:
            sq = (g * g).sum(1) * (a * a).sum(1)
            if layer.bias is not None:
                sq = sq + (g * g).sum(1)
            return sq, None
        if type(layer) is nn.Conv2d and layer.groups == 1 and not isinstance(layer.padding, str) \
                and layer.padding_mode == "zeros":
            positions = g.shape[2] * g.shape[3]
            d, p = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1], layer.out_channels
            if 2 * positions ** 2 < d * p:
                from opacus.utils.tensor_utils import unfold2d

                A = unfold2d(a, kernel_size=layer.kernel_size, padding=layer.padding,
                             stride=layer.stride, dilation=layer.dilation)  # (n, d, T)
                G = g.reshape(n, p, -1)                                     # (n, p, T)
                sq = (torch.bmm(A.transpose(1, 2), A) * torch.bmm(G.transpose(1, 2), G)).sum((1, 2))
                if layer.bias is not None:
                    sq = sq + G.sum(2).pow(2).sum(1)
                return sq, None
        rows = (conv2d_grad_sample(layer, a, g) if type(layer) is nn.Conv2d
                else _samplers()[type(layer)](layer, [a], g))
        sq = sum(r.reshape(n, -1).pow(2).sum(1) for r in rows.values())
        return sq, rows

    def _clipped_sums(self) -> None:
        kept, self._kept = self._kept, []
        n = kept[0][2].shape[0] if kept else 0
        if n == 0:  # an empty Poisson batch: the clipped sum is zero (the noise comes next)
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return
        terms = [self._layer_terms(layer, a, g) for layer, a, g in kept]
        # gradients of the per-sample losses are n x those of the mean-reduced loss
        norms = torch.sqrt(sum(sq for sq, _ in terms)) * n
        self.last_norms = norms
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * n  # n: as above
        for (layer, a, g), (_, rows) in zip(kept, terms):
            if rows is not None:
                grads = {q: torch.einsum("i,i...->...", factor, r) for q, r in rows.items()}
            else:
                gw = g * factor.view(-1, *([1] * (g.dim() - 1)))
                grads = self._weight_grad(layer, a, gw)
            for q, v in grads.items():
                q.grad = v if q.grad is None else q.grad + v

    @staticmethod
    def _weight_grad(layer: nn.Module, a: torch.Tensor, gw: torch.Tensor):
        """The summed gradient of ``layer``'s parameters for output gradient ``gw``."""
        if type(layer) is nn.Linear:
            out = {layer.weight: gw.t() @ a}
            if layer.bias is not None:
                out[layer.bias] = gw.sum(0)
            return out
        _, w, _ = torch.ops.aten.convolution_backward(
            gw, a, layer.weight, None, layer.stride, layer.padding, layer.dilation, False,
            (0, 0), layer.groups, (False, True, False))
        out = {layer.weight: w}
        if layer.bias is not None:
            out[layer.bias] = gw.sum((0, 2, 3))
        return out


__all__ = ["AUTO_ORDER", "BookKeeping", "FastGradSample", "GRAD_SAMPLE_MODES", "GradSampleMode", "MODE_CHOICES",
           "conv2d_grad_sample", "resolve_mode", "trainable_layers", "unsupported_layers"]
