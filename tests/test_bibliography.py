"""Every citation of the book has an entry in book/references.bib, and every entry is cited."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
ENTRY = re.compile(r"^@\w+\{([^,\s]+),", re.M)


def cited_keys():
    keys = {}
    for f in sorted((ROOT / "book").glob("*.md")) + sorted((ROOT / "notebooks").glob("*.py")):
        for m in ROLE.finditer(f.read_text()):
            for k in m.group(1).split(","):
                keys.setdefault(k.strip(), f.relative_to(ROOT).as_posix())
    return keys


def test_every_citation_has_an_entry_and_every_entry_is_cited():
    bib = (ROOT / "book" / "references.bib").read_text()
    entries = ENTRY.findall(bib)
    assert len(entries) == len(set(entries)), "duplicate .bib keys"
    cited = cited_keys()
    missing = {k: f for k, f in cited.items() if k not in entries}
    unused = sorted(set(entries) - set(cited))
    assert not missing, f"cited but not in book/references.bib: {missing}"
    assert not unused, f"in book/references.bib but never cited: {unused}"


def test_no_typed_reference_lists_left():
    for f in (ROOT / "book").glob("*.md"):
        assert "\n## References\n" not in f.read_text(), f"{f.name} still types its references"
