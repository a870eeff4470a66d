"""Tables of run rows for the book: mean ± std over seeds, per-class recall, eps over
training, and ``glue`` for the numbers the prose quotes."""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from ..constants import CLASSES


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.512 ± 0.014`` (``± n/a`` when std is undefined, i.e. a single seed)."""
    s = "n/a" if pd.isna(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {s}"


def summary_table(runs: pd.DataFrame, by: Sequence[str],
                  metrics: Sequence[str] = ("balanced_accuracy", "accuracy", "auc_macro", "ece"),
                  digits: int = 3) -> pd.DataFrame:
    """One row per group: ``metric`` as "mean ± std" strings and the number of seeds ``n``."""
    rows = []
    for key, g in runs.groupby(list(by), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            row[m.replace("_", " ")] = fmt_mean_std(g[m].mean(), g[m].std(), digits)
        row["n"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def recall_by_class(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Long table: ``by`` columns, ``class``, ``recall`` (mean over seeds), ``std``, ``n``."""
    cols = [f"recall_{c}" for c in CLASSES]
    long = runs.melt(id_vars=list(by), value_vars=cols, var_name="class", value_name="recall")
    long["class"] = long["class"].str.removeprefix("recall_")
    out = (long.groupby([*by, "class"], dropna=False, sort=False)["recall"]
           .agg(recall="mean", std="std", n="count").reset_index())
    out["class"] = pd.Categorical(out["class"], categories=list(CLASSES), ordered=True)
    return out.sort_values([*by, "class"]).reset_index(drop=True)


def eps_over_steps(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """eps after each epoch of the DP runs, with the optimizer step count it was reached at.

    ``metrics`` is :func:`dpskin_core.results.load_metrics`, ``runs`` the rows of
    :func:`sweep`; steps = epoch x steps per epoch (ceil(N / B) Poisson batches).
    """
    dp = runs[runs["dp"].astype(bool)].set_index("run")
    spe = (dp["steps"] / dp["epochs"]).rename("steps_per_epoch")
    m = metrics[(metrics["run"].isin(dp.index)) & (metrics["split"] == "train")
                & (metrics["metric"] == "lr")][["run", "seed", "epoch", "eps", "target_epsilon",
                                                  "backbone", "method"]]
    m = m.join(spe, on="run")
    m["step"] = (m["epoch"] * m["steps_per_epoch"]).round().astype(int)
    return m.reset_index(drop=True)


def glue(name: str, value: Any, display: bool = False) -> None:
    """``myst_nb.glue`` with plain Python values (numpy scalars become int/float), so the book's
    ``{glue:text}`` roles can format them (``np.float64(0.5)`` is not parseable text)."""
    from myst_nb import glue as _glue

    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    _glue(name, value, display=display)
