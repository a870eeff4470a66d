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
optimizer = "sgd"
lr_sgd = 0.05
lr_adam = 0.002
lr_dp_sgd = 0.5
lr_dp_adam = 0.003
max_grad_norm = 1.0
delta = 1.0e-5
num_threads = None
class_weights = "balanced"

# %% [markdown]
# # DP-SGD
#
# Each backbone trained with DP-SGD at every privacy budget $\varepsilon$ of the profile
# ($\delta$ fixed), against the same backbone trained without privacy by the same optimiser.
# The noise multiplier of each run is derived from its target $(\varepsilon, \delta)$, its
# sampling rate and its number of steps (see the Methods chapter) and read back from its record.

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dpskin_core import RunConfig
from dpskin_core import figures
from dpskin_core.experiments import glue, grid, method_label, sweep
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
budget_order = figures.with_budget(runs, epsilons)
metrics = load_metrics(runs_root)

# %% [markdown]
# ## Test-set results
#
# Mean ± standard deviation over seeds ($n$ seeds). *achieved ε* is what the accountant
# certifies after the last step (at most the target), $\sigma$ the noise multiplier the target
# required, *steps* the number of noisy gradient steps.

# %%
figures.dp_results_table(runs, budget_order)

# %% tags=["remove-cell"]
b0 = backbones[0]
glue("dp_name", DP_NAME, display=False)
for key, value in figures.dp_headline(runs, b0, epsilons).items():
    glue(key, value, display=False)

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
figures.training_curves(metrics, runs, budget_order)
plt.show()

# %% [markdown]
# ## Privacy spent over training
#
# The accountant's $\varepsilon$ after each epoch, against the number of noisy steps taken. It
# grows sub-linearly in the number of steps and reaches the target exactly at the end: the
# noise multiplier was chosen for that.

# %% tags=["hide-input"]
figures.eps_over_steps_figure(metrics, runs, epsilons, delta, f"{DP_NAME}: ε spent over training");

# %% [markdown]
# ## Balanced accuracy against the privacy budget
#
# Mean ± one standard deviation over seeds; dashed: the non-private model of each backbone.

# %% tags=["hide-input"]
runs["model"] = [f"{DP_NAME}, {b}" if dp else f"non-private, {b}"
                 for dp, b in zip(runs["dp"].astype(bool), runs["backbone"])]
figures.bacc_vs_eps_figure(runs, "model", epsilons, delta);

# %% [markdown]
# ## Who loses most under DP
#
# Recall of every class (mean over seeds) without privacy and at each budget, for the
# {glue:text}`backbone` network, and the drop in recall from the non-private model.

# %%
wide = figures.recall_drop(runs, b0, epsilons, budget_order)
wide

# %% tags=["hide-input"]
figures.recall_drop_figure(wide);

# %% tags=["remove-cell"]
drop_lo = wide[f"drop at ε = {min(epsilons):g}"]
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
