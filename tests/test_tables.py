"""Numbered, captioned results tables (dpskin_core.book.tables.captioned): the MyST form the
book renders, its escaping, and the labels the prose refers to."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpskin_core.book.tables import Table, captioned

ROOT = Path(__file__).resolve().parents[1]


def test_markdown_is_a_named_table_directive_with_every_row():
    df = pd.DataFrame({"model": ["a", "b"], "bacc": [0.51234, np.float64(0.4)]}).set_index("model")
    md = captioned(df, "tbl-x", "Two   models.").markdown()
    lines = md.splitlines()
    assert lines[0] == "```{table} Two models." and lines[1] == ":name: tbl-x"
    assert lines[3] == "| model | bacc |" and lines[4] == "|---|---|"
    assert lines[5:7] == ["| a | 0.5123 |", "| b | 0.4 |"]  # no np.float64(...) reprs
    assert lines[-1] == "```"


def test_cells_that_would_break_the_table_are_escaped_and_missing_values_shown():
    df = pd.DataFrame({"c": ["x|y", "a_b*c", "$1$", None], "v": [1.0, np.nan, 2.5, 3.0]})
    body = captioned(df, "tbl-y", "c").markdown().splitlines()[5:9]
    assert body[0] == r"| x\|y | 1 |"  # an unescaped | would split the cell
    assert body[1] == r"| a\_b\*c | – |"
    assert body[2] == r"| \$1\$ | 2.5 |"
    assert body[3] == "| – | 3 |"


def test_multiindex_rows_and_columns_are_flattened():
    cols = pd.MultiIndex.from_tuples([("psnr", "mean"), ("psnr", "std")])
    df = pd.DataFrame([[1.0, 0.5]], columns=cols, index=pd.Index(["dp"], name="mode"))
    lines = captioned(df, "tbl-z", "c").markdown().splitlines()
    assert lines[3] == "| mode | psnr mean | psnr std |"


def test_jupyter_gets_html_and_the_book_markdown():
    bundle = captioned(pd.Series([1, 2], name="n"), "tbl-s", "A series.")._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/markdown", "text/plain"}
    assert "A series." in bundle["text/html"] and "<table" in bundle["text/html"]


@pytest.mark.parametrize("name,caption", [("Tbl X", "c"), ("tbl_x", "c"), ("tbl-x", "  ")])
def test_bad_names_and_empty_captions_are_refused(name, caption):
    with pytest.raises(ValueError, match="table name|caption"):
        Table(pd.DataFrame({"a": [1]}), name, caption)


def _labels() -> tuple[list[str], list[str]]:
    """Figure and table labels declared in the notebooks, and every {numref} target."""
    declared, refs = [], []
    for src in [*(ROOT / "notebooks").glob("*.py"), *(ROOT / "book").glob("*.md")]:
        text = src.read_text()
        declared += re.findall(r'"name": "([a-z0-9-]+)"', text)  # figure cell metadata
        declared += re.findall(r'^\s*f?"(tbl-[a-z0-9{}-]+)"', text, re.M)  # captioned(...) names
        refs += re.findall(r"\{numref\}`([^`]+)`", text)
    return declared, refs


def test_every_numref_points_at_a_declared_figure_or_table():
    declared, refs = _labels()
    assert refs, "the prose refers to no figure or table by number"
    missing = sorted(set(refs) - set(declared))
    assert not missing, f"{{numref}} targets no notebook declares: {missing}"
    fixed = [d for d in declared if "{" not in d]
    dup = sorted({d for d in fixed if fixed.count(d) > 1})
    assert not dup, f"labels declared twice (Sphinx would warn and numref pick one): {dup}"
    assert any(r.startswith("tbl-") for r in refs), "no table is referred to by number"


def test_no_results_table_is_left_bare():
    """The last expression of a code cell that builds a table goes through captioned()."""
    import ast

    import jupytext

    bare = []
    for src in sorted((ROOT / "notebooks").glob("*.py")):
        for cell in jupytext.read(src).cells:
            if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
                continue
            body = ast.parse(cell.source).body
            if not body or not isinstance(body[-1], ast.Expr):
                continue
            expr = ast.unparse(body[-1])
            if re.match(r"(pd\.(DataFrame|Series|concat)\(|\w+(\.(set_index|round|sort_values|"
                        r"pivot_table|groupby|loc)\b.*)?$|[\w.]*_table\()", expr) and not expr.startswith("captioned("):
                bare.append(f"{src.name}: {expr[:60]}")
    assert not bare, f"tables shown without a number and caption: {bare}"
