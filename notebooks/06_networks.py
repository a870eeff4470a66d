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
# # What DP costs each network
#
# The performance drop, network by network: every backbone of the profile trained without
# privacy to convergence (chapter {doc}`01_baseline`) and, those of the profile's
# `dp_backbones`, by DP-SGD and DP-Adam at every budget (chapters {doc}`02_dp_sgd` and
# {doc}`03_dp_adam`), at the same resolution and on the same lesion-grouped split; a network
# without DP runs in this profile shows its reference only (— at the finite budgets). A DP run is paired with the non-private run of its optimiser
# (DP-SGD with SGD, DP-Adam with Adam); ε = ∞ is that reference. Then how the non-private
# references generalise to another acquisition site (leave-one-site-out), a question DP
# cannot answer for them but the dissertation must.

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them.
profile = "smoke"
overrides = {}
loso_backbones = None  # networks of the leave-one-site-out runs (None: the profile's first)
loso_seeds = None      # their seeds (None: the profile's seeds)

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from dpskin_core.book import drop
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import recipe_runs, sweep
from dpskin_core.book.tables import captioned, glue
from dpskin_core.training.recipes import RECIPES

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
epsilons = P.epsilons

# %% [markdown]
# ## The runs
#
# The runs of chapters 01–03 are read back by their run ids (nothing of theirs is trained
# here).

# %%
runs = recipe_runs(["nonprivate-sgd", "nonprivate-adam", "dp-sgd", "dp-adam"], P, P.runs_root)
if runs.empty:
    raise RuntimeError(f"no complete runs of the current code in {P.runs_root}: execute "
                       "chapters 01-03 first (dpskin book)")
print(f"{len(runs)} runs: {runs['backbone'].nunique()} networks at {P.image_size} px, "
      f"seeds {sorted(int(s) for s in runs['seed'].unique())}")
captioned(drop.network_sizes(P.backbones),
          "tbl-network-sizes",
          "The networks compared: trainable parameters (millions) and layers with weights, as the DP runs build them.")

# %% [markdown]
# ## Balanced accuracy at every budget
#
# Test balanced accuracy, mean ± standard deviation over $n$ seeds; *drop*: the non-private
# mean minus the DP mean (positive: lost to DP); *kept*: the fraction of the non-private
# score that remains ({numref}`tbl-drop`).

# %%
table = drop.accuracy_table(runs, epsilons)
captioned(table,
          "tbl-drop",
          "Test balanced accuracy of every network at every budget (mean ± std over n seeds), the drop from non-private and the fraction kept.")

# %% tags=["remove-cell"]
eps_lo, eps_hi = min(epsilons), max(epsilons)
d_hi = table[f"drop at ε = {eps_hi:g}"]
worst, best = d_hi.idxmax(), d_hi.idxmin()
glue("eps_hi", eps_hi, display=False)
glue("eps_lo", eps_lo, display=False)
glue("worst_net", f"{worst[0]} (DP-{worst[1]})", display=False)
glue("worst_drop", float(d_hi.max()), display=False)
glue("best_net", f"{best[0]} (DP-{best[1]})", display=False)
glue("best_drop", float(d_hi.min()), display=False)
glue("n_min", int(table["n"].min()), display=False)

# %% [markdown]
# At $\varepsilon$ = {glue:text}`eps_hi:g` the network that loses most is
# {glue:text}`worst_net` ({glue:text}`worst_drop:.3f` balanced accuracy), the one that loses
# least {glue:text}`best_net` ({glue:text}`best_drop:.3f`; at least $n$ =
# {glue:text}`n_min` seeds per cell). With a fixed clipping bound the noise added per step has
# the same norm per coordinate for every network, so its total grows with the number of
# parameters while the clipped signal does not: large networks trained from scratch pay most,
# unless their extra capacity buys more than the noise costs.
#
# {numref}`fig-networks-drop` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test balanced accuracy of every network at every budget and its drop from the non-private reference.", "name": "fig-networks-drop"}}
long = drop.drop_long(runs)
drop.drop_figure(long)
plt.show()

# %% [markdown]
# ## Which classes pay
#
# Recall lost per class (non-private minus DP, mean over seeds) at the smallest and largest
# budget. DP pulls models toward the frequent classes (NV above all): the rare classes'
# clipped gradients drown in the same noise.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Recall drop per class of one network at each budget."}}
for e in sorted({eps_lo, eps_hi}):
    rd = drop.recall_drop_by_network(runs, e)
    if not rd.empty:
        drop.recall_drop_heatmap(rd, e)
        plt.show()

# %% [markdown]
# ## Collapsed models
#
# A model that predicts one or two classes only scores near chance in balanced accuracy
# whatever its plain accuracy; the record of every run counts the classes its released model
# predicts on the test split.

# %%
captioned(drop.collapse_table(runs),
          "tbl-collapse",
          "Runs whose released model predicts only one or two classes on the test split.")

# %% [markdown]
# ## Generalisation to another acquisition site
#
# The non-private Adam reference of the network(s) below trained on all HAM10000 acquisition
# sites but one (training and validation split by lesion) and tested on every image of the held-out
# site, next to its score on the lesion-grouped test split. The held-out site has its own
# camera, lighting and population, as the official ISIC 2018 test images do.

# %% tags=["hide-output"]
loso_nets = list(loso_backbones or P.backbones[:1])
loso = (sweep(RECIPES.get("loso-adam").configs(P, backbones=loso_nets, seeds=loso_seeds), P.runs_root,
              nproc=P.nproc) if P.loso_sites else pd.DataFrame())

# %%
if loso.empty:
    display(Markdown(f"*Not measured in the `{P.profile}` profile* (its data has no acquisition "
                     "sites, or `loso_sites` is empty)."))
else:
    display(captioned(drop.loso_table(loso, runs[runs["recipe"] == "nonprivate-adam"]), "tbl-loso",
                      "Leave one site out: balanced accuracy on every image of the held-out "
                      "acquisition site beside the lesion-grouped test split."))
