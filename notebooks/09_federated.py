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
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them.
profile = "smoke"
overrides = {}
fl_rounds = 3             # federated rounds
fl_local_epochs = 1       # local epochs per round
fl_server_lr = 0.01       # FedAdam's server step
fl_epsilons = [8.0]       # budgets of the DP federations (None: the profile's)
fl_seeds = [0]            # seeds (None: the profile's)

# %% [markdown]
# # Federated learning across the HAM10000 sites
#
# HAM10000 was collected at four sites, with different devices and very different patient
# mixes; in a federation each site is a hospital that keeps its images and sends only model
# updates. This chapter trains the profile's first network across the sites
# (`dpskin_core.federated`; four synthetic sites on the embedded data of the smoke profile),
# every lesion at one client and each client with its own part of the lesion-grouped
# train / validation / test split, and compares, site by site:
#
# - **pooled**: the same local recipe trained centrally on all sites' images for as many
#   epochs as the federation trains;
# - **local only**: each site training alone;
# - **FedAvg** {cite:p}`mcmahan2017fedavg` and **FedAdam** {cite:p}`reddi2021adaptive`,
#   non-private;
# - **FedAvg with record-level DP**: every site trains by DP-SGD with its own accountant, at
#   each budget ε: the privacy-accuracy trade-off that Vision Through the Veil
#   {cite:p}`nampalle2023veil` studies for medical image classification.
#
# Privacy of the DP federations: adjacency is add/remove one image, the privacy unit one
# image, the accountant the clients' (PRV); each image lives at one site and only that site's
# releases depend on it, so the global model is $(\max_k \varepsilon_k, \delta)$-DP per image.
# Not counted: the test metrics of every site reported here, as in every chapter. Four
# clients are far too few for client-level DP (DP-FedAvg), which is not run here.

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dpskin_core.book.registry import profile_params
from dpskin_core.book.tables import fmt_mean_std, glue
from dpskin_core.federated.federation import load_clients
from dpskin_core.federated.recipes import FL_RECIPES, FLPlan
from dpskin_core.federated.study import references, sweep

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
plan = FLPlan(fl_rounds, fl_local_epochs, fl_server_lr)
seeds = list(fl_seeds or P.seeds)
epsilons = list(fl_epsilons or P.epsilons)
base = FL_RECIPES.get("fedavg").config(P, plan)
clients = load_clients(base)
print(f"{base.run.backbone} at {P.image_size} px, {len(clients)} clients "
      f"({', '.join(c.name for c in clients)}), {plan.rounds} rounds of {plan.local_epochs} local "
      f"epoch(s), seeds {seeds}, budgets {epsilons}")

# %% [markdown]
# ## The federations
#
# Each federation runs in this process with the same ServerApp / ClientApp code the
# deployment engine runs (`dpskin fl deploy`; a test checks both give the same global model).

# %%
fl, membership = sweep(P, plan, seeds, epsilons, P.runs_root, with_membership=clients)
refs = references(lambda seed: FL_RECIPES.get("fedavg").config(P, plan, seed=seed), clients, seeds,
                  P.runs_root)

# %% [markdown]
# ## Balanced accuracy at every site
#
# Test balanced accuracy of the final global model at each site (mean ± std over $n$ seeds),
# and the mean over sites (FLamby's figure of merit).

# %%
final = pd.concat([fl[fl["round"] == plan.rounds], refs], ignore_index=True)
final["model"] = final["training"] + ", " + final["budget"]
per_site = final.pivot_table(index="model", columns="client", values="balanced_accuracy", aggfunc="mean")
per_site["mean over sites"] = per_site.mean(axis=1)
n = final.groupby("model")["seed"].nunique()
site_mean = final.groupby(["model", "seed"])["balanced_accuracy"].mean().groupby("model")
per_site["mean ± std (seeds)"] = site_mean.agg(lambda s: fmt_mean_std(s.mean(), s.std()))
per_site["n"] = n
per_site.sort_values("mean over sites", ascending=False)

# %% tags=["remove-cell"]
means = per_site["mean over sites"]
glue("fedavg_mean", means.get("FedAvg, ∞", float("nan")))
glue("pooled_mean", means.get("pooled, ∞", float("nan")))
glue("local_mean", means.get("local only, ∞", float("nan")))

# %% [markdown]
# FedAvg reaches a mean over sites of {glue:text}`fedavg_mean:.3f`, against
# {glue:text}`pooled_mean:.3f` pooled and {glue:text}`local_mean:.3f` for the sites alone.
# FLamby's Fed-ISIC2019 {cite:p}`terrail2022flamby` (six centres, ImageNet-pretrained EfficientNet-B0 at 200 px) reports
# about 0.71 pooled and 0.54 ± 0.09 for FedAvg (cited, not re-run; another network, resolution
# and test split).

# %% [markdown]
# ## Over the rounds
#
# Mean over sites of the global model's test balanced accuracy after each round, and each DP
# federation's ε after each round (the largest of the clients': the global model's guarantee).

# %% tags=["hide-input"]
curve = fl.groupby(["training", "budget", "seed", "round"], as_index=False)["balanced_accuracy"].mean()
curve["model"] = curve["training"] + ", " + curve["budget"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
sns.lineplot(data=curve, x="round", y="balanced_accuracy", hue="model", marker="o", ax=axes[0])
axes[0].set_ylabel("mean balanced accuracy over sites")
dp = fl[fl["epsilon"].notna()].groupby(["budget", "seed", "round"], as_index=False)["epsilon"].max()
if len(dp):
    sns.lineplot(data=dp, x="round", y="epsilon", hue="budget", marker="o", ax=axes[1])
axes[1].set_ylabel("ε of the global model (max over clients)")
for ax in axes:
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Membership inference on the global model
#
# The loss-threshold attack {cite:p}`yeom2018privacy` on each final global model, at each
# site: as many of the site's training images as its test images, members against
# non-members (AUC 0.5: no leak measured; TPR at 1 % FPR: the attack's low-error regime, with a
# resolution of one over the site's test images). Mean over seeds.

# %%
membership.groupby(["training", "budget", "client"])[["auc", "tpr_at_1%_fpr"]].mean().unstack("client")
