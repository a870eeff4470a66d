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
# # Privacy attacks
#
# The premise of private training is that a trained model leaks its training data. This
# chapter measures the leak, for the non-private model, the end-to-end DP models at each budget
# $\varepsilon$ of the profile and the proposed technique, with four attacks:
#
# 1. **membership inference**: given an image and the model, was the image in its training
#    set? The loss-threshold attack {cite:p}`yeom2018privacy` and the likelihood-ratio attack LiRA
#    {cite:p}`carlini2022membership` with shadow models, offline (only shadows that did not train on
#    the image) and online (also those that did);
# 2. **model extraction**: an attacker with black-box access to the model's probabilities
#    trains a copy of it (a "copycat" or "knockoff" network) on its answers to images of a pool
#    disjoint from the training data;
# 3. **reconstruction**: recovering images from the model (model inversion of each class) or
#    from the gradient of one training image (gradient inversion {cite:p}`geiping2020inverting`), the
#    gradient being either the raw one or the clipped and noised one DP-SGD releases;
# 4. **an empirical privacy audit**: canaries are inserted into one training run and the
#    success of guessing which were included gives a lower bound on the $\varepsilon$ of that
#    run {cite:p}`steinke2023privacy`, to be compared with the accountant's upper bound.
#
# Every attacked model gets a *privacy card* next to its run record: its guarantee and the
# measured attack results.

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters (the attacked recipes and their attack_* / overfit_* sizes) come from
# experiments.yml; `overrides` changes some of them. The attack budgets below are this
# chapter's own (experiments.yml, experiment 05_attacks).
profile = "smoke"
overrides = {}
attack_models = ["non-private", "DP-SGD", "proposed"]
n_shadows = 2
mia_views = 1               # dihedral views per membership query
extraction_budgets = [50, 150]
extraction_modes = ["probs"]
extraction_epochs = 5
synthetic_pool_size = 300
inversion_steps = 50
gradient_inversion_steps = 100
audit_canaries = 100

# %% tags=["remove-cell"]
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (image generation, decoding)

import numpy as np
import pandas as pd
import seaborn as sns
import torch

from dpskin_core import CLASSES, attacks
from dpskin_core.attacks import audit, cards, reconstruct
from dpskin_core.book import figures
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import silence_benign_warnings
from dpskin_core.book.tables import captioned, glue
from dpskin_core.data import load_data
from dpskin_core.training.recipes import ATTACK_MODELS, RECIPES
from dpskin_core.training.trainer import data_spec

# the library warnings every DP run emits (those sweeps silence); here for the whole chapter,
# whose attacks train outside a sweep
silence_benign_warnings()

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
epsilons, delta, image_size = P.epsilons, P.delta, P.image_size
if P.num_threads:
    torch.set_num_threads(P.num_threads)
b0 = P.backbones[0]
seed = P.seeds[0]
attack_root = Path(P.runs_root) / "attacks"


# %% [markdown]
# ## The attacked models
#
# Membership inference needs models whose training set is known to the experimenter. From the
# training split, a random *pool* of images is drawn; each attacked model (the *target*) is
# trained on a random half of the pool, and the other half are non-members, so that a guess
# at random is right half of the time. Each shadow model is trained with the target's recipe
# on another random half, every image being in the training set of half the shadows. The
# recipes are those of the earlier chapters: the non-private model of {doc}`01_baseline`
# (SGD, class-weighted loss), DP-SGD of {doc}`02_dp_sgd` (and DP-Adam of {doc}`03_dp_adam`
# where the profile attacks it) and the proposed technique of {doc}`04_proposed`, at every
# budget of the profile. Where the profile attacks it, a second non-private model drops the
# flips and rotations and may take more and smaller steps, with another optimiser
# (`overfit_epochs`, `overfit_batch_size`, `overfit_optimizer`): it fits its training
# images more closely, as a non-private model trained to convergence would. The models are
# trained here on the pool halves, so their balanced accuracy is lower than that of the same
# recipe on the whole training split.

# %% tags=["hide-output"]
data = load_data(data_spec(RECIPES.get("attack/nonprivate").config(P, seed=seed)))
pool_n = P.attack_pool_size or len(data.y_train)
unknown = sorted(set(attack_models) - set(ATTACK_MODELS))
if unknown:
    raise ValueError(f"attack_models: unknown {unknown}; known: {list(ATTACK_MODELS)}")
models = {}  # label -> config (recipes in dpskin_core.training.recipes, "attack/...")
for m in attack_models:
    recipe = RECIPES.get(ATTACK_MODELS[m])
    for e in (epsilons if recipe.private else [None]):
        label = m if e is None else f"{m}, ε = {e:g}"
        point = {"seed": seed, **({"target_epsilon": e} if recipe.private else {})}
        models[label] = recipe.config(P, n_train=len(data.y_train), **point).replace(
            name=f"attacks {label}")
# the proposed recipe's batches are scaled to the targets' training sets (half the pool): the
# same sampling rate as on the whole training split
prop_bs = RECIPES.get("attack/proposed").config(P, n_train=len(data.y_train),
                                                 seed=seed, target_epsilon=epsilons[0]).batch_size

mia = {label: attacks.membership_experiment(cfg, data, attack_root / "mia", n_shadows=n_shadows,
                                            views=mia_views, pool_size=P.attack_pool_size,
                                            seed=seed)
       for label, cfg in models.items()}
print(f"{len(models)} models, each with {n_shadows} shadows, on a pool of {pool_n} images")

# %% tags=["remove-cell"]
glue("n_models", len(models), display=False)
glue("pool_n", pool_n, display=False)
glue("n_shadows", n_shadows, display=False)
glue("n_members", int(next(iter(mia.values())).members.sum()), display=False)
glue("prop_bs", prop_bs, display=False)
glue("attack_epochs", P.attack_epochs or P.epochs, display=False)
glue("accountant", {"rdp": "RDP", "prv": "PRV"}.get(P.attack_accountant, P.attack_accountant),
     display=False)

# %% [markdown]
# {glue:text}`n_models` models, each trained on {glue:text}`n_members` images of a pool of
# {glue:text}`pool_n`, with {glue:text}`n_shadows` shadow models each. The end-to-end models
# are trained for {glue:text}`attack_epochs` epochs, the proposed one with batches of
# {glue:text}`prop_bs` images (the sampling rate of its recipe on the whole training split);
# the DP models' noise is calibrated with the {glue:text}`accountant` accountant.
#
# ## Membership inference
#
# Each attack scores every pool image (higher: more likely a member); sweeping a threshold over
# the scores gives the ROC curve. The table reports its area (AUC; 0.5 is a random guess), the
# best balanced accuracy of a threshold, and the true-positive rate at a false-positive rate of
# 0.1 % and 1 %: an attack that identifies a few members with confidence is a privacy breach
# even at an AUC near 0.5 {cite:p}`carlini2022membership`. With $n$ non-members, no FPR below $1/n$ can
# be measured, and a TPR at a smaller FPR is that of zero false positives.

# %%
rows = []
for label, exp in mia.items():
    res = exp.target_result
    for name, r in exp.results.items():
        rows.append({"model": label, "attack": name,
                     "ε": res.epsilon if res.epsilon is not None else np.inf,
                     "δ": f"{delta:g}" if models[label].dp else "",
                     "balanced accuracy": res.final_metrics["balanced_accuracy"],
                     "MIA AUC": r.auc, "TPR @ 0.1 % FPR": r.tpr_at_fpr[0.001],
                     "TPR @ 1 % FPR": r.tpr_at_fpr[0.01], "attack accuracy": r.balanced_accuracy})
mia_table = pd.DataFrame(rows)
captioned(mia_table.set_index(["model", "attack"]).round(3),
          "tbl-mia",
          "Membership inference against each model: AUC and true-positive rate at low false-positive rates.")

# %% tags=["remove-cell"]
best = mia_table.loc[mia_table.groupby("model")["MIA AUC"].idxmax()].set_index("model")
# the non-private model the chapter reports on: the most exposed one (largest best-attack AUC)
np_labels = [m for m in mia if not models[m].dp]
np_label = best.loc[np_labels, "MIA AUC"].idxmax() if np_labels else None
dp_labels = [m for m in models if models[m].dp]
n_non = next(iter(mia.values())).results["loss_threshold"].n_nonmembers
glue("min_fpr", 1 / n_non, display=False)
glue("n_nonmembers", n_non, display=False)
np_rows = mia_table[mia_table["model"] == np_label]
glue("np_label", np_label or "(none)", display=False)
glue("np_auc", float(np_rows["MIA AUC"].max()) if len(np_rows) else np.nan, display=False)
glue("np_attack", best.loc[np_label, "attack"] if len(np_rows) else "(none)", display=False)
glue("np_tpr1", float(np_rows["TPR @ 1 % FPR"].max()) if len(np_rows) else np.nan,
     display=False)
dp_best = best.loc[dp_labels, "MIA AUC"]
glue("dp_auc_max", float(dp_best.max()) if len(dp_best) else np.nan, display=False)
glue("dp_auc_max_model", dp_best.idxmax() if len(dp_best) else "(none)", display=False)
glue("dp_auc_min", float(dp_best.min()) if len(dp_best) else np.nan, display=False)

# %% [markdown]
# The most exposed non-private model is the {glue:text}`np_label` one: its strongest attack
# ({glue:text}`np_attack`) reaches an AUC of {glue:text}`np_auc:.3f` and a TPR of
# {glue:text}`np_tpr1:.3f` at 1 % FPR. On the private models the best AUC ranges from {glue:text}`dp_auc_min:.3f` to
# {glue:text}`dp_auc_max:.3f` ({glue:text}`dp_auc_max_model`). With
# {glue:text}`n_nonmembers` non-members the smallest measurable FPR is
# {glue:text}`min_fpr:.2g`; AUCs are estimated from as many images, so differences of a few
# hundredths are within their sampling error.
#
# {numref}`fig-mia-roc` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "ROC curves of the membership-inference attacks on every attacked model (log scale).", "name": "fig-mia-roc"}}
figures.roc_figure({label: exp.results for label, exp in mia.items()});

# %% [markdown]
# ## Model extraction
#
# The attacker queries the model's probabilities with $N$ images of its own and trains a fresh
# {glue:text}`backbone` network on the answers (soft labels; with `labels`, only the predicted
# class). Two query pools, both disjoint from the training data: synthetic images (procedural
# lesions, another seed than the embedded dataset) and held-out images of the data set (its
# validation split). *Fidelity* is the agreement of the copy with the model on the test split,
# *stolen balanced accuracy* the copy's own balanced accuracy there. The victims are the
# non-private models and each private model at the largest budget.

# %% tags=["hide-output"]
e_max = max(epsilons)
victims = [m for m in models if not models[m].dp or models[m].target_epsilon == e_max]
pools = {"synthetic": attacks.synthetic_pool(synthetic_pool_size, image_size, seed=seed + 1),
         "held-out": data.x_val}
extraction = {}  # (victim, pool, mode) -> ExtractionResult
for v in victims:
    for pool_name, pool_x in pools.items():
        for mode in extraction_modes:
            extraction[v, pool_name, mode] = attacks.extract_model(
                mia[v].target, pool_x, data.x_test, data.y_test,
                budgets=[b for b in extraction_budgets if b <= len(pool_x)], mode=mode,
                attacker_backbone=b0, epochs=extraction_epochs, seed=seed, progress=False)
ext = pd.concat([r.table.assign(victim=v, pool=p) for (v, p, _), r in extraction.items()],
                ignore_index=True)

# %%
ext_table = ext.rename(columns={"balanced_accuracy": "stolen balanced accuracy",
                                "victim_balanced_accuracy": "victim balanced accuracy"})
captioned(ext_table.set_index(["victim", "pool", "mode", "budget"]).round(3),
          "tbl-extraction",
          "Model extraction: the stolen network's test balanced accuracy beside the victim's, per query pool, answer mode and query budget.")

# %% tags=["remove-cell"]
glue("backbone", b0, display=False)
top = ext[ext["budget"] == ext["budget"].max()]
glue("ext_budget", int(ext["budget"].max()), display=False)
glue("ext_fid_max", float(top["fidelity"].max()), display=False)
glue("ext_fid_min", float(top["fidelity"].min()), display=False)
row = top.loc[top["fidelity"].idxmax()]
glue("ext_fid_max_victim", f"{row['victim']} ({row['pool']} pool)", display=False)

# %% [markdown]
# With {glue:text}`ext_budget` queries, fidelity ranges from {glue:text}`ext_fid_min:.3f` to
# {glue:text}`ext_fid_max:.3f` ({glue:text}`ext_fid_max_victim`). DP protects the training
# records, not the function the model computes: a private model answering queries can be
# copied like any other, and a copy is as private as its victim (post-processing) but no more.
#
# {numref}`fig-extraction` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Fidelity of the extracted models against the number of queries.", "name": "fig-extraction"}}
figures.extraction_figure(ext);

# %% [markdown]
# ## Reconstruction
#
# ### Model inversion
#
# For each class, an image is optimised from grey to maximise the model's log-probability of
# that class minus a total-variation penalty {cite:p}`fredrikson2015model`. The first row is the
# mean training image of each class; PSNR (dB) and SSIM compare each inversion with that mean
# and with the most similar training image of its class. Only models on pixels can be inverted
# this way: the proposed model sees colour and texture statistics of the image, and an
# inversion would return at most those statistics.

# %% tags=["hide-output"]
pixel_models = [m for m in models if models[m].features == "pixels"]
inversions = {}
for m in pixel_models:
    members_x, members_y = mia[m].member_images(data)
    inversions[m] = reconstruct.invert_classes(mia[m].target, steps=inversion_steps, seed=seed,
                                               reference_x=members_x, reference_y=members_y)

# %%
inv_table = pd.DataFrame([{"model": m, **r.summary()} for m, r in inversions.items()])
inv_table["class_prob"] = [float(np.mean(p)) for p in inv_table["class_prob"]]
inv_table = inv_table.rename(columns={
    "class_prob": "p(class | inversion)", "psnr_mean": "PSNR vs class mean",
    "ssim_mean": "SSIM vs class mean", "psnr_nearest": "PSNR vs nearest",
    "ssim_nearest": "SSIM vs nearest"})
captioned(inv_table.set_index("model").round(3),
          "tbl-model-inversion",
          "Model inversion: similarity of each class's inversion to the mean training image of the class.")

# %% tags=["remove-cell"]
inv_ssim = {m: r.summary()["ssim_mean"] for m, r in inversions.items()}
glue("inv_np_ssim", inv_ssim.get(np_label, np.nan) if np_label else np.nan, display=False)
glue("inv_dp_ssim", max((v for m, v in inv_ssim.items() if models[m].dp), default=np.nan),
     display=False)

# %% [markdown]
# Against the class means, the inversions of the {glue:text}`np_label` model reach an SSIM of
# {glue:text}`inv_np_ssim:.3f` on average over the classes, those of the private models at
# most {glue:text}`inv_dp_ssim:.3f` (1 is identical; unrelated images score near 0). An
# inversion shows what the model responds to, rarely a recognisable training image.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Model inversion: the image each model makes of every class, beside a training image of it."}}
if inversions:
    mx, my = next(iter(mia.values())).member_images(data)
    means = np.stack([mx[my == c].mean(0) / 255 if (my == c).any() else np.full(mx.shape[1:], .5)
                      for c in range(len(CLASSES))])
    grid_rows = {"class mean (training images)": means,
                 **{m: r.images for m, r in inversions.items()}}
    figures.image_grid(grid_rows, list(CLASSES))

# %% [markdown]
# ### Gradient inversion of one training image
#
# An attacker who sees the gradient of one training image (a federated client's update, or a
# batch of one) optimises an image whose gradient points the same way (cosine distance plus a
# total-variation prior; {cite:p}`geiping2020inverting`). It is run at the weights of the non-private
# model, once on the raw gradient and once on the release DP-SGD makes of it at each budget:
# clipped to norm $C$ and noised with the noise multiplier $\sigma$ of the DP-SGD model at that
# budget. The image and the weights are the same in every column; only the release differs.

# %% tags=["hide-output"]
gi_model = np_label if np_label in pixel_models else (pixel_models[0] if pixel_models else None)
grad_inv = {}
if gi_model is not None:
    gx, gy = mia[gi_model].member_images(data)
    grad_inv["raw gradient"] = reconstruct.gradient_inversion(
        mia[gi_model].target, gx[0], int(gy[0]), steps=gradient_inversion_steps, seed=seed)
    for m in dp_labels:
        if models[m].features != "pixels":
            continue
        sigma = mia[m].target_result.noise_multiplier
        grad_inv[f"{m} (σ = {sigma:.2f})"] = reconstruct.gradient_inversion(
            mia[gi_model].target, gx[0], int(gy[0]), max_grad_norm=P.max_grad_norm,
            noise_multiplier=sigma, steps=gradient_inversion_steps, seed=seed)

# %%
gi_table = pd.DataFrame([{"release": k, **r.summary()} for k, r in grad_inv.items()])
captioned(gi_table.set_index("release")[["psnr", "ssim", "cosine", "noise_multiplier"]].round(3),
          "tbl-gradient-inversion",
          "Gradient inversion of one training image from each release of its gradient.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Gradient inversion of one training image from its raw gradient and from DP-SGD's releases of it."}}
if grad_inv:
    first = next(iter(grad_inv.values()))
    ims = np.stack([first.truth] + [r.reconstruction for r in grad_inv.values()])
    figures.image_grid({"": ims}, ["training image"] + [
        f"{k}\nPSNR {r.psnr:.1f} dB, SSIM {r.ssim:.2f}" for k, r in grad_inv.items()], size=2.2)

# %% tags=["remove-cell"]
raw = grad_inv.get("raw gradient")
dp_gi = [r for k, r in grad_inv.items() if k != "raw gradient"]
glue("gi_raw_psnr", raw.psnr if raw else np.nan, display=False)
glue("gi_raw_ssim", raw.ssim if raw else np.nan, display=False)
glue("gi_dp_ssim_max", max((r.ssim for r in dp_gi), default=np.nan), display=False)
glue("gi_dp_psnr_max", max((r.psnr for r in dp_gi), default=np.nan), display=False)

# %% [markdown]
# From the raw gradient the reconstruction reaches a PSNR of {glue:text}`gi_raw_psnr:.1f` dB
# and an SSIM of {glue:text}`gi_raw_ssim:.2f`; from the DP releases at most
# {glue:text}`gi_dp_psnr_max:.1f` dB and {glue:text}`gi_dp_ssim_max:.2f`. In one release the
# noise, of norm about $\sigma C \sqrt{d}$ for a network of $d$ parameters, dwarfs the clipped
# gradient (norm at most $C$): matching its direction fits the noise, not the image.

# %% [markdown]
# ## Empirical privacy audit
#
# Each model's recipe is trained once more, on a random half-pool of training images plus
# {glue:text}`n_canaries` canaries (images of random colour blocks with random labels), each
# included with probability 1/2. The auditor guesses "included" for the canaries the model is
# most confident on and "excluded" for the least, abstaining on the rest; the number of correct
# guesses rejects every $\varepsilon$ too small to explain it, at 95 % confidence
# {cite:p}`steinke2023privacy`. The lower bound must not exceed the accountant's $\varepsilon$; it
# is capped by the number of guesses (the last column: the bound if every guess were right),
# so a small audit cannot show a large leak.

# %% tags=["hide-output"]
audit_data = attacks.subsample_train(data, pool_n // 2, seed=seed, tag="audit-base")
audits = {label: audit.canary_audit(cfg, audit_data, attack_root / "audit", m=audit_canaries,
                                    seed=seed)
          for label, cfg in models.items()}

# %%
aud_table = pd.DataFrame([{
    "model": label, "ε (accountant)": a.audit.theoretical_epsilon or np.inf,
    "ε lower bound": a.audit.eps_lower_bound, "canaries m": a.audit.m,
    "guesses r": a.audit.r, "correct v": a.audit.v,
    "largest provable bound": audit.max_lower_bound(a.audit.r, a.audit.beta),
} for label, a in audits.items()])
captioned(aud_table.set_index("model").round(3),
          "tbl-audit",
          "Empirical privacy audit with canaries: the ε lower bound measured against the ε claimed.")

# %% tags=["remove-cell"]
glue("n_canaries", audit_canaries, display=False)
glue("audit_cap", float(aud_table["largest provable bound"].max()), display=False)
glue("np_eps_lb", float(aud_table.set_index("model").loc[np_label, "ε lower bound"])
     if np_label is not None else np.nan, display=False)
dp_aud = aud_table[aud_table["model"].isin(dp_labels)]
glue("dp_eps_lb_max", float(dp_aud["ε lower bound"].max()), display=False)
glue("audit_valid", "every" if (dp_aud["ε lower bound"] <= dp_aud["ε (accountant)"]).all()
     else "NOT every", display=False)

# %% [markdown]
# The audit bounds the {glue:text}`np_label` model's $\varepsilon$ from below by
# {glue:text}`np_eps_lb:.2f`, out of at most {glue:text}`audit_cap:.2f` that
# {glue:text}`n_canaries` canaries can show; the largest bound on a private model is
# {glue:text}`dp_eps_lb_max:.2f`, and {glue:text}`audit_valid` private model's bound is at
# most its accountant's $\varepsilon$.
#
# {numref}`fig-audit` shows it.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "One-run privacy audit: the lower bound on ε of each model against the ε its accountant reports.", "name": "fig-audit"}}
figures.audit_figure(aud_table);

# %% [markdown]
# ## Privacy cards
#
# Each attacked model's card (`privacy_card.json` in its run folder) holds its guarantee
# ($\varepsilon$, $\delta$, accountant, noise multiplier, sampling rate, steps) and the attacks
# above. The table below is read back from the cards; the summary chapter shows it next to the
# utility results. MIA columns are the strongest of the membership attacks on each metric.

# %% tags=["hide-output"]
card_paths = {}
for label, exp in mia.items():
    measured = dict(exp.results)
    for (v, p, mode), r in extraction.items():
        if v == label:
            measured[f"copycat_{p}_{mode}"] = r
    if label in inversions:
        measured["model_inversion"] = inversions[label]
    for k, r in grad_inv.items():
        if k == "raw gradient" and label == gi_model:
            measured["gradient_inversion"] = r
        elif k.startswith(label + " ("):
            measured["gradient_inversion"] = {**r.summary(), "weights": f"{gi_model} target"}
    a = audits[label]
    measured["one_run_audit"] = {**a.summary(), "run_id": a.run_result.run_id,
                                 "canary_kind": a.audit.extra.get("kind")}
    card_paths[label] = cards.write_privacy_card(exp.target.run_dir, measured)
privacy = pd.DataFrame([cards.card_summary(path, model=label) for label, path in card_paths.items()])
privacy["card"] = [str(p) for p in card_paths.values()]
summary_path = cards.write_attack_summary(privacy, P.runs_root)
print(f"privacy table: {summary_path}")

# %%
captioned(figures.privacy_table(privacy), "tbl-privacy-cards",
          "Each attacked model's guarantee and the strongest membership attack on it, read back "
          "from its privacy card (ε = ∞: non-private).")
