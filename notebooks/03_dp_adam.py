# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
# Parameters (papermill injects the profile's values after this cell; see experiments.yml).
profile = "smoke"
runs_root = "runs/smoke"
dataset = "synthetic"
data_root = None
synth_n = 1200
image_size = 32
backbones = ["smallcnn_fast"]
seeds = [0, 1]
epsilons = [1.0, 8.0]
epochs = 8
batch_size = 64
optimizer = "adam"
lr_sgd = 0.05
lr_adam = 0.002
lr_dp_sgd = 0.5
lr_dp_adam = 0.003
max_grad_norm = 1.0
delta = 1.0e-5
num_threads = None
class_weights = "balanced"

# %% [markdown]
# # DP-Adam
#
# Each backbone trained with DP-Adam (Adam's moment estimates fed with DP-SGD's clipped and
# noised gradients) at every privacy budget $\varepsilon$ of the profile ($\delta$ fixed),
# against the same backbone trained without privacy by Adam. DP-Adam has exactly the privacy
# cost of DP-SGD for the same sampling rate, noise multiplier and number of steps (the moments
# are post-processing of the noisy gradients); only the utility differs. The noise multiplier of
# each run is derived from its target $(\varepsilon, \delta)$ and read back from its record;
# the chapter {doc}`02_dp_sgd` shows the same analysis for DP-SGD.

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from dpskin_core.experiments import glue

from dpskin_core import CLASSES, RunConfig
from dpskin_core.experiments import (eps_over_steps, grid, method_label, recall_by_class,
                                     summary_table, sweep)
from dpskin_core.results import load_metrics

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
DP_NAME = method_label(f"dp-{optimizer}")

# %% [markdown]
# ## Training
#
# The non-private reference runs are the ones of the baseline chapter (same configuration, so
# they are read back, not retrained); then one private run per backbone, budget and seed.

# %% tags=["hide-output"]
base = RunConfig(name=f"dp-{optimizer}", dataset=dataset, data_root=data_root, synth_n=synth_n,
                 image_size=image_size, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, progress=False, num_threads=num_threads)
nonprivate = sweep(base.replace(name="baseline", class_weights=class_weights,
                                lr={"sgd": lr_sgd, "adam": lr_adam}[optimizer]),
                   grid(backbone=backbones, seed=seeds), runs_root)
private = sweep(base.replace(dp=True, target_epsilon=epsilons[0], delta=delta,
                             max_grad_norm=max_grad_norm,
                             lr={"sgd": lr_dp_sgd, "adam": lr_dp_adam}[optimizer]),
                grid(backbone=backbones, target_epsilon=epsilons, seed=seeds), runs_root)
runs = pd.concat([nonprivate, private], ignore_index=True)
runs["budget"] = [f"ε = {e:g}" if dp else "non-private"
                  for dp, e in zip(runs["dp"].astype(bool), runs["target_epsilon"])]
budget_order = ["non-private"] + [f"ε = {e:g}" for e in sorted(epsilons, reverse=True)]

# %% [markdown]
# ## Test-set results
#
# Mean ± standard deviation over seeds ($n$ seeds). *achieved ε* is what the accountant
# certifies after the last step (at most the target), $\sigma$ the noise multiplier the target
# required, *steps* the number of noisy gradient steps.

# %%
table = summary_table(runs, ["backbone", "budget"])
priv = runs.groupby(["backbone", "budget"])[["epsilon", "noise_multiplier", "steps",
                                             "train_images_per_s"]].mean()
table = table.join(priv, on=["backbone", "budget"]).rename(columns={
    "epsilon": "achieved ε", "noise_multiplier": "σ", "train_images_per_s": "train img/s"})
table["budget"] = pd.Categorical(table["budget"], budget_order, ordered=True)
table = table.sort_values(["backbone", "budget"]).set_index(["backbone", "budget"])
table.astype({"steps": "Int64"}).round({"achieved ε": 3, "σ": 3, "train img/s": 0})

# %% tags=["remove-cell"]
b0 = backbones[0]
by = runs[runs["backbone"] == b0].groupby("budget")["balanced_accuracy"].agg(["mean", "std", "count"])
e_lo, e_hi = min(epsilons), max(epsilons)
glue("backbone", b0, display=False)
glue("dp_name", DP_NAME, display=False)
glue("np_bacc", by.loc["non-private", "mean"], display=False)
glue("np_std", by.loc["non-private", "std"], display=False)
glue("eps_lo", e_lo, display=False)
glue("eps_hi", e_hi, display=False)
glue("lo_bacc", by.loc[f"ε = {e_lo:g}", "mean"], display=False)
glue("lo_std", by.loc[f"ε = {e_lo:g}", "std"], display=False)
glue("hi_bacc", by.loc[f"ε = {e_hi:g}", "mean"], display=False)
glue("hi_std", by.loc[f"ε = {e_hi:g}", "std"], display=False)
glue("n_seeds", int(by["count"].min()), display=False)
sig = private[private["backbone"] == b0].groupby("target_epsilon")["noise_multiplier"].mean()
glue("sigma_lo", sig.loc[e_lo], display=False)
glue("sigma_hi", sig.loc[e_hi], display=False)
speed = runs[runs["backbone"] == b0].groupby(runs["dp"].astype(bool))["train_images_per_s"].mean()
glue("slowdown", speed.loc[False] / speed.loc[True], display=False)

# %% [markdown]
# With the {glue:text}`backbone` network, non-private training reaches a balanced accuracy of
# {glue:text}`np_bacc:.3f` ± {glue:text}`np_std:.3f`. With {glue:text}`dp_name` at
# $\varepsilon$ = {glue:text}`eps_hi:g` (noise multiplier {glue:text}`sigma_hi:.2f`) it reaches
# {glue:text}`hi_bacc:.3f` ± {glue:text}`hi_std:.3f`, and at $\varepsilon$ =
# {glue:text}`eps_lo:g` ($\sigma$ = {glue:text}`sigma_lo:.2f`) {glue:text}`lo_bacc:.3f` ±
# {glue:text}`lo_std:.3f` ($n$ = {glue:text}`n_seeds` seeds each). Per-example gradients make
# private training {glue:text}`slowdown:.1f` times slower per image on this machine.

# %% [markdown]
# ## Training curves
#
# Validation balanced accuracy and training loss after each epoch, per privacy budget (mean
# over seeds, band: ± one standard deviation).

# %% tags=["hide-input"]
metrics = load_metrics(runs_root)
metrics = metrics[metrics["run"].isin(runs["run"])].merge(runs[["run", "budget"]], on="run")
curves = pd.concat([
    metrics[(metrics["split"] == "val") & (metrics["metric"] == "balanced_accuracy")],
    metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")],
])
curves["panel"] = curves["split"] + " " + curves["metric"].str.replace("_", " ")
g = sns.relplot(data=curves, x="epoch", y="value", hue="budget", hue_order=budget_order,
                style="backbone" if len(backbones) > 1 else None, col="panel", kind="line",
                errorbar="sd", facet_kws={"sharey": False}, height=3.2, aspect=1.25)
g.set_titles("{col_name}")
g.set_ylabels("")
plt.show()

# %% [markdown]
# ## Privacy spent over training
#
# The accountant's $\varepsilon$ after each epoch, against the number of noisy steps taken. It
# grows sub-linearly in the number of steps and reaches the target exactly at the end: the
# noise multiplier was chosen for that.

# %% tags=["hide-input"]
steps = eps_over_steps(metrics, runs)
steps["budget"] = "target ε = " + steps["target_epsilon"].map("{:g}".format)
fig, ax = plt.subplots(figsize=(6, 3.4))
sns.lineplot(data=steps, x="step", y="eps", hue="budget", style="backbone"
             if len(backbones) > 1 else None, marker="o", errorbar=None, ax=ax)
for e in epsilons:
    ax.axhline(e, color="grey", lw=0.8, ls=":")
ax.set_xlabel("optimizer steps")
ax.set_ylabel(f"ε (δ = {delta:g})")
ax.set_title(f"{DP_NAME}: ε spent over training")
fig.tight_layout()

# %% [markdown]
# ## Balanced accuracy against the privacy budget
#
# Mean ± one standard deviation over seeds; the dashed line is the non-private model.

# %% tags=["hide-input"]
dp_runs = runs[runs["dp"].astype(bool)]
fig, ax = plt.subplots(figsize=(6, 3.6))
palette = dict(zip(backbones, sns.color_palette(n_colors=len(backbones))))
for b in backbones:
    agg = dp_runs[dp_runs["backbone"] == b].groupby("target_epsilon")["balanced_accuracy"].agg(
        ["mean", "std"]).reset_index()
    ax.errorbar(agg["target_epsilon"], agg["mean"], yerr=agg["std"].fillna(0), marker="o",
                capsize=3, color=palette[b], label=f"{DP_NAME}, {b}")
    ref = runs[(runs["backbone"] == b) & ~runs["dp"].astype(bool)]["balanced_accuracy"].mean()
    ax.axhline(ref, color=palette[b], ls="--", lw=1, label=f"non-private, {b}")
ax.axhline(1 / len(CLASSES), color="grey", ls=":", lw=1, label="chance (1/7)")
ax.set_xscale("log")
ax.set_xticks(epsilons)
ax.set_xticklabels([f"{e:g}" for e in epsilons])
ax.set_xlabel("ε (log scale)")
ax.set_ylabel("balanced accuracy")
ax.legend(fontsize=8, loc="best")
fig.tight_layout()

# %% [markdown]
# ## Who loses most under DP
#
# Recall of every class (mean over seeds) without privacy and at each budget, for the
# {glue:text}`backbone` network, and the drop in recall from the non-private model.

# %%
recall = recall_by_class(runs[runs["backbone"] == b0], ["budget"])
wide = recall.pivot_table(index="class", columns="budget", values="recall",
                          observed=True)[budget_order]
for e in sorted(epsilons):
    wide[f"drop at ε = {e:g}"] = wide["non-private"] - wide[f"ε = {e:g}"]
wide

# %% tags=["hide-input"]
drops = wide[[c for c in wide.columns if c.startswith("drop")]].reset_index().melt(
    id_vars="class", var_name="budget", value_name="recall drop")
fig, ax = plt.subplots(figsize=(7, 3.4))
sns.barplot(data=drops, x="class", y="recall drop", hue="budget", ax=ax)
ax.axhline(0, color="black", lw=0.8)
ax.set_xlabel("")
ax.set_ylabel("non-private recall − DP recall")
fig.tight_layout()

# %% tags=["remove-cell"]
drop_lo = wide[f"drop at ε = {e_lo:g}"]
glue("worst_class", str(drop_lo.idxmax()), display=False)
glue("worst_drop", float(drop_lo.max()), display=False)
glue("best_class", str(drop_lo.idxmin()), display=False)
glue("best_drop", float(drop_lo.min()), display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`eps_lo:g` the class that loses most recall is
# {glue:text}`worst_class` ({glue:text}`worst_drop:.2f`), the one that loses least
# {glue:text}`best_class` ({glue:text}`best_drop:.2f`; a negative drop is a gain). Under DP,
# gradients of rare classes are clipped and drowned in the same noise as those of the frequent
# ones, so models drift towards the majority classes: a known disparate effect of DP-SGD
# (Bagdasaryan et al., 2019).
