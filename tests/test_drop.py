"""The tables of the performance-drop chapter (dpskin_core.book.drop) on hand-made run rows."""
import numpy as np
import pandas as pd
import pytest

from dpskin_core.book import drop
from dpskin_core.constants import CLASSES


def _rows():
    rows = []
    for net, base in (("netA", 0.6), ("netB", 0.5)):
        for opt in ("sgd", "adam"):
            for seed in (0, 1, 2):
                jitter = 0.01 * (seed - 1)
                rows.append(dict(backbone=net, optimizer=opt, dp=False, target_epsilon=None,
                                 seed=seed, balanced_accuracy=base + jitter, predicted_classes=7,
                                 split="lesion", **{f"recall_{c}": 0.6 for c in CLASSES}))
                for eps, loss in ((1.0, 0.3), (8.0, 0.1 if net == "netA" else 0.2)):
                    rec = {f"recall_{c}": 0.6 - (0.5 if c == "DF" else 0.0) * (eps == 1.0)
                           for c in CLASSES}
                    rows.append(dict(backbone=net, optimizer=opt, dp=True, target_epsilon=eps,
                                     seed=seed, balanced_accuracy=base - loss + jitter,
                                     predicted_classes=1 if eps == 1.0 and seed == 0 else 5,
                                     split="lesion", **rec))
    return pd.DataFrame(rows)


def test_accuracy_table_drops_and_kept_fraction():
    t = drop.accuracy_table(_rows(), [1.0, 8.0])
    assert list(t.columns[:3]) == ["ε = ∞", "ε = 8", "ε = 1"]
    assert t.loc[("netA", "SGD"), "drop at ε = 8"] == pytest.approx(0.1)
    assert t.loc[("netB", "Adam"), "drop at ε = 8"] == pytest.approx(0.2)
    assert t.loc[("netA", "Adam"), "drop at ε = 1"] == pytest.approx(0.3)
    assert t.loc[("netB", "SGD"), "kept at ε = 8"] == pytest.approx(0.6)
    assert t.loc[("netA", "SGD"), "ε = ∞"] == "0.600 ± 0.010"
    assert (t["n"] == 3).all()


def test_drop_long_and_figure_inputs():
    long = drop.drop_long(_rows())
    assert set(long["ε"]) == {1.0, 8.0} and len(long) == 2 * 2 * 2 * 3
    a = long[(long["network"] == "netA") & (long["ε"] == 8.0)]
    assert np.allclose(a["drop"], 0.1 - 0.01 * (a["seed"] - 1))


def test_recall_drop_names_the_class_that_pays():
    rd = drop.recall_drop_by_network(_rows(), 1.0)
    assert list(rd.columns) == list(CLASSES)
    assert np.allclose(rd["DF"], 0.5) and np.allclose(rd.drop(columns="DF"), 0.0)
    assert drop.recall_drop_by_network(_rows(), 3.0).empty  # no such budget


def test_a_network_without_dp_runs_is_a_reference_only():
    """A profile's dp_backbones may leave a network with its non-private runs only."""
    extra = pd.DataFrame([dict(backbone="netC", optimizer="adam", dp=False, target_epsilon=None,
                               seed=s, balanced_accuracy=0.7, predicted_classes=7, split="lesion",
                               **{f"recall_{c}": 0.7 for c in CLASSES}) for s in (0, 1, 2)])
    runs = pd.concat([_rows(), extra], ignore_index=True)
    t = drop.accuracy_table(runs, [1.0, 8.0])
    assert t.loc[("netC", "Adam"), "ε = 8"] == "—" and t.loc[("netC", "Adam"), "n"] == 3
    assert np.isnan(t.loc[("netC", "Adam"), "drop at ε = 8"])
    assert "netC" not in drop.recall_drop_by_network(runs, 1.0).index.get_level_values("network")
    assert "netC" not in set(drop.drop_long(runs)["network"])


def test_collapse_table_counts_collapsed_models():
    c = drop.collapse_table(_rows())
    assert c.loc[("netA", "SGD", "ε = 1"), "collapsed"] == 1
    assert c.loc[("netA", "SGD", "ε = 8"), "collapsed"] == 0


def test_loso_table_gap():
    rows = _rows()
    ref = rows[~rows["dp"] & (rows["optimizer"] == "adam")]
    loso = pd.concat([ref.assign(split="site:s1", balanced_accuracy=ref["balanced_accuracy"] - 0.2),
                      ref.assign(split="site:s2", balanced_accuracy=ref["balanced_accuracy"] - 0.1)])
    t = drop.loso_table(loso, ref)
    assert set(t.index) == {"netA", "netB"}
    assert t.loc["netA", "gap (mean over sites)"] == pytest.approx(0.15)
    assert t.loc["netA", "held out: s1"] == "0.400 ± 0.010" and (t["n"] == 3).all()
    assert drop.loso_table(pd.DataFrame(), ref).empty


def test_network_sizes_counts_parameters():
    t = drop.network_sizes(["smallcnn_fast", "mobilenet_v3_small"])
    assert t.loc["smallcnn_fast", "parameters (M)"] < t.loc["mobilenet_v3_small", "parameters (M)"]
    assert (t["weight layers"] > 2).all()


@pytest.mark.parametrize("nets", [["netA"], ["netA", "netB"]])
def test_figures_draw_for_one_network_and_several(nets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows()
    rows = rows[rows["backbone"].isin(nets)]
    fig = drop.drop_figure(drop.drop_long(rows))
    assert len(fig.axes) == 2
    fig2 = drop.recall_drop_heatmap(drop.recall_drop_by_network(rows, 1.0), 1.0)
    assert fig2.axes
    plt.close("all")
