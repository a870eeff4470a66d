"""MpLe end to end: the data provider ships morphed data, the service provider trains on it.

The **data provider** (:func:`provide`) draws the key M and the permutation P from its own
secret (63 bits of OS entropy kept in ``<root>/private/secret.json``, never published; one key
per training seed), morphs the normalised images of every split once and ships them
(``<root>/shipped/<data>/seed<s>/<split>.npz``: morphed rows, labels, the key's fingerprint;
never the key), with the augmented layer ``C_ac = M^-1 C_r P`` of the network's first
convolution C_r. C_r is the run's seeded initialisation (the service provider's public
architecture and seed; or ``pretrained_path``): MoLe's workflow, in which the provider builds
C_ac from the first layer the service provider chose.

The **service provider** (:func:`train`) reads the shipped rows, applies the frozen C_ac to
each once (its output never changes: C_ac is frozen, and a morphed sample cannot be flipped or
rotated without the key, so there is no augmentation) and trains the rest of the network on
those feature maps through ``run`` (``features="given"``; DP-SGD when the recipe is private:
the privacy unit is still one image, whose morphed row is one training example).

Everything lives under ``<runs_root>/mple/<spec>-<version>/``: the version hashes this
subpackage's sources, so a change to the scheme's code gives new runs (``run`` ids hash the
training code only). Run folders inside are ``run``'s own.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..attacks.membership import heldout_members, loss_threshold_game
from ..data.datasets import DataBundle, load_data
from ..errors import ConfigError
from ..files import read_json, write_json
from ..training import RunConfig, RunResult, run
from ..training.augment import normaliser, to_float
from ..training.trainer import build_network
from ..training.checkpoint import dp_seed, released_weights
from ..training.quiet import benign_warnings_silenced
from ..training.records import (default_runs_root, is_complete, load_run, prediction_shift,
                                run_dir_for)
from ..training.trainer import check_against_data, data_spec, init_seed
from .keys import KEY_KINDS, KeySpec, MorphKey, make_key
from .layer import build_mple, split_first_conv
from .morph import read_morphed, write_morphed

PathLike = Union[str, Path]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MpleSpec:
    """The scheme's choices: the key's construction (``kind`` in :data:`KEY_KINDS`, with
    ``blocks`` diagonal blocks for ``"block"``). The key's seed is the provider's secret."""

    kind: str = "dense"
    blocks: int = 1

    def __post_init__(self) -> None:
        KEY_KINDS.get(self.kind)
        if not isinstance(self.blocks, (int, np.integer)) or self.blocks < 1:
            raise ConfigError(f"mple blocks must be a positive integer, got {self.blocks!r}")
        if self.kind == "dense" and self.blocks != 1:
            raise ConfigError(f"mple kind 'dense' takes blocks=1, got {self.blocks}")

    @property
    def name(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}{self.blocks}"

    def key_spec(self, image_size: int, seed: int) -> KeySpec:
        return KeySpec(image_size, kind=self.kind, blocks=self.blocks, seed=seed)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def mple_version() -> str:
    """Hash of this subpackage's sources (12 hex digits)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def mple_root(spec: MpleSpec, runs_root: Optional[PathLike] = None) -> Path:
    """The folder of the scheme ``spec``: its secret, shipped data and runs."""
    root = Path(runs_root) if runs_root is not None else default_runs_root()
    return root / "mple" / f"{spec.name}-{mple_version()}"


def _data_id(cfg: RunConfig) -> str:
    d = asdict(data_spec(cfg))
    d.pop("cache_dir", None)  # where decoded images are cached changes nothing
    return _digest({**d, "normalisation": cfg.normalisation})


# --------------------------------------------------------------------------- the data provider
@dataclass
class Provided:
    """What the provider holds (``key``, ``perm``: secret) and ships (``shipped``, ``augmented``)."""

    key: MorphKey
    perm: np.ndarray
    augmented: nn.Module          # the frozen C_ac (AugmentedConv)
    first_layer: nn.Conv2d        # C_r: the service provider's choice (public to it)
    rest: nn.Module               # the network after C_r, at its initialisation
    shipped: Dict[str, Path]      # split -> .npz of morphed rows and labels


def normalised(x_uint8: np.ndarray, cfg: RunConfig) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> float (N, 3, S, S) with the run's public constants."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2)
    return to_float(x, *normaliser(cfg.normalisation, torch.device("cpu")))


def provide(cfg: RunConfig, spec: MpleSpec, data: DataBundle, root: Path) -> Provided:
    """The provider's side for training seed ``cfg.seed``: key, permutation, C_ac, shipped data
    (written once; a shipped file is reused when its fingerprint is the key's)."""
    if cfg.features != "given":
        raise ConfigError(f"mple: a morphed-data run takes features='given', got {cfg.features!r}")
    secret = dp_seed(root / "private", "secret", cfg.seed)
    key_seed, perm_seed = (int(_digest([secret, what, cfg.seed]), 16) for what in ("key", "perm"))
    key = make_key(spec.key_spec(cfg.image_size, key_seed))
    torch.manual_seed(init_seed(cfg.seed))  # C_r and the rest: the plain run's initialisation
    plain = build_network(cfg, pretrained=True)
    net, perm = build_mple(plain, key, perm_seed)
    conv, _ = split_first_conv(plain)
    folder = root / "shipped" / _data_id(cfg) / f"seed{cfg.seed}"
    shipped = {}
    for split in SPLITS:
        path = folder / f"{split}.npz"
        if path.is_file():
            try:
                read_morphed(path, key)
            except ConfigError:  # made with another key (a new secret): ship again
                path.unlink()
        if not path.is_file():
            write_morphed(path, normalised(getattr(data, f"x_{split}"), cfg),
                          getattr(data, f"y_{split}"), key)
        shipped[split] = path
    write_json(folder / "key.json", {"fingerprint": key.fingerprint, "condition": key.condition,
                                      "d": key.d, "kind": spec.kind, "blocks": spec.blocks})
    return Provided(key, perm, net.augmented, conv, net.rest, shipped)


# --------------------------------------------------------------------------- the service provider
@torch.no_grad()
def feature_maps(augmented: nn.Module, z: torch.Tensor, batch: int = 256) -> np.ndarray:
    """``z C_ac`` of shipped rows ``z`` (n, d), flattened: (n, Cout H' W') float32."""
    out = [augmented(z[i:i + batch]).reshape(min(batch, len(z) - i), -1) for i in range(0, len(z), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def service_model(rest: nn.Module, out_shape: Tuple[int, int, int]) -> nn.Module:
    """The trained part: the rest of the network on C_ac's (flattened) feature maps."""
    return nn.Sequential(nn.Unflatten(1, tuple(out_shape)), copy.deepcopy(rest))


@dataclass
class MpleRun:
    """A finished MpLe run: ``run``'s result, the key's public record and membership inference."""

    result: RunResult
    key: Dict[str, Any]
    membership: Dict[str, Any]


def plain_membership(run_dir: PathLike, data: DataBundle) -> Dict[str, Any]:
    """:func:`train`'s membership inference on a plain run (its released model on images)."""
    from ..attacks.victims import load_trained

    m = load_trained(run_dir)
    pick = heldout_members(len(data.y_train), len(data.y_test), m.config.seed)
    n = len(pick)
    return loss_threshold_game(m.logits(data.x_train[pick]), data.y_train[pick],
                       m.logits(data.x_test[:n]), data.y_test[:n])


def train(cfg: RunConfig, spec: MpleSpec = MpleSpec(), runs_root: Optional[PathLike] = None, *,
          data: Optional[DataBundle] = None) -> MpleRun:
    """Train ``cfg`` (a ``mple/*`` recipe's config) on morphed data: the provider ships, the
    service provider trains the rest behind the frozen augmented layer. Cached: a finished run
    is read back without building the key again."""
    root = mple_root(spec, runs_root)
    run_dir = run_dir_for(cfg, root)
    mia_path = root / "membership" / f"{run_dir.name}.json"
    folder = root / "shipped" / _data_id(cfg) / f"seed{cfg.seed}"
    if is_complete(run_dir) and mia_path.is_file():
        return MpleRun(run(cfg, root), read_json(folder / "key.json"), read_json(mia_path))
    data = data if data is not None else load_data(data_spec(cfg))
    check_against_data(cfg.replace(features="pixels"), data)  # the images, before any key
    provided = provide(cfg, spec, data, root)
    feats, ys = {}, {}
    for split, path in provided.shipped.items():
        z, y, _ = read_morphed(path, provided.key)
        feats[split], ys[split] = feature_maps(provided.augmented, z), y
    served = replace(data, x_train=feats["train"], x_val=feats["val"], x_test=feats["test"],
                     y_train=ys["train"], y_val=ys["val"], y_test=ys["test"])
    shape = provided.augmented.out_shape
    result = run(cfg, root, data=served,
                 model_factory=lambda: service_model(provided.rest, shape))
    model = service_model(provided.rest, shape)
    weights, _, _ = released_weights(result.run_dir / "checkpoints",
                                     cfg.early_stopping_patience is not None)
    model.load_state_dict(weights)
    model.eval()
    pick = heldout_members(len(ys["train"]), len(ys["test"]), cfg.seed)
    # the released predictor: the network plus the shift of a run that kept part of its prior
    shift = prediction_shift(result.meta)
    shift = 0.0 if shift is None else shift
    with torch.no_grad():
        lm, lo = (model(torch.from_numpy(f)).double().numpy() + shift
                  for f in (feats["train"][pick], feats["test"][:len(pick)]))
    mia = loss_threshold_game(lm, ys["train"][pick], lo, ys["test"][:len(pick)])
    write_json(mia_path, mia)
    return MpleRun(result, read_json(folder / "key.json"), mia)


def train_all(configs: Sequence[RunConfig], spec: MpleSpec = MpleSpec(),
              runs_root: Optional[PathLike] = None, *, data: Optional[DataBundle] = None,
              verbose: bool = True) -> pd.DataFrame:
    """:func:`train` for every config (finished runs read back); one row per run: its record
    (as ``load_runs``), the recipe, the key's public record and membership inference."""
    rows = []
    t0 = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        t = time.perf_counter()
        with benign_warnings_silenced():
            r = train(cfg, spec, runs_root, data=data)
        row = load_run(r.result.run_dir)
        row.update(recipe=cfg.recipe, **{f"key_{k}": v for k, v in r.key.items()},
                   **{f"mia_{k}": v for k, v in r.membership.items()})
        rows.append(row)
        if verbose:
            eps = f", eps {r.result.epsilon:.2f}" if r.result.epsilon is not None else ""
            print(f"[{i}/{len(configs)}] {cfg.recipe} seed={cfg.seed}{eps}: balanced accuracy "
                  f"{row.get('balanced_accuracy', float('nan')):.3f}, membership AUC "
                  f"{r.membership['auc']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    if verbose:
        print(f"{len(configs)} MpLe runs in {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.DataFrame(rows)


__all__ = ["MpleRun", "MpleSpec", "Provided", "feature_maps", "mple_root", "mple_version",
           "normalised", "plain_membership", "provide", "service_model", "train", "train_all"]
