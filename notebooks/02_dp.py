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

# %% [markdown]
# # Training with DP
#
# Each backbone trained with {glue:text}`dp_name` at every privacy budget $\varepsilon$ of the
# profile ($\delta$ fixed), against the same backbone trained without privacy by the same
# optimiser. DP-SGD clips each example's gradient and adds Gaussian noise to their sum; DP-Adam
# feeds Adam's moment estimates with that same clipped and noised gradient, so for the same
# sampling rate, noise multiplier and number of steps both have exactly the same privacy cost
# (the moments are post-processing) and only the utility differs. The noise multiplier of each
# run is derived from its target $(\varepsilon, \delta)$, its sampling rate and its number of
# steps (see the Methods chapter) and read back from its record.

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them, e.g.
# {"epochs": 2, "seeds": [0]}. This one source is executed twice by the registry: the DP-SGD
# chapter (optimizer = "sgd") and the DP-Adam chapter (optimizer = "adam").
profile = "smoke"
overrides = {}
optimizer = "sgd"

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dpskin_core.book import figures, imbalance
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import sweep
from dpskin_core.book.tables import captioned, glue
from dpskin_core.training.recipes import RECIPES
from dpskin_core.training.records import load_metrics

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
backbones, epsilons, delta = P.backbones, P.epsilons, P.delta
DP_RECIPE = RECIPES.get(f"dp-{optimizer}")
DP_NAME = DP_RECIPE.label
glue("dp_name", DP_NAME, display=False)

# %% [markdown]
# ## Training
#
# The non-private reference runs are the ones of the baseline chapter (same configuration, so
# they are read back, not retrained); then one private run per backbone, budget and seed.

# %% tags=["hide-output"]
nonprivate = sweep(RECIPES.get(f"nonprivate-{optimizer}").configs(P), P.runs_root,
                   nproc=P.nproc)
private = sweep(DP_RECIPE.configs(P), P.runs_root, nproc=P.nproc)
runs = pd.concat([nonprivate, private], ignore_index=True)
budget_order = figures.with_budget(runs, epsilons)
metrics = load_metrics(P.runs_root)

# %% [markdown]
# ## Test-set results
#
# Mean ± standard deviation over seeds ($n$ seeds). *achieved ε* is what the accountant
# certifies after the last step (at most the target), $\sigma$ the noise multiplier the target
# required, *steps* the number of noisy gradient steps.

# %%
captioned(figures.dp_results_table(runs, budget_order),
          f"tbl-{optimizer}-results",
          f"{DP_NAME}: test metrics per network and privacy budget (mean ± std over seeds), "
          "with the achieved ε, the noise multiplier σ and the number of noisy steps.")

# %% tags=["remove-cell"]
b0 = backbones[0]
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
# Validation balanced accuracy and validation loss after each epoch, per privacy budget (mean
# over seeds, band: ± one standard deviation). A DP run records no loss or accuracy of its
# private training batches: those are computed on the training data without noise, and
# publishing them would release statistics of the training split outside the guarantee.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Validation balanced accuracy and loss after each epoch, per privacy budget (mean over seeds)."}}
figures.training_curves(metrics, runs, budget_order)
plt.show()

# %% [markdown]
# ## Privacy spent over training
#
# The accountant's $\varepsilon$ after each epoch, against the number of noisy steps taken. It
# grows sub-linearly in the number of steps and reaches the target exactly at the end: the
# noise multiplier was chosen for that.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "The accountant's ε after each epoch against the noisy steps taken."}}
figures.eps_over_steps_figure(metrics, runs, epsilons, delta, f"{DP_NAME}: ε spent over training");

# %% [markdown]
# ## Balanced accuracy against the privacy budget
#
# Mean ± one standard deviation over seeds; dashed: the non-private model of each backbone.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test balanced accuracy against the privacy budget (mean ± std over seeds); dashed: the non-private model."}}
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
captioned(wide,
          f"tbl-{optimizer}-recall-drop",
          f"Test recall per class of the {b0} network without privacy and at each budget, and its drop under {DP_NAME} (mean over seeds).")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Recall of every class without privacy and at each budget (mean over seeds)."}}
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
# {cite:p}`bagdasaryan2019disparate`.

# %% [markdown]
# ## Class imbalance: why not class weights
#
# The non-private references weight each example's loss by the inverse frequency of its
# class. Under DP that remedy is neutralised by clipping: a weight $w$ multiplies an example's
# gradient, and clipping then rescales every gradient longer than $C$ to exactly $C$, so the
# weight survives only where $w\,\lVert g\rVert < C$. The table measures it on
# {glue:text}`imb_n` validation images (a random subset), for the {glue:text}`backbone`
# network at its initialisation and as released by the run at $\varepsilon$ =
# {glue:text}`imb_eps:g` (seed {glue:text}`imb_seed`), with the inverse-frequency weights of the
# class counts HAM10000 published (public, so the weights themselves cost nothing). *effective
# weight*: the class's summed clipped gradient norm with the weights over the same sum without
# them (without clipping it would equal the nominal weight; 1: the weight is undone). The DP
# baselines instead shift their logits by a class prior released as a noisy histogram, counted
# in ε (the Methods chapter).

# %% tags=["hide-output"]
imb_cfg = DP_RECIPE.config(P, backbone=b0, target_epsilon=max(epsilons), seed=P.seeds[0])
imb = imbalance.run_clipping_table(imb_cfg, P.runs_root, n=1024, seed=0)

# %%
captioned(imb.set_index(["model", "class"]),
          f"tbl-{optimizer}-class-weights",
          f"Inverse-frequency class weights under per-example clipping (C = {imb_cfg.max_grad_norm:g}), "
          f"{DP_NAME} at ε = {max(epsilons):g}: nominal and effective weight, and the share of "
          "examples whose gradient is clipped.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Nominal and effective class weight under per-example clipping (log scale)."}}
imbalance.effective_weights_figure(imb)
plt.show()

# %% tags=["remove-cell"]
rel = imb[imb["model"] == "released"].set_index("class")
rare = rel["nominal weight"].idxmax()
glue("imb_n", int(rel["examples"].sum()), display=False)
glue("imb_eps", max(epsilons), display=False)
glue("imb_seed", P.seeds[0], display=False)
glue("imb_rare", str(rare), display=False)
glue("imb_rare_nominal", float(rel.loc[rare, "nominal weight"]), display=False)
glue("imb_rare_effective", float(rel.loc[rare, "effective weight"]), display=False)
glue("imb_clipped", float((rel["clipped (unweighted)"] * rel["examples"]).sum() / rel["examples"].sum()),
     display=False)

# %% [markdown]
# For the released model, {glue:text}`imb_clipped:.0%` of the examples' gradients are longer than
# $C$ before any weighting; the rarest class, {glue:text}`imb_rare`, nominally weighted
# {glue:text}`imb_rare_nominal:.1f`, contributes {glue:text}`imb_rare_effective:.2f` times its
# unweighted share.

# %% [markdown]
# ## The privacy unit: one image or one lesion
#
# The guarantee above is per training *image*: adding or removing one image changes what the
# model can reveal by at most $\varepsilon$. But many lesions were photographed several times,
# and a patient's lesion, not one photograph of it, is what a patient would want protected: an
# image-level guarantee covers a lesion with $k$ images only through group privacy, at roughly
# $k\varepsilon$. Lesion-level DP makes the lesion the unit: lesions are Poisson-sampled (a
# sampled lesion brings all its images) and the mean gradient of each lesion's images is
# clipped, so adding or removing a whole lesion changes the noisy update by at most the
# clipping bound, and the same accountant gives $\varepsilon$ per lesion. The expected batch
# is the profile's batch size in lesions. Both units are compared on the profile's first
# network: summing a lesion's gradients before clipping needs each image's gradient, which the
# book-keeping engine of the other runs never forms (the slower per-sample engine trains these).

# %% tags=["hide-output"]
LESION_RECIPE = RECIPES.get(f"dp-{optimizer}-lesion")
units = pd.concat([  # the first backbone only: lesion units need per-sample gradient rows
    sweep(R.configs(P, backbones=[b0], epsilons=P.lesion_epsilons), P.runs_root, nproc=P.nproc)
    for R in (DP_RECIPE, LESION_RECIPE)], ignore_index=True)
units["unit"] = units["privacy_unit"]

# %%
unit_table = figures.privacy_unit_table(units)
captioned(unit_table,
          f"tbl-{optimizer}-privacy-unit",
          f"{DP_NAME} with one image or one lesion as the privacy unit: test balanced accuracy at the same ε.")

# %% tags=["remove-cell"]
e_unit = max(P.lesion_epsilons)
by_unit = units[units["target_epsilon"] == e_unit].groupby("unit")["balanced_accuracy"].mean()
glue("unit_eps", e_unit, display=False)
glue("unit_image_bacc", float(by_unit["image"]), display=False)
glue("unit_lesion_bacc", float(by_unit["lesion"]), display=False)
glue("unit_cost", float(by_unit["image"] - by_unit["lesion"]), display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`unit_eps:g` per unit, {glue:text}`dp_name` reaches
# {glue:text}`unit_image_bacc:.3f` with an image as the unit and {glue:text}`unit_lesion_bacc:.3f`
# with a lesion (a difference of {glue:text}`unit_cost:+.3f`; positive: protecting whole lesions
# costs accuracy). There are fewer lesions than images, so at the same expected batch the
# lesion-level run takes fewer, larger steps with a larger sampling rate.
