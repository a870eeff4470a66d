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
lr_sgd = 0.05
lr_adam = 0.002
lr_dp_sgd = 0.5
lr_dp_adam = 0.003
max_grad_norm = 1.0
delta = 1.0e-5
num_threads = None
class_weights = "balanced"
proposed_lr = 8.0
proposed_batch_size = 256
proposed_epochs = 20
proposed_ema = 0.9
ablation_epsilons = [8.0]

# %% [markdown]
# # The proposed technique
#
# End-to-end DP training of a CNN on a few thousand skin-lesion images mostly learns to answer
# the majority class (chapters {doc}`02_dp_sgd` and {doc}`03_dp_adam`). The technique of this
# dissertation (defined, with its privacy proof, in the Methods chapter) changes three things:
#
# 1. **a data-independent front end**: each image becomes a fixed colour descriptor (a joint
#    RGB histogram of the lesion and of the whole image), computed without any training data,
#    so DP noise is spent on a linear head with few parameters instead of a CNN;
# 2. **logit adjustment by a private class histogram**: the class counts of the training set
#    are released once with the Gaussian mechanism and the loss is logit-adjusted by their log
#    (Menon et al., 2021), aiming the model at *balanced* accuracy; the release is composed
#    into the reported $\varepsilon$;
# 3. **large batches, many steps, EMA of the weights**: DP-SGD with batches of
#    {glue:text}`proposed_batch_size` and an exponential moving average of the weights
#    (post-processing, free of privacy cost).
#
# It is compared with non-private training, DP-SGD and DP-Adam of the end-to-end backbone on the
# same split, at every budget of the profile, and each component is removed in turn.

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dpskin_core import RunConfig, figures
from dpskin_core.experiments import (glue, grid, method_label, recall_by_class, summary_table,
                                     sweep)

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
b0 = backbones[0]
glue("proposed_batch_size", proposed_batch_size, display=False)

# %% [markdown]
# ## Training
#
# The non-private, DP-SGD and DP-Adam runs have the configurations of the earlier chapters and
# are read back from their records; the proposed runs and the ablations are trained here.

# %% tags=["hide-output"]
common = dict(dataset=dataset, data_root=data_root, synth_n=synth_n, image_size=image_size,
              progress=False, num_threads=num_threads, delta=delta, max_grad_norm=max_grad_norm)
e2e = RunConfig(name="end-to-end", backbone=b0, epochs=epochs, batch_size=batch_size, **common)
recipe = RunConfig(name="proposed", features="colour", backbone="colour_linear", dp=True,
                   target_epsilon=epsilons[0], logit_adjust=True, ema_decay=proposed_ema,
                   optimizer="sgd", lr=proposed_lr, momentum=0.9,
                   batch_size=proposed_batch_size, epochs=proposed_epochs,
                   augment_flips=False, augment_rot90=False, **common)
parts = {
    "non-private SGD": sweep(e2e.replace(optimizer="sgd", lr=lr_sgd, class_weights=class_weights),
                             grid(seed=seeds), runs_root),
    "non-private Adam": sweep(e2e.replace(optimizer="adam", lr=lr_adam,
                                          class_weights=class_weights), grid(seed=seeds), runs_root),
    "DP-SGD": sweep(e2e.replace(dp=True, target_epsilon=epsilons[0], optimizer="sgd", lr=lr_dp_sgd),
                    grid(target_epsilon=epsilons, seed=seeds), runs_root),
    "DP-Adam": sweep(e2e.replace(dp=True, target_epsilon=epsilons[0], optimizer="adam",
                                 lr=lr_dp_adam), grid(target_epsilon=epsilons, seed=seeds), runs_root),
    "proposed": sweep(recipe, grid(target_epsilon=epsilons, seed=seeds), runs_root),
    "proposed, non-private": sweep(recipe.replace(dp=False, target_epsilon=None),
                                   grid(seed=seeds), runs_root),
}
runs = pd.concat([df.assign(model=k) for k, df in parts.items()], ignore_index=True)
runs["ε"] = np.where(runs["dp"].astype(bool), runs["target_epsilon"], np.inf)

# %% [markdown]
# ## Balanced accuracy at each budget
#
# Test split, mean ± standard deviation over $n$ seeds; $\varepsilon = \infty$ is non-private.
# *σ* is the noise multiplier of the gradient steps; the proposed runs also release the class
# histogram with noise of standard deviation *hist σ* (in images), and their *achieved ε* is
# that of the composition of both.

# %%
table = summary_table(runs, ["model", "ε"], metrics=("balanced_accuracy", "accuracy", "auc_macro"))
runs["hist σ"] = runs["hist_noise"].where(runs["dp"].astype(bool) & runs["logit_adjust"].astype(bool))
extra = runs.groupby(["model", "ε"]).agg(**{
    "achieved ε": ("epsilon", "max"), "σ": ("noise_multiplier", "mean"),
    "hist σ": ("hist σ", "first"), "steps": ("steps", "mean")})
table = table.join(extra, on=["model", "ε"]).sort_values(["ε", "model"], ascending=[False, True])
table.set_index(["model", "ε"]).round({"achieved ε": 3, "σ": 3, "steps": 0})

# %% tags=["remove-cell"]
stats = runs.groupby(["model", "ε"])["balanced_accuracy"].agg(["mean", "std", "count"])


def bacc(model: str, eps: float) -> float:
    return float(stats.loc[(model, eps), "mean"])


np_ref = max(bacc("non-private SGD", np.inf), bacc("non-private Adam", np.inf))
for e in epsilons:
    key = f"{e:g}".replace(".", "_")
    best_dp = max(bacc("DP-SGD", e), bacc("DP-Adam", e))
    glue(f"prop_{key}", bacc("proposed", e), display=False)
    glue(f"prop_std_{key}", float(stats.loc[("proposed", e), "std"]), display=False)
    glue(f"bestdp_{key}", best_dp, display=False)
    glue(f"gain_{key}", bacc("proposed", e) - best_dp, display=False)
    glue(f"ratio_{key}", bacc("proposed", e) / np_ref, display=False)
e_hi, e_lo = max(epsilons), min(epsilons)
glue("eps_hi", e_hi, display=False)
glue("eps_lo", e_lo, display=False)
glue("np_ref", np_ref, display=False)
glue("backbone", b0, display=False)
glue("n_seeds", int(stats["count"].min()), display=False)
hi = f"{e_hi:g}".replace(".", "_")
lo = f"{e_lo:g}".replace(".", "_")
glue("prop_hi", bacc("proposed", e_hi), display=False)
glue("prop_lo", bacc("proposed", e_lo), display=False)
glue("gain_hi", bacc("proposed", e_hi) - max(bacc("DP-SGD", e_hi), bacc("DP-Adam", e_hi)),
     display=False)
glue("gain_lo", bacc("proposed", e_lo) - max(bacc("DP-SGD", e_lo), bacc("DP-Adam", e_lo)),
     display=False)
glue("ratio_hi", bacc("proposed", e_hi) / np_ref, display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`eps_hi:g` the proposed technique reaches a balanced accuracy of
# {glue:text}`prop_hi:.3f`, {glue:text}`gain_hi:+.3f` against the better of DP-SGD and DP-Adam
# on the {glue:text}`backbone` network and {glue:text}`ratio_hi:.2f` times the better
# non-private model of that network ({glue:text}`np_ref:.3f`). At $\varepsilon$ =
# {glue:text}`eps_lo:g` it reaches {glue:text}`prop_lo:.3f` ({glue:text}`gain_lo:+.3f` against
# the better DP optimiser). Means over {glue:text}`n_seeds` seeds or more.

# %% tags=["hide-input"]
figures.bacc_vs_eps_figure(runs, "model", epsilons, delta);

# %% [markdown]
# ## Ablation: each component removed in turn
#
# The full recipe against the same recipe without logit adjustment (plain cross-entropy, no
# histogram release: its whole budget goes to the gradient steps), without the EMA of the
# weights, and without the colour front end (the end-to-end {glue:text}`backbone` on pixels at
# the DP-SGD learning rate of chapter {doc}`02_dp_sgd`, keeping logit adjustment and EMA).

# %% tags=["hide-output"]
ablations = {
    "without logit adjustment": recipe.replace(logit_adjust=False),
    "without EMA": recipe.replace(ema_decay=None),
    "without colour front end": recipe.replace(
        features="pixels", backbone=b0, lr=lr_dp_sgd, batch_size=batch_size, epochs=epochs,
        augment_flips=True, augment_rot90=True),
}
abl = pd.concat([sweep(cfg, grid(target_epsilon=ablation_epsilons, seed=seeds), runs_root)
                 .assign(model=name) for name, cfg in ablations.items()], ignore_index=True)
full = runs[(runs["model"] == "proposed") & runs["target_epsilon"].isin(ablation_epsilons)]
abl = pd.concat([full.assign(model="full recipe"), abl], ignore_index=True)

# %%
ab = abl.groupby(["model", "target_epsilon"])["balanced_accuracy"].agg(["mean", "std", "count"])
ref = ab.xs("full recipe", level="model")["mean"]
ab["change vs full"] = ab["mean"] - ref.reindex(ab.index.get_level_values("target_epsilon")).values
ab_table = ab.reset_index().pivot_table(index="model", columns="target_epsilon",
                                        values=["mean", "std", "change vs full"])
ab_table.columns = [f"{stat} (ε = {e:g})" for stat, e in ab_table.columns]
order = ["full recipe", *ablations]
ab_table.loc[order].round(3)

# %% tags=["remove-cell"]
e_ab = max(ablation_epsilons)
drops = {name: float(ab.loc[(name, e_ab), "change vs full"]) for name in ablations}
worst = min(drops, key=drops.get)
glue("abl_eps", e_ab, display=False)
glue("abl_worst", worst, display=False)
glue("abl_worst_drop", drops[worst], display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`abl_eps:g`, the component whose removal costs most is the one
# removed in "{glue:text}`abl_worst`" ({glue:text}`abl_worst_drop:+.3f` balanced accuracy).

# %% [markdown]
# ## Recall per class
#
# Mean test recall over seeds at the largest budget, for the end-to-end DP optimisers, the
# proposed technique and the non-private models: logit adjustment moves recall from NV to the
# rare classes.

# %% tags=["hide-input"]
sel = runs[(runs["ε"] == e_hi) | ~np.isfinite(runs["ε"])]
rec = recall_by_class(sel, ["model"])
fig, ax = plt.subplots(figsize=(8, 3.6))
sns.barplot(data=rec, x="class", y="recall", hue="model", ax=ax, errorbar=None)
ax.set_xlabel("")
ax.set_ylabel(f"recall (test; DP at ε = {e_hi:g})")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
