"""Tables of run rows for the book: mean ± std over seeds, per-class recall, eps over
training, numbered captioned tables (:func:`captioned`), and ``glue`` for the numbers the
prose quotes."""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
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


# CommonMark lets any ASCII punctuation be backslash-escaped; these would otherwise end a cell
# (|), start emphasis or a role (* _ ` { }), open maths ($) or raw HTML (< >) in MyST
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>$|#~^!&])")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def _cell(value: Any) -> str:
    """One value as table text: floats with up to 4 significant decimals, missing as "–"."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalars print as np.float64(...) otherwise
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if isinstance(value, tuple):
        value = " / ".join(str(v) for v in value)
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Index levels as leading columns (a RangeIndex dropped), column levels joined by " "."""
    named = any(n is not None for n in df.index.names)
    out = df.reset_index() if named or not isinstance(df.index, pd.RangeIndex) else df.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" ".join(str(p) for p in c if str(p)) for c in out.columns]
    return out


@dataclass(frozen=True)
class Table:
    """A results table with a number, a caption and a label the prose refers to with
    ``{numref}`<name>```.

    Jupyter shows it as pandas' HTML table with the caption; the book (HTML and LaTeX
    builders, ``nb_mime_priority_overrides`` in ``_config.yml``) renders its ``text/markdown``
    form, a MyST ``{table}`` directive, so Sphinx numbers it ("Table 9.2") and the PDF gets a
    real LaTeX table rather than a monospaced text dump.
    """

    frame: pd.DataFrame
    name: str
    caption: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r}: lower-case letters, digits and '-' only "
                             "(it is a cross-reference label)")
        if not self.caption.strip():
            raise ValueError(f"table {self.name!r}: the caption is empty")

    def markdown(self) -> str:
        """The MyST ``{table}`` directive holding a pipe table of the frame."""
        flat = _flat(self.frame)
        head = [_cell(c) or " " for c in flat.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for row in flat.itertuples(index=False):
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
        caption = " ".join(self.caption.split())
        return f"```{{table}} {caption}\n:name: {self.name}\n\n" + "\n".join(lines) + "\n```\n"

    def _repr_html_(self) -> str:
        body = self.frame.to_html(na_rep="–", float_format=lambda v: _cell(float(v)))
        return f"<p><b>{html.escape(self.caption)}</b></p>\n{body}"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/markdown": self.markdown(),
                "text/plain": f"{self.caption}\n{self.frame.to_string()}"}


def captioned(frame: pd.DataFrame | pd.Series, name: str, caption: str) -> Table:
    """``frame`` as a numbered table labelled ``name`` (``tbl-...``) with ``caption``: the last
    expression of a notebook cell, in place of the bare frame."""
    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    return Table(frame, name, caption)
