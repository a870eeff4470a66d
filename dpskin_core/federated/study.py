"""The chapter's study: every federated recipe swept, and the references a federation is
judged against, scored at every client like the federation.

- **pooled**: the clients' local recipe trained centrally on the union of their training
  images for as many epochs as the federation trains (``rounds x local_epochs``), the final
  model evaluated on each client's test part (the FL literature's upper reference; FLamby's
  "pooled");
- **local only**: each client trains the recipe alone on its own images and is scored on its
  own test part (what a hospital reaches without federating);
- **pooled, converged**: the profile's converged non-private reference of the same network
  (recipe ``nonprivate-adam``: its whole schedule, the best validation epoch released), whose
  training images are the pooled ones (each client holds its part of the data bundle's split),
  scored at every client: what the federation's network reaches centrally without the
  federation's epoch budget.

The first two are ``run`` records (cached) under ``<runs_root>/federated/references/``; the
third is chapter 01's own run, in ``<runs_root>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import pandas as pd

from ..errors import ConfigError
from ..training import run
from ..training.checkpoint import released_weights
from ..training.records import default_runs_root, prediction_shift
from ..training.quiet import benign_warnings_silenced
from ..training.recipes import RECIPES, Params
from .client import evaluate, for_client, kept_shift
from .federation import FLConfig, global_prior, run_federation
from .partitions import Client
from .recipes import FL_RECIPES, FLPlan

PathLike = Union[str, Path]


def _root(runs_root: Optional[PathLike]) -> Path:
    return (Path(runs_root) if runs_root is not None else default_runs_root()) / "federated" / "references"


def _weights(result):
    """The weights the run releases (its best validation epoch when it stops early)."""
    return released_weights(result.run_dir / "checkpoints",
                            result.config.early_stopping_patience is not None)[0]


def pooled(cfg: FLConfig, clients: List[Client], runs_root: Optional[PathLike] = None, *,
           data=None) -> pd.DataFrame:
    """One row per client: the pooled model's metrics on its test part (its released
    predictor: plus the run's kept prior shift, if any)."""
    local = cfg.local
    with benign_warnings_silenced():
        res = run(local, _root(runs_root) / "pooled", data=data)
    w, shift = _weights(res), prediction_shift(res.meta)
    return pd.DataFrame([{"client": c.name, "training": "pooled", "epsilon": res.epsilon,
                          **evaluate(c, local, w, shift=shift)} for c in clients])


def local_only(cfg: FLConfig, clients: List[Client], runs_root: Optional[PathLike] = None) -> pd.DataFrame:
    """One row per client: the client's own model on its own test part."""
    local, rows = cfg.local, []
    for c in clients:
        local_c = for_client(local, c)
        with benign_warnings_silenced():
            res = run(local_c, _root(runs_root) / "local" / c.name, data=c.data)
        rows.append({"client": c.name, "training": "local only", "epsilon": res.epsilon,
                     **evaluate(c, local_c, _weights(res), shift=prediction_shift(res.meta))})
    return pd.DataFrame(rows)


def pooled_converged(p: Params, clients: List[Client], seeds: Sequence[int],
                     runs_root: Optional[PathLike] = None) -> pd.DataFrame:
    """One row per client and seed: the profile's converged non-private reference
    (``nonprivate-adam`` on the profile's first network, the network of the federations) on the
    client's test part. ``runs_root`` is the profile's (the run chapter 01 trains)."""
    rows = []
    for seed in seeds:
        cfg = RECIPES.get("nonprivate-adam").config(p, backbone=p.backbones[0], seed=seed)
        with benign_warnings_silenced():
            res = run(cfg, runs_root)
        w = _weights(res)
        rows += [{"client": c.name, "training": "pooled, converged", "epsilon": None, "seed": seed,
                  "budget": "∞", **evaluate(c, cfg, w)} for c in clients]
    return pd.DataFrame(rows)


def global_membership(cfg: FLConfig, weights, clients: List[Client], seed: int = 0,
                      folder: Optional[Path] = None) -> pd.DataFrame:
    """Loss-threshold membership inference (Yeom et al. 2018) on the global model, at each
    client: as many of its training images (random, public seed) as its test images, members
    vs non-members; one row per client (AUC, TPR at 1 % FPR). The model attacked is each
    client's released predictor: with the client's kept prior shift when its recipe keeps one
    (``la_tau_kept``; then ``folder``, the federation's record, is needed)."""
    import torch

    from ..attacks.membership import heldout_members, loss_threshold_game
    from ..constants import CLASSES
    from ..training.backbones import build_backbone
    from ..training.frontends import Inputs
    from ..training.trainer import pick_device

    local = cfg.local
    keeps = local.la_tau_kept > 0
    if keeps and folder is None:
        raise ConfigError("global_membership: the clients keep part of their class prior "
                          "(la_tau_kept > 0); pass folder, the federation's record")
    prior = global_prior(cfg, Path(folder), None) if keeps else None
    device = pick_device(local.device)
    model = build_backbone(local.backbone, num_classes=len(CLASSES)).to(device)
    model.load_state_dict(weights)
    model.eval()
    rows = []
    for c in clients:
        pick = heldout_members(len(c.data.y_train), len(c.data.y_test), seed)
        n = len(pick)
        if n == 0:
            continue
        inputs = Inputs(local, c.data, device)
        with torch.no_grad():
            lm, lo = (model(inputs.eval(x)).double().cpu().numpy()
                      for x in (inputs.train_x[torch.as_tensor(pick)], inputs.eval_x[:n]))
        if keeps:
            shift = kept_shift(c, local, Path(folder) / "clients" / c.name, prior)
            lm, lo = lm + shift, lo + shift
        m = loss_threshold_game(lm, c.data.y_train[pick], lo, c.data.y_test[:n])
        rows.append({"client": c.name, "n_members": n, "auc": m["auc"],
                     "tpr_at_1%_fpr": m["tpr_at_fpr_0.01"]})
    return pd.DataFrame(rows)


def update_inversion(cfg: FLConfig, weights, client: Client, *, record_sigma: Optional[float],
                     client_clipping_norm: Optional[float], images: int = 4, steps: int = 300,
                     seed: int = 0) -> pd.DataFrame:
    """An honest-but-curious server inverting one client's update (Geiping et al. 2020).

    The attacker's best case: the client takes one local step (FedSGD, learning rate ``lr``) on
    a batch of one training image from the global model ``weights``, so its update is
    ``-lr g``; the server minimises the cosine distance between the gradient of a candidate
    image and ``g`` (:func:`dpskin_core.attacks.reconstruct.gradient_inversion`). For each of
    the client's first ``images`` training images, one row per DP mode:

    - ``no DP``: the update as sent;
    - ``record-level DP-SGD``: the client's release, its gradient clipped to ``C`` and noised
      with std ``record_sigma * C`` (its accountant's sigma);
    - ``client-level DP-FedAvg``: the server clips the update to ``client_clipping_norm``
      and noises only the *sum* of the updates, so it sees each update clipped, not noised
      (central DP protects the released model, not the update from the server).

    Columns: image, mode, psnr (dB), ssim, cosine, and the reconstruction (HWC in [0, 1]).
    """
    import torch

    from ..attacks.reconstruct import gradient_inversion
    from ..attacks.victims import TrainedModel
    from ..constants import CLASSES
    from ..training.backbones import build_backbone

    local = cfg.local
    model = build_backbone(local.backbone, num_classes=len(CLASSES))
    model.load_state_dict(weights)
    victim = TrainedModel(model, local)
    modes = {"no DP": {}}
    if record_sigma is not None:
        modes["record-level DP-SGD"] = {"max_grad_norm": local.max_grad_norm,
                                        "noise_multiplier": float(record_sigma)}
    if client_clipping_norm is not None:  # clip(-lr g, C) is g clipped to C / lr
        modes["client-level DP-FedAvg"] = {"max_grad_norm": float(client_clipping_norm) / local.lr}
    rows = []
    with torch.enable_grad():
        for i in range(min(images, len(client.data.y_train))):
            x, y = client.data.x_train[i], int(client.data.y_train[i])
            for mode, kw in modes.items():
                r = gradient_inversion(victim, x, y, steps=steps, seed=seed + i, **kw)
                rows.append({"client": client.name, "image": i, "label": CLASSES[y], "mode": mode,
                             "psnr": r.psnr, "ssim": r.ssim, "cosine": r.cosine,
                             "reconstruction": r.reconstruction, "truth": r.truth})
    return pd.DataFrame(rows)


def sweep(p, plan: FLPlan, seeds: Sequence[int], epsilons: Sequence[float],
          runs_root: Optional[PathLike] = None, verbose: bool = True,
          with_membership: Optional[List[Client]] = None):
    """Every federated recipe (:data:`FL_RECIPES`) at every seed (and budget, if private):
    their per-round, per-client rows, with ``training``, ``seed`` and ``budget``; with
    ``with_membership`` (the clients), also the global models' membership inference rows:
    then a pair (rounds, membership)."""
    out, with_membership_rows = [], []
    for name in FL_RECIPES.names():
        r = FL_RECIPES.get(name)
        for seed in seeds:
            for eps in (epsilons if r.private else [None]):
                with benign_warnings_silenced():
                    res = run_federation(r.config(p, plan, seed=seed, target_epsilon=eps), runs_root,
                                         progress=False)
                rows = res.rounds.assign(training=r.label, seed=seed,
                                         budget=f"ε = {eps:g}" if eps else "∞")
                out.append(rows)
                if with_membership is not None:
                    mia = global_membership(res.config, res.weights, with_membership, seed,
                                            folder=res.folder)
                    with_membership_rows.append(mia.assign(training=r.label, seed=seed,
                                                           budget=rows["budget"].iloc[0]))
                if verbose:
                    last = rows[rows["round"] == plan.rounds]
                    print(f"{r.label} seed {seed} {rows['budget'].iloc[0]}: mean balanced accuracy "
                          f"{last['balanced_accuracy'].mean():.3f} ({res.folder.name})", flush=True)
    rounds = pd.concat(out, ignore_index=True)
    if with_membership is None:
        return rounds
    return rounds, pd.concat(with_membership_rows, ignore_index=True)


def references(cfg_of_seed, clients: List[Client], seeds: Sequence[int],
               runs_root: Optional[PathLike] = None, *,
               converged: Optional[Params] = None) -> pd.DataFrame:
    """What the federations are judged against, for every seed: pooled and local-only rows
    (``cfg_of_seed(seed)``: the federation whose local recipe they train) and, given the
    profile's parameters ``converged``, the converged central reference
    (:func:`pooled_converged`, read from or trained into ``runs_root``)."""
    frames = []
    for seed in seeds:
        cfg = cfg_of_seed(seed)
        frames += [pooled(cfg, clients, runs_root).assign(seed=seed, budget="∞"),
                   local_only(cfg, clients, runs_root).assign(seed=seed, budget="∞")]
    if converged is not None:
        frames.append(pooled_converged(converged, clients, seeds, runs_root))
    return pd.concat(frames, ignore_index=True)


__all__ = ["global_membership", "local_only", "pooled", "pooled_converged", "references", "sweep",
           "update_inversion"]
