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
# # Privacy-utility summary
#
# This chapter reads the run records of every experiment of the profile (it trains nothing)
# and puts the methods side by side: balanced accuracy against the privacy budget, one line per
# method, mean ± standard deviation over seeds.

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them.
profile = "smoke"
overrides = {}

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from dpskin_core.attacks.cards import read_attack_summary
from dpskin_core.book import figures
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import recipe_runs
from dpskin_core.book.tables import captioned, glue, recall_by_class, summary_table

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
runs_root, dataset, image_size, epochs = P.runs_root, P.dataset, P.image_size, P.epochs
backbones, seeds, epsilons, delta = P.backbones, P.seeds, P.epsilons, P.delta

# %%
# the runs of the recipes of chapters 01-04, found by their run ids (nothing is trained here)
runs = recipe_runs(["nonprivate-sgd", "nonprivate-adam", "dp-sgd", "dp-adam", "proposed"], P,
                   runs_root)
if runs.empty:
    raise RuntimeError(f"no complete runs of the current code in {runs_root}: execute the "
                       "training notebooks first (dpskin book)")
runs.loc[runs["recipe"] == "proposed", "backbone"] = backbones[0]  # compared on the same split
runs["method"] = runs["label"]
# a method that sees images at another side than the profile's (the technique's descriptor) says so
px = pd.to_numeric(runs["image_size"]).astype(int)
runs.loc[px != image_size, "method"] += " (" + px.astype(str) + " px)"
runs["ε"] = np.where(runs["dp"].astype(bool), runs["target_epsilon"], np.inf)
print(f"{len(runs)} runs from {runs_root} ({runs['method'].nunique()} methods, "
      f"{runs['backbone'].nunique()} backbones, seeds {sorted(int(v) for v in runs['seed'].unique())})")

# %% [markdown]
# ## The privacy-utility table
#
# Test-set metrics per method and target budget ($\varepsilon = \infty$: non-private),
# mean ± standard deviation over $n$ seeds ({numref}`tbl-summary`).

# %%
table = summary_table(runs, ["backbone", "method", "ε"])
achieved = runs.groupby(["backbone", "method", "ε"])["epsilon"].max().rename("max achieved ε")
table = table.join(achieved, on=["backbone", "method", "ε"])
table = table.sort_values(["backbone", "ε", "method"], ascending=[True, False, True])
captioned(table.set_index(["backbone", "method", "ε"]).round({"max achieved ε": 3}),
          "tbl-summary",
          "The privacy-utility table: test metrics per method and budget (mean ± std over n seeds).")

# %% [markdown]
# ## Privacy under attack
#
# What the guarantees mean against real attacks, from chapter {doc}`05_attacks` (its privacy
# cards): per attacked model, its $\varepsilon$ and $\delta$, its balanced accuracy (trained
# on half of the attack pool, so below the table above), the strongest membership-inference
# attack's ROC AUC (0.5: a random guess) and true-positive rate at 0.1 % false positives, and
# the lower bound on $\varepsilon$ of a one-run canary audit, which must not exceed the
# accountant's $\varepsilon$.

# %% tags=["hide-input"]
privacy = read_attack_summary(runs_root)
if privacy is None:
    display(Markdown(f"*No attack results in `{runs_root}` yet: the attacks chapter has not been "
                     "executed for this profile (`dpskin book --only 05_attacks`).*"))
else:
    display(captioned(figures.privacy_table(privacy)[["ε", "δ", "balanced accuracy", "MIA AUC",
                                                      "TPR @ 0.1 % FPR", "ε lower bound"]],
                      "tbl-summary-privacy",
                      "Privacy measured: each attacked model's ε, balanced accuracy, membership "
                      "inference and the audit's ε lower bound."))

# %% tags=["remove-cell"]
# the summary chapter's sentences: the most exposed non-private model (highest MIA AUC), the
# range over the private ones, and whether every audit bound stays below its accountant's eps
nan = float("nan")
if privacy is not None and (~privacy["dp"].astype(bool)).any():
    npv = privacy[~privacy["dp"].astype(bool)].sort_values("mia_auc", ascending=False).iloc[0]
    glue("leak_np_model", str(npv["model"]), display=False)
    for k in ("mia_auc", "mia_tpr_at_fpr_0.001", "eps_lower_bound"):
        glue(f"leak_np_{k.replace('.', '_')}", float(npv[k]), display=False)
else:
    glue("leak_np_model", "(none attacked)", display=False)
    for k in ("mia_auc", "mia_tpr_at_fpr_0_001", "eps_lower_bound"):
        glue(f"leak_np_{k}", nan, display=False)
dpv = privacy[privacy["dp"].astype(bool)] if privacy is not None else None
has_dp = dpv is not None and len(dpv) > 0
glue("leak_dp_auc_min", float(dpv["mia_auc"].min()) if has_dp else nan, display=False)
glue("leak_dp_auc_max", float(dpv["mia_auc"].max()) if has_dp else nan, display=False)
glue("leak_dp_lb_max", float(dpv["eps_lower_bound"].max()) if has_dp else nan, display=False)
glue("leak_dp_valid", ("every" if (dpv["eps_lower_bound"] <= dpv["epsilon"]).all() else "NOT every")
     if has_dp else "no", display=False)

# %% [markdown]
# ## Balanced accuracy against ε
#
# One line per private method (error bars: ± one standard deviation over seeds); the
# non-private methods are horizontal lines with their ± one standard deviation band. The number
# of seeds behind every point is in the legend.
#
# {numref}`fig-summary-vs-eps` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test balanced accuracy against ε of every method on the first network (mean ± std over seeds).", "name": "fig-summary-vs-eps"}}
b_main = backbones[0]
sub = runs[runs["backbone"] == b_main]
dp = sub[sub["dp"].astype(bool)]
npv = sub[~sub["dp"].astype(bool)]
methods_dp = sorted(dp["method"].unique())
methods_np = sorted(npv["method"].unique())
figures.bacc_vs_eps_figure(sub.sort_values("dp", ascending=False), "method", epsilons, delta,
                           f"{b_main}, {dataset} at {image_size} px, {epochs} epochs");

# %% tags=["remove-cell"]
def stat(method, eps):
    v = sub[(sub["method"] == method) & (sub["ε"] == eps)]["balanced_accuracy"]
    return v.mean(), v.std(), len(v)

e_lo, e_hi = float(min(epsilons)), float(max(epsilons))
glue("delta", f"{delta:g}", display=False)
glue("eps_min", f"{e_lo:g}", display=False)
glue("eps_max", f"{e_hi:g}", display=False)
glue("backbone", b_main, display=False)
glue("dataset", dataset, display=False)
glue("n_runs", len(runs), display=False)
glue("n_seeds", len(seeds), display=False)
best_np = max(methods_np, key=lambda m: stat(m, np.inf)[0])
m_, s_, n_ = stat(best_np, np.inf)
glue("np_method", best_np, display=False)
glue("np_bacc", m_, display=False)
glue("np_std", s_, display=False)
best_hi = max(methods_dp, key=lambda m: stat(m, e_hi)[0])
best_lo = max(methods_dp, key=lambda m: stat(m, e_lo)[0])
for tag, m, e in (("hi", best_hi, e_hi), ("lo", best_lo, e_lo)):
    mean, std, n = stat(m, e)
    glue(f"dp_{tag}_method", m, display=False)
    glue(f"dp_{tag}_bacc", mean, display=False)
    glue(f"dp_{tag}_std", std, display=False)
    gap = m_ - mean  # worded for people: a loss, or a gain when private beats non-private
    glue(f"dp_{tag}_gap", f"a loss of {gap:.3f}" if gap >= 0 else f"a gain of {-gap:.3f}", display=False)
for m in methods_dp:
    key = m.lower().replace("-", "_")
    for tag, e in (("hi", e_hi), ("lo", e_lo)):
        mean, std, n = stat(m, e)
        glue(f"{key}_{tag}_bacc", mean, display=False)
        glue(f"{key}_{tag}_std", std, display=False)

# %% [markdown]
# With the {glue:text}`backbone` network, the best non-private model
# ({glue:text}`np_method`) reaches {glue:text}`np_bacc:.3f` ± {glue:text}`np_std:.3f`. At
# $\varepsilon$ = {glue:text}`eps_max` the best private method is {glue:text}`dp_hi_method`
# with {glue:text}`dp_hi_bacc:.3f` ± {glue:text}`dp_hi_std:.3f`, {glue:text}`dp_hi_gap` in
# balanced accuracy; at $\varepsilon$ = {glue:text}`eps_min` it is {glue:text}`dp_lo_method`
# with {glue:text}`dp_lo_bacc:.3f` ± {glue:text}`dp_lo_std:.3f` ({glue:text}`dp_lo_gap`). Every value is a mean over {glue:text}`n_seeds`
# seeds.

# %% [markdown]
# ## Recall per class, method and budget
#
# Mean test recall over seeds. Rows are ordered from the non-private models to the smallest
# budget.
#
# {numref}`fig-summary-recall` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Test recall per class, method and budget (mean over seeds).", "name": "fig-summary-recall"}}
rec = recall_by_class(sub, ["method", "ε"])
rec["model"] = np.where(np.isinf(rec["ε"]), rec["method"],
                        rec["method"] + ", ε = " + rec["ε"].map("{:g}".format))
order = (rec[["model", "ε", "method"]].drop_duplicates()
         .sort_values(["ε", "method"], ascending=[False, True])["model"].tolist())
heat = rec.pivot_table(index="model", columns="class", values="recall", observed=True).loc[order]
fig, ax = plt.subplots(figsize=(7.2, 0.45 * len(heat) + 1.2))
sns.heatmap(heat, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, cbar=False, ax=ax)
ax.set_xlabel("")
ax.set_ylabel("")
fig.tight_layout()

# %% tags=["remove-cell"]
np_rec = rec[np.isinf(rec["ε"])].groupby("class", observed=True)["recall"].mean()
lo_rec = rec[rec["ε"] == e_lo].groupby("class", observed=True)["recall"].mean()
drop = (np_rec - lo_rec).dropna()
glue("worst_class", str(drop.idxmax()), display=False)
glue("worst_drop", float(drop.max()), display=False)

# %% [markdown]
# Averaged over the methods, the class whose recall drops most between the non-private models
# and $\varepsilon$ = {glue:text}`eps_min` is {glue:text}`worst_class`
# ({glue:text}`worst_drop:.2f`).
