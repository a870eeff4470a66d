"""The cost of DP per network: tables and figures of the performance-drop chapter.

Inputs are run rows (:func:`dpskin_core.book.sweeps.sweep`) of the non-private references and
the DP runs of the same networks; the optimiser family (SGD or Adam) pairs a DP run with its
non-private reference. Nothing here trains or reads anything but run records.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pandas as pd

from ..constants import CLASSES
from .figures import NONPRIVATE, budget_label
from .tables import fmt_mean_std, recall_by_class

INF = "ε = ∞"


def labelled(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``optimiser`` (SGD / Adam) and ``budget`` (ε = ∞ for non-private)."""
    out = runs.copy()
    out["optimiser"] = out["optimizer"].map({"sgd": "SGD", "adam": "Adam"}).fillna(out["optimizer"])
    out["budget"] = [budget_label(bool(d), e, INF) for d, e in zip(out["dp"].astype(bool), out["target_epsilon"])]
    return out


def budgets(epsilons: Sequence[float]) -> list:
    """Column order: ε = ∞ first, then the budgets from the largest down."""
    return [INF] + [budget_label(True, e) for e in sorted(epsilons, reverse=True)]


def accuracy_table(runs: pd.DataFrame, epsilons: Sequence[float],
                   metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Per network and optimiser: ``metric`` at every budget (mean ± std), the drop from
    ε = ∞ (absolute; positive = lost) at each finite budget, what fraction of the
    non-private score is kept, and the number of seeds n (smallest over the budgets)."""
    lab = labelled(runs)
    cols = budgets(epsilons)
    rows = []
    for (b, o), g in lab.groupby(["backbone", "optimiser"], sort=True):
        stats = g.groupby("budget")[metric].agg(["mean", "std", "count"])
        row: Dict[str, object] = {"network": b, "optimiser": o}
        for c in cols:
            row[c] = fmt_mean_std(stats.loc[c, "mean"], stats.loc[c, "std"]) if c in stats.index else "—"
        ref = stats["mean"].get(INF, np.nan)
        for e in sorted(epsilons, reverse=True):
            m = stats["mean"].get(budget_label(True, e), np.nan)
            row[f"drop at ε = {e:g}"] = round(float(ref - m), 3)
            row[f"kept at ε = {e:g}"] = round(float(m / ref), 2) if ref else np.nan
        row["n"] = int(stats["count"].min())
        rows.append(row)
    return pd.DataFrame(rows).set_index(["network", "optimiser"])


def drop_long(runs: pd.DataFrame, metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Long table per network, optimiser, finite ε and seed: the DP score, its non-private
    reference (mean over seeds) and the drop (reference minus DP score)."""
    lab = labelled(runs)
    ref = (lab[~lab["dp"].astype(bool)].groupby(["backbone", "optimiser"])[metric].mean()
           .rename("reference"))
    dp = lab[lab["dp"].astype(bool)][["backbone", "optimiser", "target_epsilon", "seed", metric]]
    out = dp.join(ref, on=["backbone", "optimiser"])
    out["drop"] = out["reference"] - out[metric]
    return out.rename(columns={"target_epsilon": "ε", "backbone": "network"}).reset_index(drop=True)


def recall_drop_by_network(runs: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """Per network and optimiser (rows) and class (columns): non-private recall minus recall
    at ``epsilon`` (means over seeds; positive = the class lost recall under DP)."""
    lab = labelled(runs)
    rec = recall_by_class(lab, ["backbone", "optimiser", "budget"])
    wide = rec.pivot_table(index=["backbone", "optimiser", "class"], columns="budget",
                           values="recall", observed=True)
    col = budget_label(True, epsilon)
    if INF not in wide or col not in wide:
        return pd.DataFrame(columns=list(CLASSES))
    # a network without DP runs at this budget (a profile's dp_backbones) has no row
    drop = (wide[INF] - wide[col]).unstack("class").dropna(how="all")
    drop.index.names = ["network", "optimiser"]
    return drop[[c for c in CLASSES if c in drop.columns]]


def collapse_table(runs: pd.DataFrame) -> pd.DataFrame:
    """How many runs per network, optimiser and budget release a model that predicts at most
    two classes on the evaluation split (``predicted_classes`` of the record)."""
    lab = labelled(runs)
    if "predicted_classes" not in lab:
        return pd.DataFrame()
    lab["≤ 2 classes predicted"] = lab["predicted_classes"] <= 2
    return (lab.groupby(["backbone", "optimiser", "budget"])
            .agg(runs=("seed", "count"), collapsed=("≤ 2 classes predicted", "sum"),
                 classes_predicted=("predicted_classes", "mean"))
            .rename_axis(["network", "optimiser", "budget"]))


def loso_table(loso: pd.DataFrame, lesion: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-site-out: per network, the balanced accuracy on each held-out acquisition site
    (trained on the others; mean ± std, n) next to the lesion split's test score of the same
    recipe, and the gap (lesion split minus held-out site, mean over sites)."""
    if loso.empty:
        return pd.DataFrame()
    loso = loso.assign(site=loso["split"].str.removeprefix("site:"))
    rows = []
    for b, g in loso.groupby("backbone", sort=True):
        row: Dict[str, object] = {"network": b}
        ref = lesion[lesion["backbone"] == b]["balanced_accuracy"]
        row["lesion split (test)"] = fmt_mean_std(ref.mean(), ref.std()) if len(ref) else "—"
        site_means = []
        for s, h in g.groupby("site", sort=True):
            row[f"held out: {s}"] = fmt_mean_std(h["balanced_accuracy"].mean(), h["balanced_accuracy"].std())
            site_means.append(h["balanced_accuracy"].mean())
        row["gap (mean over sites)"] = round(float(ref.mean() - np.mean(site_means)), 3) if len(ref) else np.nan
        row["n"] = int(g.groupby("site")["seed"].count().min())
        rows.append(row)
    return pd.DataFrame(rows).set_index("network")


def drop_figure(long: pd.DataFrame, title: str = "Balanced accuracy lost to DP"):
    """Drop (non-private minus DP balanced accuracy) against ε, one line per network, one
    panel per optimiser; points: mean over seeds, bars: ± one standard deviation."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    opts = sorted(long["optimiser"].unique())
    fig, axes = plt.subplots(1, len(opts), figsize=(5.2 * len(opts), 3.8), sharey=True, squeeze=False)
    # seaborn divides the dodge by (networks - 1): no dodge for one network
    dodge = 0.25 if long["network"].nunique() > 1 else False
    for ax, o in zip(axes[0], opts):
        sns.pointplot(data=long[long["optimiser"] == o], x="ε", y="drop", hue="network",
                      errorbar="sd", dodge=dodge, ax=ax, markers="o", linestyles="-")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"DP-{o}")
        ax.set_ylabel("drop in balanced accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def recall_drop_heatmap(drop: pd.DataFrame, epsilon: float):
    """Heatmap of :func:`recall_drop_by_network` (rows: network, optimiser; columns: class)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(drop) + 1.6))
    labels = [f"{n}, DP-{o}" for n, o in drop.index]
    sns.heatmap(pd.DataFrame(drop.to_numpy(dtype=float), index=labels, columns=drop.columns),
                annot=True, fmt=".2f", cmap="RdBu_r", center=0, vmin=-1, vmax=1, cbar=False, ax=ax)
    ax.set_title(f"Recall lost per class at ε = {epsilon:g} (non-private minus DP)")
    ax.set_xlabel("class")
    ax.set_ylabel("")
    fig.tight_layout()
    return fig




def network_sizes(backbones: Sequence[str]) -> pd.DataFrame:
    """Trainable parameters and depth (layers with weights) of each backbone as the DP runs
    build it (GroupNorm for BatchNorm), with a 7-way head."""
    from ..training.backbones import build_backbone, count_parameters

    rows = []
    for b in backbones:
        m = build_backbone(b, len(CLASSES))
        layers = sum(1 for x in m.modules() if hasattr(x, "weight") and not list(x.children())
                     and getattr(x, "weight") is not None and x.weight.dim() > 1)
        rows.append({"network": b, "parameters (M)": round(count_parameters(m) / 1e6, 3),
                     "weight layers": layers})
    return pd.DataFrame(rows).set_index("network")


__all__ = ["INF", "accuracy_table", "budgets", "collapse_table", "drop_figure", "drop_long",
           "labelled", "loso_table", "network_sizes", "recall_drop_by_network",
           "recall_drop_heatmap"]
