"""The book's Markdown and notebook prose hold no control characters: a LaTeX macro written
through a Python string ("\\bar", "\\tau", "\\varepsilon") turns into a backspace, a tab or a
vertical tab, which breaks the formula in HTML and stops the PDF build."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]|\t")


def test_no_control_characters_in_the_prose():
    files = sorted((ROOT / "book").glob("*.md")) + sorted((ROOT / "notebooks").glob("*.py")) + [ROOT / "README.md"]
    bad = []
    for f in files:
        for m in CONTROL.finditer(f.read_text()):
            line = f.read_text()[:m.start()].count("\n") + 1
            bad.append(f"{f.relative_to(ROOT)}:{line}: {m.group()!r}")
    assert not bad, "control characters (a macro through a Python string?):\n" + "\n".join(bad)
