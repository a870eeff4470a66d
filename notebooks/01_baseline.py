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
# # Non-private baseline
#
# The reference every private model is measured against: each backbone of the profile trained
# without privacy, with SGD (momentum 0.9) and with Adam, on the same data and augmentation as
# the private runs of the next chapters, **to convergence**: a linear learning-rate warm-up,
# a cosine schedule over at most {glue:text}`max_epochs` epochs, stopped once the validation
# balanced accuracy has not improved for {glue:text}`patience` epochs (the best validation
# epoch is the model). The loss is weighted by inverse class frequency (`class_weights`
# parameter): a non-private model may read the class counts of its training data, and without
# the weights it would mostly answer NV. Private runs cannot use these weights (the counts are
# private data; see the Methods chapter).

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them, e.g.
# {"epochs": 2, "seeds": [0]}.
profile = "smoke"
overrides = {}
optimizers = ["sgd", "adam"]

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dpskin_core import CLASSES
from dpskin_core.book import figures
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import sweep
from dpskin_core.book.tables import captioned, glue, recall_by_class, summary_table
from dpskin_core.training.metrics import confusion_matrix
from dpskin_core.training.recipes import RECIPES
from dpskin_core.training.records import load_metrics, load_predictions

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
backbones = P.backbones
glue("max_epochs", P.epochs, display=False)
glue("patience", P.patience if P.patience is not None else "no", display=False)

# %% [markdown]
# ## Training
#
# One run per backbone, optimiser and seed. A run whose configuration and code version already
# ran is read back from its record instead of being trained again.

# %% tags=["hide-output"]
runs = sweep([cfg for o in optimizers for cfg in RECIPES.get(f"nonprivate-{o}").configs(P)],
             P.runs_root, nproc=P.nproc)
runs["method"] = runs["label"]

# %% [markdown]
# ## Test-set results
#
# Mean ± standard deviation over seeds ($n$ = number of seeds) on the test split
# ({numref}`tbl-baseline`).

# %%
table = summary_table(runs, ["backbone", "method"])
speed = runs.groupby(["backbone", "method"])[["train_images_per_s", "wall_time_s"]].mean()
table = table.join(speed.round(0), on=["backbone", "method"]).rename(
    columns={"train_images_per_s": "train img/s", "wall_time_s": "wall time (s)"})
epochs_run = runs.groupby(["backbone", "method"]).agg(
    **{"best epoch": ("eval_epoch", "mean"), "collapsed runs": ("collapsed", "sum")})
table = table.join(epochs_run, on=["backbone", "method"])
captioned(table.set_index(["backbone", "method"]),
          "tbl-baseline",
          "Test metrics of the non-private references (mean ± std over n seeds), their training speed and the epoch chosen on validation.")

# %% tags=["remove-cell"]
means = runs.groupby(["backbone", "method"])["balanced_accuracy"].agg(["mean", "std", "count"])
best = means["mean"].idxmax()
glue("best_model", f"{best[1]} with {best[0]}", display=False)
glue("best_bacc", means.loc[best, "mean"], display=False)
glue("best_std", means.loc[best, "std"], display=False)
glue("n_seeds", int(means.loc[best, "count"]), display=False)
glue("chance", 1 / len(CLASSES), display=False)
best_runs = runs[(runs["backbone"] == best[0]) & (runs["method"] == best[1])]
glue("best_acc", best_runs["accuracy"].mean(), display=False)
glue("best_auc", best_runs["auc_macro"].mean(), display=False)

# %% [markdown]
# The best non-private model, {glue:text}`best_model`, reaches a balanced accuracy of
# {glue:text}`best_bacc:.3f` ± {glue:text}`best_std:.3f` ($n$ = {glue:text}`n_seeds` seeds),
# against {glue:text}`chance:.3f` for a classifier that always predicts one class; its plain
# accuracy is {glue:text}`best_acc:.3f` and its macro AUC {glue:text}`best_auc:.3f`.

# %% [markdown]
# ## Training curves
#
# Validation balanced accuracy and validation loss after each epoch (mean over seeds, band:
# ± one standard deviation); the private chapters show the same curves (a DP run records no
# loss of its private training batches).
#
# {numref}`fig-baseline-curves` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Validation balanced accuracy and loss of the non-private references after each epoch (mean over seeds).", "name": "fig-baseline-curves"}}
metrics = load_metrics(P.runs_root)
figures.training_curves(metrics, runs, sorted(runs["method"].unique()), hue="method")
plt.show()

# %% [markdown]
# ## Per-class recall
#
# Balanced accuracy is the mean of these recalls. The rare classes are where a model can gain
# or lose most.

# %%
recall = recall_by_class(runs, ["backbone", "method"])
captioned(recall.pivot_table(index=["backbone", "method"], columns="class", values="recall",
                   observed=True),
          "tbl-baseline-recall",
          "Test recall per class of the non-private references (mean over seeds).")

# %% [markdown]
# ## Confusion matrix
#
# Of the best model, summed over its seeds and normalised per true class (rows sum to 1).
#
# {numref}`fig-confusion` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Confusion matrix of the best non-private model, summed over its seeds, normalised per true class.", "name": "fig-confusion"}}
cm = sum(confusion_matrix(p["label"].to_numpy(), p["pred"].to_numpy(), len(CLASSES))
         for p in (load_predictions(d) for d in best_runs["run_dir"]))
cm_norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
fig, ax = plt.subplots(figsize=(5.2, 4.4))
sns.heatmap(pd.DataFrame(cm_norm, index=CLASSES, columns=CLASSES), annot=True, fmt=".2f",
            cmap="Blues", vmin=0, vmax=1, cbar=False, ax=ax)
ax.set_xlabel("predicted")
ax.set_ylabel("true")
ax.set_title(f"{best[1]}, {best[0]} ({len(best_runs)} seeds)")
fig.tight_layout()
