"""Class weights under per-example clipping: why the DP baselines remedy imbalance with a
noisy class prior instead.

Weighting example ``i``'s loss by ``w[y_i]`` multiplies its gradient by ``w[y_i]``; DP-SGD then
clips every gradient to norm at most ``C``. A weighted gradient longer than ``C`` comes out at
exactly ``C`` whatever its weight, so a weight survives only for the examples whose weighted
gradient stays below ``C`` -- and in DP training nearly every gradient is longer than ``C``
(the clipping bound is chosen small, so that the noise ``sigma C`` is small). Up-weighting a rare
class is then undone, and down-weighting a frequent one survives only where gradients are
short. :func:`effective_class_weights` measures this on a model's per-example gradients.

The weights shown are public: inverse frequencies of the class counts HAM10000 published
(:data:`~dpskin_core.constants.HAM10000_COUNTS`), not counts of the private training split.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..constants import CLASSES, HAM10000_COUNTS
from ..errors import ConfigError
from ..training.technique import balanced_weights


def published_balanced_weights() -> np.ndarray:
    """Inverse-frequency ("balanced") class weights ``N / (K n_c)`` from the published HAM10000
    class counts, in the order of :data:`CLASSES` (public: they cost no privacy budget)."""
    return balanced_weights(np.array([HAM10000_COUNTS[c] for c in CLASSES], dtype=np.float64))


def per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           batch: int = 128) -> np.ndarray:
    """L2 norm of the gradient of every example's (unweighted) cross-entropy loss with respect
    to all trainable parameters of ``model``: what DP-SGD clips. ``x`` are model inputs."""
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    norms = []
    for i in range(0, len(x), batch):
        g = per_example(params, x[i:i + batch], y[i:i + batch])
        sq = sum(v.flatten(1).pow(2).sum(1) for v in g.values())
        norms.append(sq.sqrt().cpu())
    return torch.cat(norms).double().numpy()


def effective_class_weights(norms: np.ndarray, y: np.ndarray, weights: Sequence[float],
                            max_grad_norm: float,
                            classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Per class: the nominal weight ``w_c`` and its effective weight after clipping to
    ``max_grad_norm`` (C) -- the summed clipped gradient norm of the class's examples weighted,
    over the same sum unweighted, ``sum min(w_c |g_i|, C) / sum min(|g_i|, C)``. Without
    clipping it equals ``w_c``; when every gradient is clipped it is 1 (the weight is undone).
    Also the share of the class's examples whose gradient is clipped, unweighted and weighted.
    Classes without examples are left out."""
    norms, y = np.asarray(norms, dtype=np.float64), np.asarray(y)
    w = np.asarray(weights, dtype=np.float64)
    if norms.shape != y.shape:
        raise ConfigError(f"effective_class_weights: {norms.shape[0]} norms for {y.shape[0]} labels")
    if len(w) != len(classes) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError(f"effective_class_weights: weights must be {len(classes)} finite "
                          f"positive numbers, got {list(w)}")
    if not (np.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"effective_class_weights: max_grad_norm must be > 0, got {max_grad_norm}")
    rows = []
    for c, name in enumerate(classes):
        n = norms[y == c]
        if not len(n):
            continue
        plain = np.minimum(n, max_grad_norm).sum()
        weighted = np.minimum(w[c] * n, max_grad_norm).sum()
        rows.append({"class": name, "examples": int(len(n)), "nominal weight": float(w[c]),
                     "effective weight": float(weighted / plain) if plain > 0 else float("nan"),
                     "clipped (unweighted)": float((n > max_grad_norm).mean()),
                     "clipped (weighted)": float((w[c] * n > max_grad_norm).mean()),
                     "median |g|": float(np.median(n))})
    return pd.DataFrame(rows)


def clipping_table(models: Mapping[str, nn.Module], x: torch.Tensor, y: np.ndarray,
                   max_grad_norm: float, weights: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """:func:`effective_class_weights` of every model (by label) on the same examples, with the
    published balanced weights unless ``weights`` are given; a ``model`` column added."""
    w = published_balanced_weights() if weights is None else weights
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long, device=x.device)
    frames = []
    for label, model in models.items():
        model.eval()
        norms = per_example_grad_norms(model, x, yt)
        frames.append(effective_class_weights(norms, y, w, max_grad_norm).assign(model=label))
    return pd.concat(frames, ignore_index=True)


def run_clipping_table(cfg, runs_root, n: int = 1024, seed: int = 0) -> pd.DataFrame:
    """:func:`clipping_table` for one DP run (read back, or trained into ``runs_root``): its
    released model and a fresh initialisation of its network, at its clipping bound, on up to
    ``n`` validation images (a random subset drawn with the public ``seed``)."""
    from ..data.datasets import load_data
    from ..training import run
    from ..training.checkpoint import released_weights
    from ..training.frontends import Inputs
    from ..training.quiet import benign_warnings_silenced
    from ..training.trainer import build_network, data_spec, init_seed, pick_device

    if not cfg.dp:
        raise ConfigError(f"run_clipping_table: run {cfg.name!r} is not private (no clipping)")
    with benign_warnings_silenced():
        res = run(cfg, runs_root)
    device = pick_device(cfg.device)
    data = load_data(data_spec(cfg))
    inputs = Inputs(cfg, data, device)
    pick = np.sort(np.random.default_rng(seed).permutation(len(data.y_val))[:n])
    x = inputs.eval(inputs.val_x[torch.as_tensor(pick)])
    torch.manual_seed(init_seed(cfg.seed))
    fresh = build_network(cfg).to(device)
    trained = build_network(cfg).to(device)
    trained.load_state_dict(released_weights(res.run_dir / "checkpoints",
                                             cfg.early_stopping_patience is not None)[0])
    return clipping_table({"initialisation": fresh, "released": trained}, x,
                          data.y_val[pick], cfg.max_grad_norm)


def effective_weights_figure(table: pd.DataFrame):
    """Nominal against effective class weight (log scale), one panel per model."""
    import seaborn as sns

    long = table.melt(id_vars=["class", "model"], value_vars=["nominal weight", "effective weight"],
                      var_name="weight", value_name="value")
    g = sns.catplot(long, x="class", y="value", hue="weight", col="model", kind="bar",
                    height=3.2, aspect=1.3)
    g.set(yscale="log", ylabel="weight (log scale)")
    return g


__all__ = ["clipping_table", "effective_class_weights", "effective_weights_figure",
           "per_example_grad_norms", "published_balanced_weights", "run_clipping_table"]
