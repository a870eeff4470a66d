"""Tables and figures the results chapters share (pandas in, DataFrames / matplotlib out).

The DP-SGD and DP-Adam chapters run the same analysis for two optimisers; it lives here so
the notebooks hold only their parameters, prose and one call per table or figure. Nothing
here trains or reads private data beyond the run records it is given.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from ..constants import CLASSES
from .tables import eps_over_steps, recall_by_class, summary_table

NONPRIVATE = "non-private"


def budget_label(dp: bool, eps: Optional[float], nonprivate: str = NONPRIVATE) -> str:
    """``ε = 8``, or ``nonprivate`` (``non-private`` unless given, e.g. ``ε = ∞``)."""
    return f"ε = {eps:g}" if dp else nonprivate


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


def privacy_unit_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Image- against lesion-level DP: per unit and target ε, the achieved ε, σ, q, steps, the
    number of units and the test balanced accuracy (mean ± std, n)."""
    table = summary_table(runs, ["unit", "target_epsilon"], metrics=("balanced_accuracy",))
    priv = runs.groupby(["unit", "target_epsilon"]).agg(**{
        "achieved ε": ("epsilon", "max"), "σ": ("noise_multiplier", "mean"),
        "q": ("sample_rate", "mean"), "steps": ("steps", "mean"), "units N": ("n_units", "max")})
    table = table.join(priv, on=["unit", "target_epsilon"]).rename(
        columns={"target_epsilon": "target ε"})
    return (table.set_index(["unit", "target ε"]).sort_index()
            .round({"achieved ε": 3, "σ": 3, "q": 4, "steps": 0}).astype({"units N": "Int64"}))


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


def training_curves(metrics: pd.DataFrame, runs: pd.DataFrame, hue_order: Sequence[str],
                    hue: str = "budget"):
    """Validation balanced accuracy and validation loss (cross-entropy, nats) per epoch, one line
    per value of ``hue`` (mean ± sd over seeds). Validation curves only: a DP run records no
    loss or accuracy of its private training batches."""
    import seaborn as sns

    m = (metrics[metrics["run"].isin(runs["run"])].drop(columns=[hue], errors="ignore")
         .merge(runs[["run", hue]], on="run"))
    curves = m[(m["split"] == "val") & m["metric"].isin(["balanced_accuracy", "nll"])].copy()
    curves["panel"] = curves["metric"].map({"balanced_accuracy": "val balanced accuracy",
                                            "nll": "val loss (cross-entropy)"})
    g = sns.relplot(data=curves, x="epoch", y="value", hue=hue, hue_order=list(hue_order),
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


# --------------------------------------------------------------------------- privacy attacks
def roc_figure(results: Dict[str, Dict[str, object]], fprs: Sequence[float] = (0.001, 0.01)):
    """Membership-inference ROC curves on log-log axes, one panel per attack, one line per
    model: ``results`` is ``{model: {attack: MIAResult}}`` (:mod:`dpskin_core.attacks`).

    The FPR axis starts at the smallest measurable FPR (one false positive); points with a
    zero coordinate cannot be drawn on log axes and are left out. Dotted: a random guess.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    attacks = list(dict.fromkeys(a for per in results.values() for a in per))
    colors = dict(zip(results, sns.color_palette(n_colors=len(results))))
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.7), squeeze=False)
    lo = min(1.0 / r.n_nonmembers for per in results.values() for r in per.values())
    for ax, attack in zip(axes[0], attacks):
        for model, per in results.items():
            if attack not in per:
                continue
            r = per[attack]
            ok = (r.fpr > 0) & (r.tpr > 0)
            ax.plot(r.fpr[ok], r.tpr[ok], color=colors[model], lw=1.3,
                    label=f"{model} (AUC {r.auc:.2f})", drawstyle="steps-post")
        ax.plot([lo, 1], [lo, 1], color="grey", ls=":", lw=1)
        for f in fprs:
            ax.axvline(f, color="grey", lw=0.6, alpha=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo, 1.05)
        ax.set_title(attack)
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("true-positive rate")
    fig.tight_layout()
    return fig


def extraction_figure(table: pd.DataFrame):
    """Fidelity and stolen balanced accuracy against the query budget: ``table`` has the
    columns of :class:`dpskin_core.attacks.ExtractionResult` tables plus ``victim``, ``pool``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    t = table.copy()
    t["query pool"] = (t["pool"] + ", " + t["mode"]) if t["mode"].nunique() > 1 else t["pool"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, col, ylabel in ((axes[0], "fidelity", "fidelity (agreement with victim)"),
                            (axes[1], "balanced_accuracy", "stolen balanced accuracy (test)")):
        sns.lineplot(data=t, x="budget", y=col, hue="victim", style="query pool", marker="o",
                     ax=ax, legend=ax is axes[1])
        ax.set_xlabel("query budget (images)")
        ax.set_ylabel(ylabel)
        if t["budget"].max() / t["budget"].min() > 4:
            ax.set_xscale("log")
    axes[1].axhline(1 / len(CLASSES), color="grey", ls=":", lw=1)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def image_grid(rows: Dict[str, np.ndarray], col_titles: Sequence[str], size: float = 1.3):
    """Rows of images (each (K, H, W, 3) in [0, 1]), labelled on the left; column titles."""
    import matplotlib.pyplot as plt

    k = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), k, figsize=(size * k + 1.4, size * len(rows) + 0.5),
                             squeeze=False)
    for i, (name, ims) in enumerate(rows.items()):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if j < len(ims):
                ax.imshow(np.clip(ims[j], 0, 1), interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
        axes[i][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def audit_figure(table: pd.DataFrame):
    """The one-run audit's eps lower bound (bars) against the accountant's eps (ticks) per
    model; dashed: the largest bound the audit's guesses can prove. ``table`` has the columns
    ``model``, ``ε lower bound``, ``ε (accountant)`` (inf: non-private), ``largest provable
    bound``."""
    import matplotlib.pyplot as plt

    t = table.reset_index(drop=True)
    y = np.arange(len(t))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(t) + 1.3))
    ax.barh(y, t["ε lower bound"], color="tab:red", alpha=0.7, label="ε lower bound (audit)")
    finite = np.isfinite(t["ε (accountant)"])
    ax.scatter(t.loc[finite, "ε (accountant)"], y[finite], marker="|", s=300, color="black",
               label="ε (accountant)", zorder=3)
    cap = float(t["largest provable bound"].max())
    ax.axvline(cap, color="grey", ls="--", lw=1, label="largest provable bound")
    for yi in y[~finite]:
        ax.annotate("ε = ∞", (cap, yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(t["model"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ε")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


PRIVACY_COLUMNS = {"epsilon": "ε", "delta": "δ", "balanced_accuracy": "balanced accuracy",
                   "mia_auc": "MIA AUC", "mia_tpr_at_fpr_0.001": "TPR @ 0.1 % FPR",
                   "mia_tpr_at_fpr_0.01": "TPR @ 1 % FPR", "eps_lower_bound": "ε lower bound"}


def privacy_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The privacy table for display: one row per model (rows of
    :func:`dpskin_core.cards.card_summary`), ε = ∞ for a non-private model."""
    t = table.set_index("model")[list(PRIVACY_COLUMNS)].copy()
    t["epsilon"] = t["epsilon"].astype(float).fillna(np.inf)
    t["delta"] = [f"{d:g}" if pd.notna(d) else "" for d in t["delta"]]
    return t.rename(columns=PRIVACY_COLUMNS).round(digits)
