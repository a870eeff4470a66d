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
# # MpLe: morphed learning, reproduced and attacked
#
# MpLe {cite:p}`onesimu2021mple` lets a data provider outsource training without showing
# its images: it *morphs* every image with a secret matrix and the service provider trains on
# the morphed samples behind an *augmented* first layer. The construction is MoLe's
# {cite:p}`shen2018mole`: the normalised image, zero-padded by one pixel and flattened channel-major into
# $x \in \mathbb{R}^d$ ($d = 3 \cdot 34 \cdot 34 = 3468$ at 32 px), is shipped as $z = xM$ with
# $M$ a dense $d \times d$ matrix of uniform $[0, 1)$ entries (or $\kappa$ equal blocks on its
# diagonal). The network's first convolution $C_r$, unrolled into a $d \times C_{out}H'W'$
# matrix, is replaced by $C_{ac} = M^{-1} C_r P$, $P$ a secret permutation of the output
# channels, so that $z C_{ac} = x C_r P$: the plain first layer's feature maps with their
# channels permuted, on which the service provider trains the rest of the network.
#
# The papers claim no loss of accuracy, about 9 % more computation, 5.12 % more transmission
# and an attack success of $7.9 \cdot 10^{-90}$ ($1/64!$, guessing $P$). This chapter builds the
# scheme (`dpskin_core.mple`), trains with it on the same lesion-grouped split as every other
# chapter, measures its cost beside the plain network, and attacks it three ways. The key is
# $d \times d$: at 64 px it would hold $1.7 \cdot 10^8$ numbers and $C_{ac}$ $1.7 \cdot 10^9$,
# so the scheme is evaluated at 32 px, the resolution it was published at (CIFAR).

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them.
profile = "smoke"
overrides = {}
mple_kind = "block"       # the key: dense (MoLe's default) | block (MoLe's kappa blocks)
mple_blocks = 12          # diagonal blocks of a block key (smoke: a dense key takes ~1 min)
mple_seeds = None         # seeds of the trained comparison (None: the profile's)
mple_backbones = ["smallcnn_fast"]  # MpLe's networks (None: the first; smallcnn[_fast], vgg*)
mple_epsilons = [8.0]     # budgets of DP-SGD and MpLe + DP-SGD (None: the profile's)
kp_pairs = [64, 256, 600]  # known plaintext: numbers of (plain, morphed) pairs
attack_images = 100       # test images every attack recovers and is scored on
public_images = 600       # synthetic look-alike images of the ciphertext-only attacker
cost_backbones = ["smallcnn_fast"]  # networks whose first layer's cost is measured

# %% tags=["remove-cell"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display

from dpskin_core.book.figures import image_grid
from dpskin_core.book.registry import profile_params
from dpskin_core.book.sweeps import sweep
from dpskin_core.book.tables import captioned, fmt_mean_std, glue
from dpskin_core.data.datasets import DataSpec, load_data
from dpskin_core.mple import evaluate
from dpskin_core.mple.layer import split_first_conv
from dpskin_core.mple.morph import read_morphed, unmorph
from dpskin_core.mple.train import (MpleSpec, mple_root, normalised, plain_membership, provide,
                                    train_all)
from dpskin_core.attacks.victims import load_trained
from dpskin_core.training.backbones import build_backbone
from dpskin_core.training.recipes import RECIPES
from dpskin_core.training.trainer import data_spec

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
if P.image_size > 48:
    raise ValueError(f"image_size={P.image_size}: the MpLe key is d x d (d = 3 (S + 2)^2); this "
                     "chapter runs at 32 px (set overrides: {image_size: 32})")
spec = MpleSpec(mple_kind, mple_blocks)
seeds = list(mple_seeds or P.seeds)
epsilons = list(mple_epsilons or P.epsilons)
nets = list(mple_backbones or P.backbones[:1])
backbone = nets[0]
torch.set_num_threads(P.num_threads or torch.get_num_threads())


def configs(name, **kw):
    return RECIPES.get(name).configs(P, backbones=nets, seeds=seeds, **kw)


data = load_data(data_spec(configs("nonprivate-adam")[0]))
print(f"{', '.join(nets)} at {P.image_size} px, key {spec.name}, seeds {seeds}, budgets {epsilons}; "
      f"{len(data.y_train)} training, {len(data.y_test)} test images")

# %% [markdown]
# ## Accuracy and membership inference
#
# Five ways of training the same network on the same split, $n$ seeds each: the plain
# non-private reference of chapter {doc}`01_baseline`; the same without augmentation (a
# morphed sample cannot be flipped, rotated or colour-jittered without the key, so this is the
# best MpLe's service provider could reach); MpLe, whose first layer is frozen inside
# $C_{ac}$ (the plain network's seeded initialisation) while the rest trains on the morphed
# data; DP-SGD of chapter {doc}`02_dp_sgd`; and MpLe + DP-SGD, the service provider training
# on morphed data by DP-SGD (the privacy unit is still one image: its morphed row is one
# example). Membership inference: the loss-threshold attack {cite:p}`yeom2018privacy` on the
# released model, as many training images as test images (the attacks chapter runs the
# stronger LiRA; this one needs no shadow models).

# %%
plain = sweep(configs("nonprivate-adam") + configs("mple/plain-no-augmentation")
              + configs("dp-sgd", epsilons=epsilons), P.runs_root, nproc=P.nproc)
mia = pd.DataFrame([plain_membership(d, data) for d in plain["run_dir"]])
plain = pd.concat([plain.reset_index(drop=True), mia.add_prefix("mia_")], axis=1)
morphed = train_all(configs("mple/nonprivate") + configs("mple/dp-sgd", epsilons=epsilons),
                    spec, P.runs_root, data=data)
runs = pd.concat([plain, morphed], ignore_index=True)
runs["model"] = runs["recipe"].map(lambda r: RECIPES.get(r).label)
runs["budget"] = [f"ε = {e:g}" if dp else "∞" for dp, e in zip(runs["dp"], runs["target_epsilon"])]

# %%
order = ["non-private Adam", "plain, no augmentation", "MpLe (morphed data)", "DP-SGD", "MpLe + DP-SGD"]
g = runs.groupby(["backbone", "model", "budget"], sort=False)
table = pd.DataFrame({
    "balanced accuracy": g["balanced_accuracy"].agg(lambda s: fmt_mean_std(s.mean(), s.std())),
    "n": g.size(),
    "membership AUC": g["mia_auc"].mean(),
    "TPR at 1 % FPR": g["mia_tpr_at_fpr_0.01"].mean(),
    "ε run": g["epsilon"].mean(),
})
table = table.reindex(sorted(table.index, key=lambda i: (nets.index(i[0]), order.index(i[1]), i[2])))
captioned(table,
          "tbl-mple-accuracy",
          "MpLe and its references: test balanced accuracy and membership inference (mean ± std over n seeds).")

# %% tags=["remove-cell"]
means = runs[runs["backbone"] == backbone].groupby("model")["balanced_accuracy"].mean()
glue("acc_plain", means["non-private Adam"])
glue("acc_noaug", means["plain, no augmentation"])
glue("acc_mple", means["MpLe (morphed data)"])
glue("mple_cost", means["plain, no augmentation"] - means["MpLe (morphed data)"])
glue("n_seeds", len(seeds))

# %% [markdown]
# MpLe's service provider reaches {glue:text}`acc_mple:.3f` balanced accuracy against
# {glue:text}`acc_noaug:.3f` for the same network trained on the same unaugmented images by
# someone who sees them, and {glue:text}`acc_plain:.3f` for the augmented reference (means of
# $n$ = {glue:text}`n_seeds` seeds). The difference between the first two is what freezing
# the first layer costs; the rest is the augmentation the morphing forbids.

# %% [markdown]
# ## Parity: the augmented layer computes the plain network
#
# The MpLe network built from the trained plain network (no augmentation, first seed), with
# the channel permutation undone by whoever knows $P$, on morphed test images against the
# plain network on the plain ones (float32).

# %%
first = provide(configs("mple/nonprivate")[0], spec, data, mple_root(spec, P.runs_root))
x_test = normalised(data.x_test, configs("nonprivate-adam")[0])
trained = load_trained(plain[(plain["recipe"] == "mple/plain-no-augmentation")
                             & (plain["backbone"] == backbone)]["run_dir"].iloc[0]).model
par = evaluate.parity(trained, first.key, x_test[:256], perm_seed=1)
captioned(pd.Series(par).to_frame("value"),
          "tbl-mple-parity",
          "Parity: the augmented layer on morphed images against the plain network on plain ones.")

# %% tags=["remove-cell"]
glue("parity", par["max_abs_logit_difference"])
glue("same_pred", par["same_prediction"])
glue("condition", first.key.condition)

# %% [markdown]
# The largest difference of a logit is {glue:text}`parity:.2g`: the same network up to float32
# rounding, amplified by the key's condition number {glue:text}`condition:.3g` (the morphed rows
# and $C_{ac}$ are float32); a share of {glue:text}`same_pred:.3f` of the predicted classes agree.

# %% [markdown]
# ## Cost beside the plain network
#
# Measured in this process, on the first test images, for the first layer of each network
# listed (VGG-16 with GroupNorm is MpLe's network): the data provider's morphing and its
# building of $C_{ac}$, the bytes it ships per image, the augmented layer against the plain
# first layer, and per-image times of inference and of a training step (Adam, batch 64; MpLe
# trains the rest behind the frozen $C_{ac}$). Times are on this machine's CPU threads.

# %%
x_uint8 = data.x_test
cost_rows = []
for b in cost_backbones:
    torch.manual_seed(0)
    cost_rows += [dict(network=b, **r) for r in evaluate.cost(build_backbone(b, num_classes=7), first.key,
                                                              x_test, x_uint8)]
cost = pd.DataFrame(cost_rows)
captioned(cost.set_index(["network", "quantity"])[["plain", "mple", "ratio", "unit"]],
          "tbl-mple-cost",
          "Cost of MpLe beside the plain network (first layer, morphing and transmission), with the ratio.")

# %% [markdown]
# ## Security, measured
#
# ### Known plaintext
#
# An attacker holding $N$ training images and their morphed rows (a leaked or guessed subset:
# images of a public atlas the provider also used) regresses an inverse (least squares from
# $N = 3 \cdot 32 \cdot 32 = 3072$ pairs on, ridge below) and recovers held-out test images
# from their morphed rows alone. PSNR and SSIM {cite:p}`wang2004ssim` on the images in
# $[0, 1]$; Carlini et al.'s attack on InstaHide {cite:p}`carlini2021instahide` reached a
# largest SSIM of 0.90.
#
# {numref}`fig-mple-known-plaintext` shows it.

# %%
z_train, _, _ = read_morphed(first.shipped["train"], first.key)
z_test, _, _ = read_morphed(first.shipped["test"], first.key)
x_train = normalised(data.x_train, configs("nonprivate-adam")[0])
n_att = min(attack_images, len(x_test))
xa, za = x_test[:n_att], z_test[:n_att]
kp = evaluate.known_plaintext_curve(x_train, z_train, xa, za, first.key, kp_pairs)
kp_table = pd.DataFrame([{k: v for k, v in r.items() if k != "recovered"} for r in kp]).set_index("pairs")
captioned(kp_table,
          "tbl-mple-known-plaintext",
          "Known-plaintext attack: recovery of held-out images from N leaked image pairs.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Known-plaintext attack on the MpLe key: PSNR and SSIM of the recovered images against the number of plaintext pairs.", "name": "fig-mple-known-plaintext"}}
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
sns.lineplot(data=kp_table.reset_index(), x="pairs", y="psnr_db", marker="o", ax=axes[0])
sns.lineplot(data=kp_table.reset_index(), x="pairs", y="ssim", marker="o", ax=axes[1])
axes[0].set_ylabel("PSNR (dB)")
axes[1].set_ylabel("SSIM")
axes[1].axhline(0.90, ls="--", c="grey", lw=1)
axes[1].text(kp_table.index.min(), 0.91, "InstaHide attack, max SSIM (Carlini et al.)", fontsize=7)
for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("known pairs N")
fig.suptitle(f"known plaintext: {n_att} test images recovered", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### From the model, without a single image
#
# The service provider holds $C_{ac}$ and chose $C_r$ (in MoLe's workflow it hands $C_r$ to
# the data provider). The $C_{out}$ channel blocks of $C_r$ span only $C k^2 = 27$ dimensions,
# and multiplying by $M^{-1}$ on the left keeps every linear dependency between them: the
# leverage score of each channel of $C_{ac}$ is that of its kernel in $C_r$, which gives $P$
# away; then $M^{-1} = C_{ac}(C_r P)^{+}$ by least squares, and every shipped image comes back.

# %%
ma = evaluate.model_attack(first.augmented, first.first_layer, first.key, first.perm, xa, za)
m_inv = ma.pop("m_inv")
captioned(pd.Series(ma).to_frame("value"),
          "tbl-mple-from-model",
          "Recovering the morphing from the model, without a single image.")

# %% [markdown]
# ### Ciphertext only
#
# With morphed rows alone and public look-alike images ({glue:text}`n_public` synthetic
# lesions of the project's generator), an attacker can match means and covariances: the
# morphed rows' covariance is $M_I^\top S M_I$, so whitening them and colouring with the
# public $S$ inverts the morphing up to an unknown orthogonal $d \times d$ matrix. The floor is
# guessing the public mean image for every image. (A learned inverse trained on public data
# morphed with guessed keys would need the key's distribution to carry information about this
# key; with i.i.d. uniform entries it does not, and it was not run.)
#
# {numref}`fig-mple-ciphertext-only` shows it.

# %%
pub_cfg = DataSpec("synthetic", None, P.image_size, synth_n=public_images, split_seed=1)
x_public = normalised(load_data(pub_cfg).x_train, configs("nonprivate-adam")[0])
glue("n_public", len(x_public))
co = evaluate.ciphertext_only(z_test, x_public, first.key, x_test)
co_images = co.pop("images")
captioned(pd.Series(co).to_frame("value"),
          "tbl-mple-ciphertext-only",
          "Ciphertext-only attack with public look-alike images.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Ciphertext-only attack: test images, their morphed rows, and what moment matching to public images recovers.", "name": "fig-mple-ciphertext-only"}}
def show(x):
    return evaluate.to_unit(x).permute(0, 2, 3, 1).numpy()


def show_morphed(z):
    s = first.key.spec
    v = z.reshape(len(z), s.channels, s.side, s.side)
    lo = v.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = v.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return ((v - lo) / (hi - lo)).permute(0, 2, 3, 1).numpy()


k = 6
rows = {"original": show(xa[:k]), "morphed (shipped)": show_morphed(za[:k])}
for r in (kp[0], kp[-1]):
    rows[f"known plaintext, N = {r['pairs']}"] = show(r["recovered"][:k])
rows["from the model"] = show(unmorph(za[:k], m_inv, first.key))
rows["ciphertext only"] = show(co_images[:k])
image_grid(rows, [f"test image {i + 1}" for i in range(k)])
plt.show()

# %% [markdown]
# ## Plain, MpLe, DP-SGD and MpLe + DP-SGD side by side
#
# What each protects: the model's test accuracy, what membership inference gets from the
# released model, and what the service provider can see of the training images (plain and
# DP-SGD training ship the images themselves; MpLe ships morphed rows, which the attack from the
# model inverts: its PSNR / SSIM on the attacked test images).

# %%
seen = {"non-private Adam": "the images", "plain, no augmentation": "the images",
        "DP-SGD": "the images",
        "MpLe (morphed data)": f"recovered: PSNR {ma['psnr_db']:.0f} dB, SSIM {ma['ssim']:.3f}",
        "MpLe + DP-SGD": f"recovered: PSNR {ma['psnr_db']:.0f} dB, SSIM {ma['ssim']:.3f}"}
side = table[["balanced accuracy", "n", "membership AUC", "TPR at 1 % FPR"]].copy()
side["the service provider sees"] = [seen[m] for _, m, _ in side.index]
captioned(side,
          "tbl-mple-side-by-side",
          "Plain, MpLe, DP-SGD and MpLe + DP-SGD: accuracy, membership inference and what the service provider sees.")

# %% [markdown]
# ## The claims against the measurements
#
# The published figures (cited, not re-run here; GAZELLE is {cite:t}`juvekar2018gazelle`)
# beside what this implementation measures
# for the first network; a ratio is the cost relative to plain training or inference.

# %%
ratios = cost.set_index(["network", "quantity"])["ratio"]
c0 = ratios.loc[cost_backbones[0]]
measured = pd.DataFrame([
    *({"system": f"MpLe, {b} (measured)", "quantity": "computation overhead",
       "ratio": ratios.loc[(b, "training step")], "source": f"training step of {b}, this chapter"}
      for b in cost_backbones),
    *({"system": f"MpLe, {b} (measured)", "quantity": "computation overhead (inference)",
       "ratio": ratios.loc[(b, "inference (whole network)")], "source": "inference, this chapter"}
      for b in cost_backbones),
    {"system": "MpLe (measured)", "quantity": "transmission overhead",
     "ratio": c0["bytes shipped (uint8 vs float32 morphed)"], "source": "float32 rows vs uint8 images"},
    {"system": "MpLe (measured)", "quantity": "attack success",
     "ratio": float(ma["permutation_recovered"]),
     "source": f"P recovered from the model; images at {ma['psnr_db']:.0f} dB PSNR"},
])
captioned(pd.concat([pd.DataFrame(evaluate.CLAIMS), measured], ignore_index=True).set_index(["quantity", "system"]).sort_index(),
          "tbl-mple-claims",
          "The published claims against this implementation's measurements.")

# %% [markdown]
# ## Verdict

# %% tags=["remove-input"]
def verdict():
    acc_m, acc_n, acc_p = means["MpLe (morphed data)"], means["plain, no augmentation"], means["non-private Adam"]
    lost = acc_p - acc_m
    same = acc_n - acc_m
    items = [
        f"**Accuracy.** The augmented layer computes the plain network: the largest logit difference is "
        f"{par['max_abs_logit_difference']:.2g} (logits up to {par['max_abs_logit']:.2g}; float32 rounding "
        f"amplified by the key's condition number {first.key.condition:.2g}) and "
        f"{100 * par['same_prediction']:.1f} % of the predicted classes agree. Trained by its service "
        f"provider, which cannot augment and trains behind a frozen first layer, MpLe reached {acc_m:.3f} "
        f"balanced accuracy against {acc_n:.3f} for the same network on the same unaugmented images "
        f"({'a loss of %.3f' % same if same > 0 else 'no loss: %.3f gained' % -same}) and {acc_p:.3f} for "
        f"the augmented reference ({'a loss of %.3f' % lost if lost > 0 else 'no loss: %.3f gained' % -lost}; "
        f"means of n = {len(seeds)} seed(s)).",
        "**Cost.** A training step costs " + ", ".join(
            f"{ratios.loc[(b, 'training step')]:.2f}x the plain one for {b} (inference "
            f"{ratios.loc[(b, 'inference (whole network)')]:.1f}x)" for b in cost_backbones) +
        ", against the 1.09x claimed: the augmented layer's cost is fixed, so the larger the rest of "
        "the network, the smaller its share. Every image ships as "
        f"{c0['bytes shipped (uint8 vs float32 morphed)']:.1f}x the bytes of its uint8 pixels "
        f"({c0['bytes shipped (JPEG q95 vs float32 morphed)']:.0f}x a JPEG), against 1.05x: C_ac is a "
        f"dense d x C_out H'W' matrix ({c0['first layer: parameters']:.3g}x the first layer's weights). "
        "Still orders of magnitude below the figures quoted for GAZELLE, which computes on encrypted data.",
    ]
    if ma["permutation_recovered"]:
        items.append(
            f"**Security.** The claimed attack success of 7.9e-90 is the chance of guessing P; the "
            f"service provider need not guess it. From the model alone it recovered P and every image "
            f"(PSNR {ma['psnr_db']:.0f} dB, SSIM {ma['ssim']:.3f}, in {ma['seconds']:.0f} s).")
    else:
        items.append(f"**Security.** The attack from the model did not recover P here (images at "
                     f"PSNR {ma['psnr_db']:.1f} dB, SSIM {ma['ssim']:.3f}).")
    best = kp_table["ssim"].idxmax()
    items.append(
        f"**Known plaintext, ciphertext only.** With known pairs, SSIM reached {kp_table.loc[best, 'ssim']:.3f} at N = {best} (Carlini et al.'s "
        f"attack, which broke InstaHide, reached 0.90). The ciphertext-only attacker of second-order "
        f"statistics reached SSIM {co['ssim']:.3f}, against {co['mean_image_ssim']:.3f} for guessing the "
        "public mean image: " + ("no better than the floor." if co["ssim"] <= co["mean_image_ssim"] + 0.02
                                 else "above the floor."))
    first_net = runs["backbone"] == backbone
    m_mple = runs.loc[first_net & (runs["model"] == "MpLe (morphed data)"), "mia_auc"].mean()
    m_plain = runs.loc[first_net & (runs["model"] == "plain, no augmentation"), "mia_auc"].mean()
    items.append(
        f"**Privacy of the model.** Morphing does not change what a trained model leaks: the "
        f"loss-threshold attack's AUC is {m_mple:.3f} on the MpLe model and {m_plain:.3f} on the plain "
        "one. What bounds that leak is DP-SGD, with or without morphing; and DP-SGD does nothing for "
        "the images the service provider receives, which MpLe was meant to hide.")
    return "\n".join(f"- {i}" for i in items)


display(Markdown(verdict()))
