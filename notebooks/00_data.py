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
# # The data
#
# This chapter describes the data set the experiments of this profile train on: its class
# distribution, a few images of every class, how many images each lesion has, and the sizes of
# the train / validation / test splits. Every number below is computed from the data as loaded
# by `dpskin_core.data.load_data`, the same call the training runs make.
#
# ```{note}
# This chapter describes a **public** data set as a whole, as its paper does (HAM10000 lists
# its class counts). A hospital deploying the private models of the later chapters would not
# publish such statistics of its own data: they are not covered by any $\varepsilon$. For the
# same reason no statistic of the *training split* is shown here (the per-class counts of the
# training split would undo the noisy class histogram that the proposed technique releases),
# and no run record of a private model holds one.
# ```

# %% tags=["parameters"]
# Parameters (papermill injects the values of an execution after this cell). The profile's
# parameters come from experiments.yml; `overrides` changes some of them, e.g.
# {"epochs": 2, "seeds": [0]}.
profile = "smoke"
overrides = {}

# %% tags=["remove-cell"]
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from PIL import Image

from dpskin_core import CLASSES
from dpskin_core.book.registry import profile_params
from dpskin_core.book.tables import captioned, glue
from dpskin_core.constants import HAM10000_COUNTS
from dpskin_core.data import DataSpec, load_data
from dpskin_core.data.imagecache import crop_resize

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.precision", 3)
P = profile_params(profile, overrides)
dataset, image_size = P.dataset, P.image_size

# %%
data = load_data(DataSpec(dataset=P.dataset, data_root=P.data_root, image_size=P.image_size,
                          synth_n=P.synth_n))
meta = data.meta.assign(diagnosis=data.meta["label"].map(dict(enumerate(CLASSES))))
root = Path(data.info["root"])
print(f"profile {profile}: dataset {dataset!r} from {root}, {len(meta)} images at "
      f"{image_size} px")

# %% tags=["remove-cell"]
n_images, n_lesions = len(meta), meta["lesion_id"].nunique()
share = meta["diagnosis"].value_counts(normalize=True).reindex(CLASSES)
glue("dataset_name", dataset, display=False)
glue("n_images", n_images, display=False)
glue("n_lesions", n_lesions, display=False)
glue("image_size", image_size, display=False)
glue("share_nv", 100 * share["NV"], display=False)
glue("share_df", 100 * share["DF"], display=False)
glue("imbalance_ratio", share.max() / share.min(), display=False)
glue("ham_total", sum(HAM10000_COUNTS.values()), display=False)

# %% [markdown]
# ## Class distribution
#
# The data set ({glue:text}`dataset_name`) holds {glue:text}`n_images` images of
# {glue:text}`n_lesions` distinct lesions. Its classes are as imbalanced as in HAM10000, the
# source of the ISIC 2018 Task 3 training set: naevi (NV) make up {glue:text}`share_nv:.1f` % of
# the images, dermatofibroma (DF) only {glue:text}`share_df:.1f` %, a ratio of
# {glue:text}`imbalance_ratio:.0f` to 1 between the largest and the smallest class. This is
# why the official metric is the *balanced* accuracy (the mean recall over the seven classes):
# a model that always answers NV has a plain accuracy equal to the NV share but a balanced
# accuracy of 1/7.
#
# {numref}`fig-class-distribution` shows it.

# %%
ham = pd.Series(HAM10000_COUNTS).reindex(CLASSES)
dist = pd.DataFrame({
    "images": meta["diagnosis"].value_counts().reindex(CLASSES).fillna(0).astype(int),
    "this data set (%)": 100 * share,
    "HAM10000 (%)": 100 * ham / ham.sum(),
})
dist.index.name = "class"
captioned(dist.round(2),
          "tbl-class-distribution",
          "Images per class in this data set, and the class shares of HAM10000 (%).")

# %% mystnb={"figure": {"caption": "Share of each class in this data set and in HAM10000.", "name": "fig-class-distribution"}}
fig, ax = plt.subplots(figsize=(7, 3.2))
plot = dist.reset_index().melt(id_vars="class", value_vars=["this data set (%)", "HAM10000 (%)"],
                               var_name="source", value_name="share (%)")
sns.barplot(data=plot, x="class", y="share (%)", hue="source", ax=ax)
ax.set_yscale("log")
ax.set_title(f"Class distribution ({dataset}) against HAM10000")
ax.set_xlabel("")
fig.tight_layout()

# %% [markdown]
# ## Sample images per class
#
# A few images of every class, centre-cropped to a square and resized: each at a readable size
# (left of each pair) and at the {glue:text}`image_size` px the models of this profile see
# (right).
#
# {numref}`fig-sample-images` shows it.

# %% mystnb={"figure": {"caption": "Sample images of every class, at a readable size and at the training resolution.", "name": "fig-sample-images"}}
per_class, show_px = 4, 96
rng = np.random.default_rng(0)
fig, axes = plt.subplots(len(CLASSES), 2 * per_class, figsize=(2 * per_class * 1.05, len(CLASSES) * 1.1))
img_dir = root / "ISIC2018_Task3_Training_Input"
x_all = {"train": data.x_train, "val": data.x_val, "test": data.x_test}
pos_in_split = meta.groupby("split").cumcount()
for c, name in enumerate(CLASSES):
    rows = meta.index[meta["label"] == c].to_numpy()
    pick = rng.choice(rows, size=min(per_class, len(rows)), replace=False)
    for j in range(per_class):
        big, small = axes[c, 2 * j], axes[c, 2 * j + 1]
        for a in (big, small):
            a.set_xticks([])
            a.set_yticks([])
        if j >= len(pick):
            big.axis("off")
            small.axis("off")
            continue
        r = meta.loc[pick[j]]
        with Image.open(img_dir / f"{r['image']}.jpg") as im:
            big.imshow(crop_resize(im, show_px))
        small.imshow(x_all[r["split"]][pos_in_split[pick[j]]])
    axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
fig.suptitle(f"{per_class} images per class, each at {show_px} px (left) and at the training "
             f"resolution of {image_size} px (right)", fontsize=9)
fig.tight_layout()

# %% [markdown]
# ## Images per lesion
#
# A lesion can be photographed several times. Images of the same lesion are highly
# correlated, so the splits below are *grouped by lesion*: all images of a lesion go to the same
# split, otherwise the test set would contain near-copies of training images. The same
# grouping matters for privacy: differential privacy as used here protects one *image*; a
# lesion (or a patient) with *k* images is protected at a weaker level (group privacy, roughly
# *k* times the budget; see the Methods chapter).

# %%
per_lesion = meta.groupby("lesion_id").size()
glue("max_images_per_lesion", int(per_lesion.max()), display=False)
glue("share_multi_image_lesions", 100 * (per_lesion > 1).mean(), display=False)
lesion_table = per_lesion.value_counts().sort_index().rename("lesions").to_frame()
lesion_table.index.name = "images per lesion"
lesion_table["images"] = lesion_table.index * lesion_table["lesions"]
captioned(lesion_table,
          "tbl-images-per-lesion",
          "Lesions by their number of images.")

# %% [markdown]
# {glue:text}`share_multi_image_lesions:.1f` % of the lesions have more than one image, up to
# {glue:text}`max_images_per_lesion` images.

# %% [markdown]
# ## Split sizes
#
# The split is seeded, stratified by class and grouped by lesion (no lesion appears in two
# splits); the same split is used by every run of this profile, whatever its training seed.
# Only the sizes are shown (the number of training images N is treated as public: it sets the
# sampling rate of DP training); the class counts of the training split are not
# ({numref}`tbl-split-sizes`).

# %%
sizes = meta.groupby("split").agg(images=("image", "size"), lesions=("lesion_id", "nunique"))
sizes = sizes.reindex(["train", "val", "test"])
leak = (meta.groupby("lesion_id")["split"].nunique() > 1).sum()
glue("n_train", int(sizes.loc["train", "images"]), display=False)
glue("n_val", int(sizes.loc["val", "images"]), display=False)
glue("n_test", int(sizes.loc["test", "images"]), display=False)
glue("n_leaking_lesions", int(leak), display=False)
captioned(sizes,
          "tbl-split-sizes",
          "Images and lesions in each split (grouped by lesion).")

# %% [markdown]
# The training split has {glue:text}`n_train` images, the validation split
# {glue:text}`n_val` and the test split {glue:text}`n_test`; {glue:text}`n_leaking_lesions`
# lesions appear in more than one split.
