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
# # The proposed technique
#
# End-to-end DP training of a CNN on a few thousand skin-lesion images mostly learns to answer
# the majority class (chapters {doc}`02_dp_sgd` and {doc}`03_dp_adam`). The technique of this
# dissertation (defined, with its privacy proof, in the Methods chapter) changes four things:
#
# 1. **a data-independent front end**: each image is first divided by its own illuminant
#    estimate (Shades of Gray colour constancy, the Minkowski 6-norm mean of each channel
#    {cite:p}`finlayson2004shades`), so that the colour cast of a clinic's camera and light
#    counts less, then becomes a fixed dermoscopy descriptor, computed without any training
#    data: colour histograms (RGB and hue-saturation-value, of the lesion
#    and of the whole image), colour moments (the lesion against the surrounding skin) and
#    gradient statistics of the luminance at three scales (texture), each block scaled to unit
#    norm per image, of the images at {glue:text}`proposed_px` px (the end-to-end networks see
#    {glue:text}`image_px` px: the descriptor's size does not grow with the image's, and its
#    texture and hue statistics are finer at a larger side); DP noise is then spent on a linear
#    head with few parameters instead of a CNN;
# 2. **private feature normalisation**: the head standardises its inputs with their mean and
#    variance over the training images, computed from one Gaussian release of their count, sum
#    and sum of squares (every row has norm 2, which bounds the sensitivity), as
#    {cite:t}`tramer2021better` normalise their scattering features; the release is
#    composed into the reported $\varepsilon$;
# 3. **logit adjustment by a private class histogram**: the class counts of the training set
#    are released once with the Gaussian mechanism and the loss is logit-adjusted by their log
#    {cite:p}`menon2021logit`, aiming the model at *balanced* accuracy; the release is composed
#    into the reported $\varepsilon$;
# 4. **large batches, many steps, EMA of the weights**: DP-SGD with batches of
#    {glue:text}`proposed_batch_size` and an exponential moving average of the weights
#    (post-processing, free of privacy cost), levers of {cite:t}`de2022unlocking`.
#
# The schedule of item 4 is fixed by hand, and that choice is not counted in $\varepsilon$
# (Methods); chapter {doc}`07_tuning` chooses it instead by a private search whose cost is.
#
# The technique's first generation (colour histograms alone, no normalisation) is kept as a
# recipe of its own and compared.
#
# It is compared with non-private training, DP-SGD and DP-Adam of the end-to-end backbone on the
# same split, at every budget of the profile, and each component is removed in turn.

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them, e.g.
# {"epochs": 2, "seeds": [0]}.
profile = "smoke"
overrides = {}
ablation_epsilons = [8.0]

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dpskin_core.book import figures
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import sweep
from dpskin_core.book.tables import captioned, glue, recall_by_class, summary_table
from dpskin_core.training.recipes import RECIPES

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
epsilons, delta = P.epsilons, P.delta
b0 = P.backbones[0]
glue("proposed_batch_size", P.proposed_batch_size, display=False)
glue("proposed_px", RECIPES.get("proposed").config(P, seed=P.seeds[0]).image_size, display=False)
glue("image_px", P.image_size, display=False)

# %% [markdown]
# ## Training
#
# The non-private, DP-SGD and DP-Adam runs have the configurations of the earlier chapters and
# are read back from their records; the proposed runs and the ablations are trained here.

# %% tags=["hide-output"]
# the end-to-end recipes on the first backbone of the profile; the proposed recipe and its
# non-private counterpart (the recipes are defined in dpskin_core.training.recipes)
compared = ["nonprivate-sgd", "nonprivate-adam", "dp-sgd", "dp-adam", "proposed",
            "proposed-nonprivate", "proposed-colour"]
parts = {RECIPES.get(name).label: sweep(RECIPES.get(name).configs(P, backbones=[b0]), P.runs_root,
                                            nproc=P.nproc)
         for name in compared}
runs = pd.concat([df.assign(model=k) for k, df in parts.items()], ignore_index=True)
runs["ε"] = np.where(runs["dp"].astype(bool),
                    pd.to_numeric(runs["target_epsilon"], errors="coerce"), np.inf).astype(float)

# %% [markdown]
# ## Balanced accuracy at each budget
#
# Test split ({numref}`tbl-proposed`), mean ± standard deviation over $n$ seeds;
# $\varepsilon = \infty$ is non-private.
# *σ* is the noise multiplier of the gradient steps; the proposed runs also release the class
# histogram with noise of standard deviation *hist σ* (in images) and, in the second
# generation, the feature statistics with noise multiplier *stats σ*; their *achieved ε* is
# that of the composition of every release.

# %%
table = summary_table(runs, ["model", "ε"], metrics=("balanced_accuracy", "accuracy", "auc_macro"))
runs["hist σ"] = runs["hist_noise"].where(runs["dp"].astype(bool) & runs["logit_adjust"].astype(bool))
runs["stats σ"] = runs["stats_noise"].where(runs["dp"].astype(bool)
                                            & (runs["feature_norm"] == "private"))
extra = runs.groupby(["model", "ε"]).agg(**{
    "achieved ε": ("epsilon", "max"), "σ": ("noise_multiplier", "mean"),
    "hist σ": ("hist σ", "first"), "stats σ": ("stats σ", "first"), "steps": ("steps", "mean")})
table = table.join(extra, on=["model", "ε"]).sort_values(["ε", "model"], ascending=[False, True])
captioned(table.set_index(["model", "ε"]).round({"achieved ε": 3, "σ": 3, "steps": 0}),
          "tbl-proposed",
          "Test metrics of the proposed technique and the end-to-end baselines at each budget (mean ± std over n seeds), with the noise of each release.")

# %% tags=["remove-cell"]
stats = runs.groupby(["model", "ε"])["balanced_accuracy"].agg(["mean", "std", "count"])


def bacc(model: str, eps: float) -> float:
    return float(stats.loc[(model, eps), "mean"])


PROPOSED, NP_SGD, NP_ADAM, DP_SGD, DP_ADAM = (RECIPES.get(n).label for n in (
    "proposed", "nonprivate-sgd", "nonprivate-adam", "dp-sgd", "dp-adam"))
np_ref = max(bacc(NP_SGD, np.inf), bacc(NP_ADAM, np.inf))
for e in epsilons:
    key = f"{e:g}".replace(".", "_")
    best_dp = max(bacc(DP_SGD, e), bacc(DP_ADAM, e))
    glue(f"prop_{key}", bacc(PROPOSED, e), display=False)
    glue(f"prop_std_{key}", float(stats.loc[(PROPOSED, e), "std"]), display=False)
    glue(f"bestdp_{key}", best_dp, display=False)
    glue(f"gain_{key}", bacc(PROPOSED, e) - best_dp, display=False)
    glue(f"ratio_{key}", bacc(PROPOSED, e) / np_ref, display=False)
e_hi, e_lo = max(epsilons), min(epsilons)
glue("eps_hi", e_hi, display=False)
glue("eps_lo", e_lo, display=False)
glue("np_ref", np_ref, display=False)
glue("backbone", b0, display=False)
glue("n_seeds", int(stats["count"].min()), display=False)
hi = f"{e_hi:g}".replace(".", "_")
lo = f"{e_lo:g}".replace(".", "_")
glue("prop_hi", bacc(PROPOSED, e_hi), display=False)
glue("prop_lo", bacc(PROPOSED, e_lo), display=False)
glue("gain_hi", bacc(PROPOSED, e_hi) - max(bacc(DP_SGD, e_hi), bacc(DP_ADAM, e_hi)),
     display=False)
glue("gain_lo", bacc(PROPOSED, e_lo) - max(bacc(DP_SGD, e_lo), bacc(DP_ADAM, e_lo)),
     display=False)
glue("ratio_hi", bacc(PROPOSED, e_hi) / np_ref, display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`eps_hi:g` the proposed technique reaches a balanced accuracy of
# {glue:text}`prop_hi:.3f`, {glue:text}`gain_hi:+.3f` against the better of DP-SGD and DP-Adam
# on the {glue:text}`backbone` network and {glue:text}`ratio_hi:.2f` times the better
# non-private model of that network ({glue:text}`np_ref:.3f`; the networks see
# {glue:text}`image_px` px images, the technique's descriptor {glue:text}`proposed_px` px).
# At $\varepsilon$ = {glue:text}`eps_lo:g` it reaches {glue:text}`prop_lo:.3f`
# ({glue:text}`gain_lo:+.3f` against the better DP optimiser). Means over
# {glue:text}`n_seeds` seeds or more.
#
# {numref}`fig-proposed-vs-eps` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test balanced accuracy against ε of the proposed technique, its ablations and the end-to-end DP optimisers (mean ± std over seeds).", "name": "fig-proposed-vs-eps"}}
figures.bacc_vs_eps_figure(runs, "model", epsilons, delta);

# %% [markdown]
# ## Ablation: each component removed in turn
#
# The full recipe against the same recipe without logit adjustment (plain cross-entropy, no
# histogram release), without colour constancy (the images as stored), without the EMA of the
# weights, without the private normalisation (the
# features as the front end gives them, no statistics released), with the descriptor of the
# images at {glue:text}`image_px` px (the profile's side; the same recipe where the two sides are
# equal), without the front end (the end-to-end {glue:text}`backbone` on pixels at
# {glue:text}`image_px` px with the DP-SGD learning rate, batch, epochs and EMA of chapter
# {doc}`02_dp_sgd`, keeping the technique's logit adjustment), with the other data-independent
# front end, wavelet scattering coefficients of the images at {glue:text}`image_px` px and
# their linear head, in place of the dermoscopy features (compare it with the descriptor at
# the same side), and the first generation (colour histograms alone, not normalised, at
# {glue:text}`image_px` px).

# %% tags=["hide-output"]
ablations = [RECIPES.get(n) for n in ("ablation/no-logit-adjustment",
                                       "ablation/no-colour-constancy", "ablation/no-ema",
                                       "ablation/no-private-normalisation",
                                       "ablation/profile-resolution", "ablation/no-front-end",
                                       "ablation/scatter-front-end",
                                       "proposed-colour")]
abl = pd.concat([sweep(r.configs(P, epsilons=ablation_epsilons), P.runs_root,
                       nproc=P.nproc).assign(model=r.label)
                 for r in ablations], ignore_index=True)
full = runs[(runs["model"] == PROPOSED) & runs["target_epsilon"].isin(ablation_epsilons)]
abl = pd.concat([full.assign(model="full recipe"), abl], ignore_index=True)

# %%
ab = abl.groupby(["model", "target_epsilon"])["balanced_accuracy"].agg(["mean", "std", "count"])
ref = ab.xs("full recipe", level="model")["mean"]
ab["change vs full"] = ab["mean"] - ref.reindex(ab.index.get_level_values("target_epsilon")).values
ab_table = ab.reset_index().pivot_table(index="model", columns="target_epsilon",
                                        values=["mean", "std", "change vs full"])
ab_table.columns = [f"{stat} (ε = {e:g})" for stat, e in ab_table.columns]
order = ["full recipe", *(r.label for r in ablations)]
captioned(ab_table.loc[order].round(3),
          "tbl-ablation",
          "Ablation: test balanced accuracy of the full recipe and of the recipe with each component removed (mean and std over seeds).")

# %% tags=["remove-cell"]
e_ab = max(ablation_epsilons)
drops = {r.label: float(ab.loc[(r.label, e_ab), "change vs full"]) for r in ablations}
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
#
# {numref}`fig-proposed-recall` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test recall per class at the largest budget (mean over seeds).", "name": "fig-proposed-recall"}}
eps_of_run = runs["ε"].astype(float)
sel = runs[(eps_of_run == e_hi) | ~np.isfinite(eps_of_run)]
rec = recall_by_class(sel, ["model"])
fig, ax = plt.subplots(figsize=(8, 3.6))
sns.barplot(data=rec, x="class", y="recall", hue="model", ax=ax, errorbar=None)
ax.set_xlabel("")
ax.set_ylabel(f"recall (test; DP at ε = {e_hi:g})")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
