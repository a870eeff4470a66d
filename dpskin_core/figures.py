"""Tables and figures the results chapters share (pandas in, DataFrames / matplotlib out).

The DP-SGD and DP-Adam chapters run the same analysis for two optimisers; it lives here so
the notebooks hold only their parameters, prose and one call per table or figure. Nothing
here trains or reads private data beyond the run records it is given.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .constants import CLASSES
from .experiments import eps_over_steps, recall_by_class, summary_table

NONPRIVATE = "non-private"


def budget_label(dp: bool, eps: Optional[float]) -> str:
    """``non-private`` or ``ε = 8``."""
    return f"ε = {eps:g}" if dp else NONPRIVATE


def with_budget(runs: pd.DataFrame, epsilons: Sequence[float]) -> List[str]:
    """Add a ``budget`` column to ``runs`` (in place); return the budgets, weakest first."""
    runs["budget"] = [budget_label(bool(dp), e) for dp, e in
                      zip(runs["dp"].astype(bool), runs["target_epsilon"])]
    return [NONPRIVATE] + [budget_label(True, e) for e in sorted(epsilons, reverse=True)]


def dp_results_table(runs: pd.DataFrame, budget_order: Sequence[str]) -> pd.DataFrame:
    """Test metrics per backbone and budget (mean ± std, n) with achieved ε, σ, steps, img/s."""
    table = summary_table(runs, ["backbone", "budget"])
    priv = runs.groupby(["backbone", "budget"])[["epsilon", "noise_multiplier", "steps",
                                                 "train_images_per_s"]].mean()
    table = table.join(priv, on=["backbone", "budget"]).rename(columns={
        "epsilon": "achieved ε", "noise_multiplier": "σ", "train_images_per_s": "train img/s"})
    table["budget"] = pd.Categorical(table["budget"], list(budget_order), ordered=True)
    table = table.sort_values(["backbone", "budget"]).set_index(["backbone", "budget"])
    return table.astype({"steps": "Int64"}).round({"achieved ε": 3, "σ": 3, "train img/s": 0})


def dp_headline(runs: pd.DataFrame, backbone: str, epsilons: Sequence[float]) -> Dict[str, object]:
    """The numbers a DP chapter quotes in prose, for one backbone (values for ``glue``)."""
    sub = runs[runs["backbone"] == backbone]
    by = sub.groupby("budget")["balanced_accuracy"].agg(["mean", "std", "count"])
    e_lo, e_hi = min(epsilons), max(epsilons)
    dp = sub[sub["dp"].astype(bool)]
    sig = dp.groupby("target_epsilon")["noise_multiplier"].mean()
    speed = sub.groupby(sub["dp"].astype(bool))["train_images_per_s"].mean()
    out: Dict[str, object] = {
        "backbone": backbone, "eps_lo": e_lo, "eps_hi": e_hi,
        "np_bacc": by.loc[NONPRIVATE, "mean"], "np_std": by.loc[NONPRIVATE, "std"],
        "n_seeds": int(by["count"].min()),
        "sigma_lo": sig.loc[e_lo], "sigma_hi": sig.loc[e_hi],
        "slowdown": speed.loc[False] / speed.loc[True],
    }
    for tag, e in (("lo", e_lo), ("hi", e_hi)):
        out[f"{tag}_bacc"] = by.loc[budget_label(True, e), "mean"]
        out[f"{tag}_std"] = by.loc[budget_label(True, e), "std"]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def training_curves(metrics: pd.DataFrame, runs: pd.DataFrame, budget_order: Sequence[str]):
    """Validation balanced accuracy and training loss per epoch and budget (mean ± sd)."""
    import seaborn as sns

    m = metrics[metrics["run"].isin(runs["run"])].merge(runs[["run", "budget"]], on="run")
    curves = pd.concat([
        m[(m["split"] == "val") & (m["metric"] == "balanced_accuracy")],
        m[(m["split"] == "train") & (m["metric"] == "loss")],
    ])
    curves["panel"] = curves["split"] + " " + curves["metric"].str.replace("_", " ")
    g = sns.relplot(data=curves, x="epoch", y="value", hue="budget", hue_order=list(budget_order),
                    style="backbone" if runs["backbone"].nunique() > 1 else None, col="panel",
                    kind="line", errorbar="sd", facet_kws={"sharey": False}, height=3.2,
                    aspect=1.25)
    g.set_titles("{col_name}")
    g.set_ylabels("")
    return g


def eps_over_steps_figure(metrics: pd.DataFrame, runs: pd.DataFrame,
                          epsilons: Sequence[float], delta: float, title: str):
    """The accountant's ε after each epoch against optimizer steps, per target budget."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    steps = eps_over_steps(metrics, runs)
    steps["budget"] = "target ε = " + steps["target_epsilon"].map("{:g}".format)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.lineplot(data=steps, x="step", y="eps", hue="budget",
                 style="backbone" if steps["backbone"].nunique() > 1 else None, marker="o",
                 errorbar=None, ax=ax)
    for e in epsilons:
        ax.axhline(e, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(f"ε (δ = {delta:g})")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def bacc_vs_eps_figure(runs: pd.DataFrame, group: str, epsilons: Sequence[float], delta: float,
                       title: str = ""):
    """Balanced accuracy against ε, one line per value of ``group`` (mean ± sd over seeds, n
    in the legend); groups without DP runs are dashed horizontal lines with a ± sd band."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    groups = list(dict.fromkeys(runs[group]))
    colors = dict(zip(groups, sns.color_palette(n_colors=len(groups))))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for gname in groups:
        sub = runs[runs[group] == gname]
        if sub["dp"].astype(bool).all():
            agg = sub.groupby("target_epsilon")["balanced_accuracy"].agg(["mean", "std", "count"])
            ax.errorbar(agg.index, agg["mean"], yerr=agg["std"].fillna(0), marker="o",
                        capsize=3, color=colors[gname], label=f"{gname} (n = {agg['count'].min()})")
        else:
            v = sub["balanced_accuracy"]
            ax.axhline(v.mean(), color=colors[gname], ls="--", lw=1.2,
                       label=f"{gname} (n = {len(v)})")
            if len(v) > 1:
                ax.axhspan(v.mean() - v.std(), v.mean() + v.std(), color=colors[gname], alpha=0.12)
    ax.axhline(1 / len(CLASSES), color="grey", ls=":", lw=1, label="chance (1/7)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(epsilons))
    ax.set_xticklabels([f"{e:g}" for e in sorted(epsilons)])
    ax.minorticks_off()
    ax.set_xlabel(f"ε (log scale), δ = {delta:g}")
    ax.set_ylabel("balanced accuracy (test)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def recall_drop(runs: pd.DataFrame, backbone: str, epsilons: Sequence[float],
                budget_order: Sequence[str]) -> pd.DataFrame:
    """Per-class recall (mean over seeds) per budget and its drop from the non-private model."""
    rec = recall_by_class(runs[runs["backbone"] == backbone], ["budget"])
    wide = rec.pivot_table(index="class", columns="budget", values="recall",
                           observed=True)[list(budget_order)]
    for e in sorted(epsilons):
        wide[f"drop at ε = {e:g}"] = wide[NONPRIVATE] - wide[budget_label(True, e)]
    return wide


def recall_drop_figure(wide: pd.DataFrame):
    """Bar chart of the per-class recall drops of :func:`recall_drop`."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    drops = wide[[c for c in wide.columns if str(c).startswith("drop")]].reset_index().melt(
        id_vars="class", var_name="budget", value_name="recall drop")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    sns.barplot(data=drops, x="class", y="recall drop", hue="budget", ax=ax)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("")
    ax.set_ylabel("non-private recall − DP recall")
    fig.tight_layout()
    return fig
