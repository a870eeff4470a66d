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
# - **pooled, converged**: chapter 01's converged non-private reference of the same network
#   (Adam, its whole cosine schedule, the best validation epoch released), scored at each site:
#   what central training reaches without the federation's epoch budget;
# - **FedAvg** {cite:p}`mcmahan2017fedavg` and **FedAdam** {cite:p}`reddi2021adaptive`,
#   non-private;
# - **FedAvg with record-level DP**: every site trains by DP-SGD with its own accountant, at
#   each budget ε: the privacy-accuracy trade-off that Vision Through the Veil
#   {cite:p}`nampalle2023veil` studies for medical image classification. The profile's DP
#   recipe, noisy class prior included: a site that keeps part of its prior at prediction
#   (`dp_la_tau_kept`) scores the global model with its logits shifted by that share of its own
#   noisy histogram, the predictor it would deploy (post-processing of its counted release);
# - **DP-FedAvg**, client-level DP {cite:p}`mcmahan2018dpfedavg`: the server samples the
#   clients of each round (Poisson, by its secret), clips every update and noises their sum
#   (Flower's `DifferentialPrivacyServerSideFixedClipping` wrapper around a FedAvg with every
#   client weighted 1), over the four sites themselves and over *virtual clients* (each site's
#   lesions dealt into groups);
# - **the proposed technique** in its first generation (data-independent colour front end,
#   linear head, noisy class prior; the second generation's private feature statistics would
#   have to be one release for the whole federation) in both federated forms: record-level DP-SGD at every site, and DP-FedAvg of the
#   linear head over the virtual clients.
#
# Privacy of the record-level federations: adjacency is add/remove one image, the privacy
# unit one image, the accountant the clients' (PRV); each image lives at one site and only
# that site's releases depend on it, so the global model is $(\max_k \varepsilon_k,
# \delta)$-DP per image. Of the client-level ones: adjacency add/remove one client, the unit
# one client with all its images, the accountant RDP over the rounds' subsampled Gaussian
# mechanisms; which clients took part in which round is secret (the amplification by
# sampling assumes it) and is not in the record. Not counted: the test metrics of every site
# reported here, as in every chapter.

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
fl_groups_per_site = 10   # client-level DP: virtual clients per site (groups of lesions)
fl_client_sample_rate = 0.5   # client-level DP: each client's probability of a round
fl_client_clipping_norm = 1.0  # client-level DP: L2 bound of one client's update
inversion_images = 2      # gradient inversion: training images of the attacked client
inversion_steps = 200     # gradient inversion: optimisation steps per image

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dpskin_core.book.registry import profile_params
from dpskin_core.book.tables import captioned, fmt_mean_std, glue
from dpskin_core.federated.client import noise_multiplier
from dpskin_core.federated.federation import federation_dir, load_clients, run_federation
from dpskin_core.federated.recipes import FL_RECIPES, FLPlan
from dpskin_core.federated.study import references, sweep, update_inversion

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
plan = FLPlan.from_chapter(dict(
    fl_rounds=fl_rounds, fl_local_epochs=fl_local_epochs, fl_server_lr=fl_server_lr,
    fl_groups_per_site=fl_groups_per_site, fl_client_sample_rate=fl_client_sample_rate,
    fl_client_clipping_norm=fl_client_clipping_norm))
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
refs = references(lambda seed: FL_RECIPES.get("fedavg").config(P, plan, seed=seed), clients,
                  seeds, P.runs_root, converged=P)

# %% [markdown]
# ## Balanced accuracy at every site
#
# Test balanced accuracy of the final global model at each site (mean ± std over $n$ seeds),
# and the mean over sites (FLamby's figure of merit; {numref}`tbl-fl-per-site`).

# %%
final = pd.concat([fl[fl["round"] == plan.rounds], refs], ignore_index=True)
final["model"] = final["training"] + ", " + final["budget"]
per_site = final.pivot_table(index="model", columns="client", values="balanced_accuracy", aggfunc="mean")
per_site["mean over sites"] = per_site.mean(axis=1)
n = final.groupby("model")["seed"].nunique()
site_mean = final.groupby(["model", "seed"])["balanced_accuracy"].mean().groupby("model")
per_site["mean ± std (seeds)"] = site_mean.agg(lambda s: fmt_mean_std(s.mean(), s.std()))
per_site["n"] = n
captioned(per_site.sort_values("mean over sites", ascending=False),
          "tbl-fl-per-site",
          "Test balanced accuracy of the final global model at each site and the mean over sites (mean ± std over n seeds).")

# %% tags=["remove-cell"]
means = per_site["mean over sites"]
glue("fedavg_mean", means.get("FedAvg, ∞", float("nan")))
glue("pooled_mean", means.get("pooled, ∞", float("nan")))
glue("converged_mean", means.get("pooled, converged, ∞", float("nan")))
glue("local_mean", means.get("local only, ∞", float("nan")))

# %% [markdown]
# FedAvg reaches a mean over sites of {glue:text}`fedavg_mean:.3f`, against
# {glue:text}`pooled_mean:.3f` pooled and {glue:text}`local_mean:.3f` for the sites alone;
# the converged central reference reaches {glue:text}`converged_mean:.3f`.
# FLamby's Fed-ISIC2019 {cite:p}`terrail2022flamby` (six centres, ImageNet-pretrained EfficientNet-B0 at 200 px) reports
# about 0.71 pooled and 0.54 ± 0.09 for FedAvg (cited, not re-run; another network, resolution
# and test split).

# %% tags=["remove-cell"]
def _site_mean(label):
    """Mean over sites and seeds of the final global model of ``label``, per budget."""
    f = final[final["training"] == label]
    return f.groupby(["budget", "seed"])["balanced_accuracy"].mean().groupby("budget").mean()


glob_p = _site_mean(FL_RECIPES.get("fedavg-proposed-dp").label)
loc_p = _site_mean(FL_RECIPES.get("fedavg-proposed-dp-local-prior").label)
top_b = f"ε = {max(epsilons):g}"
glue("prior_budget", top_b)
glue("prior_global", float(glob_p.get(top_b, float("nan"))))
glue("prior_local", float(loc_p.get(top_b, float("nan"))))
glue("prior_gain", float(glob_p.get(top_b, float("nan")) - loc_p.get(top_b, float("nan"))))

# %% [markdown]
# **The class prior of the proposed technique.** Every site releases its noisy class histogram
# once (the release its accountant counts); with the federation's prior, the server sums them and
# every site adjusts its logits by the sum, as pooled training adjusts by the pooled counts; with
# local priors each site adjusts by its own. At {glue:text}`prior_budget` the summed prior gives
# a mean over sites of {glue:text}`prior_global:.3f`, local priors {glue:text}`prior_local:.3f`
# (difference {glue:text}`prior_gain:+.3f`; n as in {numref}`tbl-fl-per-site`). The sum costs no
# privacy beyond each site's own release: it is post-processing of releases already counted.

# %% [markdown]
# ## Over the rounds
#
# Mean over sites of the global model's test balanced accuracy after each round, and each DP
# federation's ε after each round (the largest of the clients': the global model's guarantee).
#
# {numref}`fig-fl-rounds` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Mean balanced accuracy over sites of each federation's global model after every round (left) and its ε (right).", "name": "fig-fl-rounds"}}
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
# ## The guarantees
#
# Each DP federation's record (`meta.json`): where the DP sits, its unit and the ε the
# project's accountant gives after the last round (record-level: the largest of the sites';
# client-level: every client's), at δ shown.

# %%
def guarantee(name, seed, eps):
    res = run_federation(FL_RECIPES.get(name).config(P, plan, seed=seed, target_epsilon=eps),
                         P.runs_root, progress=False)  # cached: read back
    g = res.meta["privacy"]
    return {"federation": FL_RECIPES.get(name).label, "target ε": eps, "seed": seed,
            "level": g["level"], "unit": g["unit"], "ε": g["global_epsilon"], "δ": g["delta"],
            "accountant": g["accountant"], "σ (client-level)": g.get("noise_multiplier"),
            "clients per round (expected)": g.get("expected_clients_per_round")}


captioned(pd.DataFrame([guarantee(n, s, e) for n in FL_RECIPES.names() if FL_RECIPES.get(n).private
              for s in seeds for e in epsilons]),
          "tbl-fl-guarantees",
          "The guarantee of each DP federation: where the DP sits, its unit, and ε after the last round.")

# %% [markdown]
# Why client-level DP needs many clients: each round adds noise of std $\sigma C / (q N)$ to
# every one of the model's $P$ weights, so its norm is about $\sigma C \sqrt{P} / (q N)$,
# while the clipped mean update it hides has norm at most $C$. The table gives that ratio for
# every client-level federation above (from its record and its network's size): above 1 the
# noise outweighs the whole signal at every round. Four clients give the largest ratio; many
# virtual clients divide it by $q N$; the proposed technique's linear head has far fewer
# weights than the end-to-end network.

# %%
def noise_to_signal(name, eps):
    import math

    from dpskin_core.constants import CLASSES
    from dpskin_core.training.backbones import build_backbone, count_parameters

    cfg = FL_RECIPES.get(name).config(P, plan, seed=seeds[0], target_epsilon=eps)
    g = run_federation(cfg, P.runs_root, progress=False).meta["privacy"]
    weights = count_parameters(build_backbone(cfg.run.backbone, num_classes=len(CLASSES)))
    return {"federation": FL_RECIPES.get(name).label, "target ε": eps, "clients N": g["clients"],
            "q": g["sample_rate"], "σ": g["noise_multiplier"], "weights P": weights,
            "noise norm / C": g["noise_multiplier"] * math.sqrt(weights) / g["expected_clients_per_round"]}


captioned(pd.DataFrame([noise_to_signal(n, e) for n in FL_RECIPES.names() if FL_RECIPES.get(n).level == "client"
              for e in epsilons]),
          "tbl-fl-noise",
          "Client-level DP: the norm of the noise added to the global model per round against the clipping bound C.")

# %% [markdown]
# ## Gradient inversion of one client's update
#
# An honest-but-curious server inverts the update of the smallest site
# {cite:p}`geiping2020inverting` in the attacker's best case: one local step on one training
# image from the final FedAvg global model (seed of the first run). Record-level DP-SGD
# releases that image's gradient clipped and noised with the site's own σ (from its
# accountant, at the largest budget); client-level DP-FedAvg clips the update at the server
# and noises only the sum of the updates, so the server itself sees each update unnoised.
# PSNR in dB and SSIM of the reconstruction against the true image (higher: more leaked).
#
# {numref}`fig-fl-inversion` shows it.

# %%
first, top = seeds[0], max(epsilons)
global_w = run_federation(FL_RECIPES.get("fedavg").config(P, plan, seed=first), P.runs_root,
                          progress=False).weights
dp_cfg = FL_RECIPES.get("fedavg-dp").config(P, plan, seed=first, target_epsilon=top)
victim = min(clients, key=lambda c: c.n_train)
sigma = noise_multiplier(federation_dir(dp_cfg, P.runs_root) / "clients" / victim.name)
inv = update_inversion(base, global_w, victim, record_sigma=sigma,
                       client_clipping_norm=plan.client_clipping_norm, images=inversion_images,
                       steps=inversion_steps, seed=first)
print(f"site {victim.name}; record-level σ = {sigma:.3f} (ε = {top:g}); client-level C = "
      f"{plan.client_clipping_norm:g}")
captioned(inv.groupby("mode")[["psnr", "ssim", "cosine"]].agg(["mean", "std"]),
          "tbl-fl-inversion",
          "Gradient inversion of one client's update under each DP mode.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "An honest-but-curious server's gradient inversion of one client's update, without DP and under each DP mode.", "name": "fig-fl-inversion"}}
modes = list(dict.fromkeys(inv["mode"]))
fig, axes = plt.subplots(inversion_images, len(modes) + 1, figsize=(2 * (len(modes) + 1), 2 * inversion_images),
                         squeeze=False)
for i in range(inversion_images):
    rows = inv[inv["image"] == i]
    if rows.empty:
        continue
    axes[i, 0].imshow(rows["truth"].iloc[0])
    axes[i, 0].set_title(f"true ({rows['label'].iloc[0]})", fontsize=8)
    for j, m in enumerate(modes, start=1):
        r = rows[rows["mode"] == m].iloc[0]
        axes[i, j].imshow(r["reconstruction"])
        axes[i, j].set_title(f"{m}\nSSIM {r['ssim']:.2f}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
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
captioned(membership.groupby(["training", "budget", "client"])[["auc", "tpr_at_1%_fpr"]].mean().unstack("client"),
          "tbl-fl-membership",
          "Membership inference on the global model at every site: AUC and TPR at 1 % FPR.")
