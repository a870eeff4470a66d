"""The chapter's study: every federated recipe swept, and the references a federation is
judged against, scored at every client like the federation.

- **pooled**: the clients' local recipe trained centrally on the union of their training
  images for as many epochs as the federation trains (``rounds x local_epochs``), the final
  model evaluated on each client's test part (the FL literature's upper reference; FLamby's
  "pooled");
- **local only**: each client trains the recipe alone on its own images and is scored on its
  own test part (what a hospital reaches without federating).

Both are ``run`` records (cached), under ``<runs_root>/federated/references/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import pandas as pd

from ..training import run
from ..training.checkpoint import released_weights
from ..training.records import default_runs_root
from ..training.quiet import benign_warnings_silenced
from .client import evaluate
from .federation import FLConfig, run_federation
from .partitions import Client
from .recipes import FL_RECIPES, FLPlan

PathLike = Union[str, Path]


def _root(runs_root: Optional[PathLike]) -> Path:
    return (Path(runs_root) if runs_root is not None else default_runs_root()) / "federated" / "references"


def _weights(result):
    return released_weights(result.run_dir / "checkpoints", False)[0]


def pooled(cfg: FLConfig, clients: List[Client], runs_root: Optional[PathLike] = None, *,
           data=None) -> pd.DataFrame:
    """One row per client: the pooled model's metrics on its test part."""
    local = cfg.local
    with benign_warnings_silenced():
        res = run(local, _root(runs_root) / "pooled", data=data)
    w = _weights(res)
    return pd.DataFrame([{"client": c.name, "training": "pooled", "epsilon": res.epsilon,
                          **evaluate(c, local, w)} for c in clients])


def local_only(cfg: FLConfig, clients: List[Client], runs_root: Optional[PathLike] = None) -> pd.DataFrame:
    """One row per client: the client's own model on its own test part."""
    local, rows = cfg.local, []
    for c in clients:
        if c.n_train < local.batch_size:
            local_c = local.replace(batch_size=max(1, c.n_train))
        else:
            local_c = local
        with benign_warnings_silenced():
            res = run(local_c, _root(runs_root) / "local" / c.name, data=c.data)
        rows.append({"client": c.name, "training": "local only", "epsilon": res.epsilon,
                     **evaluate(c, local_c, _weights(res))})
    return pd.DataFrame(rows)


def global_membership(cfg: FLConfig, weights, clients: List[Client], seed: int = 0) -> pd.DataFrame:
    """Loss-threshold membership inference (Yeom et al. 2018) on the global model, at each
    client: as many of its training images (random, public seed) as its test images, members
    vs non-members; one row per client (AUC, TPR at 1 % FPR)."""
    import torch

    from ..attacks.membership import heldout_members, loss_threshold_game
    from ..constants import CLASSES
    from ..training.backbones import build_backbone
    from ..training.frontends import Inputs
    from ..training.trainer import pick_device

    local = cfg.local
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
        m = loss_threshold_game(lm, c.data.y_train[pick], lo, c.data.y_test[:n])
        rows.append({"client": c.name, "n_members": n, "auc": m["auc"],
                     "tpr_at_1%_fpr": m["tpr_at_fpr_0.01"]})
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
                res = run_federation(r.config(p, plan, seed=seed, target_epsilon=eps), runs_root,
                                     progress=False)
                rows = res.rounds.assign(training=r.label, seed=seed,
                                         budget=f"ε = {eps:g}" if eps else "∞")
                out.append(rows)
                if with_membership is not None:
                    mia = global_membership(res.config, res.weights, with_membership, seed)
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
               runs_root: Optional[PathLike] = None) -> pd.DataFrame:
    """Pooled and local-only rows of every seed (``cfg_of_seed(seed)``: the federation whose
    local recipe they train)."""
    frames = []
    for seed in seeds:
        cfg = cfg_of_seed(seed)
        frames += [pooled(cfg, clients, runs_root).assign(seed=seed, budget="∞"),
                   local_only(cfg, clients, runs_root).assign(seed=seed, budget="∞")]
    return pd.concat(frames, ignore_index=True)


__all__ = ["global_membership", "local_only", "pooled", "references", "sweep"]
