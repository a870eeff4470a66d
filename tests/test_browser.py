"""The built book in a real browser: Debian's chromium, headless, driven by Selenium.

Run after `dpskin book` (CI does). Visits every chapter of the table of contents of the
built book (`_build/html`), and checks that every image loaded, every results table has rows,
no page shows a Python traceback or a Sphinx error, and every internal link points to a file
that exists. A screenshot of each chapter goes to `_build/screenshots/`.

Skips, with the reason, when no book is built or no chromium / chromedriver is installed.
Chromium starts with background networking, component updates and sync disabled, so it opens
no connection off this machine.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("DPSKIN_BOOK_HTML", ROOT / "_build" / "html"))
CHROMIUM = os.environ.get("DPSKIN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DPSKIN_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = HTML.parent / "screenshots"


def toc_pages() -> list[str]:
    """Every document of _toc.yml (root first) as a path relative to the HTML folder."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    docs = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                docs.append(e["file"])
            walk(e.get("sections"))
            walk(e.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [str(Path(d).with_suffix(".html")) for d in docs]


def _skip_reason() -> str | None:
    if not (HTML / "index.html").is_file():
        return f"no built book at {HTML} (run `dpskin book --profile smoke` first)"
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        return f"no chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
    if not Path(CHROMEDRIVER).is_file():
        return f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


# CI sets DPSKIN_REQUIRE_BROWSER=1 after building the book: there, a skip would hide a failure
if os.environ.get("DPSKIN_REQUIRE_BROWSER") == "1" and _skip_reason() is not None:
    raise RuntimeError(f"the browser test cannot run: {_skip_reason()}")
pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(browser, path: Path) -> None:
    """Load ``path`` and wait until that document has loaded and its images are settled."""
    from selenium.webdriver.support.ui import WebDriverWait

    uri = path.as_uri()
    browser.get(uri)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && document.URL.split('#')[0] === arguments[0];",
        uri))
    # wait for every <img> to finish loading (or fail) before judging naturalWidth
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
        " new Promise(r => { i.onload = i.onerror = r; }))).then(() => done(0));")


def test_toc_pages_were_built():
    missing = [p for p in toc_pages() if not (HTML / p).is_file()]
    assert not missing, f"chapters in _toc.yml without a built page: {missing}"


@pytest.mark.parametrize("page", toc_pages())
def test_chapter_renders(browser, page):
    from selenium.webdriver.common.by import By

    path = HTML / page
    assert path.is_file(), f"{page} was not built"
    _open(browser, path)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / (page.replace("/", "__").removesuffix(".html") + ".png")))

    main = browser.find_element(By.CSS_SELECTOR, "main, article, body")
    text = main.text
    assert "Traceback (most recent call last)" not in text, f"{page} shows a Python traceback"
    for marker in ("Error in glue", "Exception occurred", "Sphinx error", "System Message:",
                   "could not find glue", "docutils", "{glue", "{doc}", "{ref}"):
        assert marker not in text, f"{page} shows {marker!r}"
    errors = browser.find_elements(By.CSS_SELECTOR, ".system-message, .output.error, "
                                                    "div.output_error, .cell_output .traceback")
    assert not errors, f"{page} has {len(errors)} error blocks: {errors[0].text[:300]}"

    # nothing runs past the right edge of the window (1280 px): wide tables scroll in a box
    overflow = browser.execute_script(
        "return Array.from(document.querySelectorAll('.cell_output table')).filter(t => {"
        " const r = t.getBoundingClientRect(); if (r.right <= window.innerWidth) return false;"
        " for (let p = t.parentElement; p; p = p.parentElement) {"
        "  const o = getComputedStyle(p).overflowX;"
        "  if ((o === 'auto' || o === 'scroll') && p.getBoundingClientRect().right <= window.innerWidth)"
        "   return false; }"
        " return true; }).length;")
    assert overflow == 0, f"{page}: {overflow} table(s) run past the right edge with no scroll box"

    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !(i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'));")
    assert not broken, f"{page}: images that did not load: {broken}"

    if page.startswith("book/results/"):
        # every results table (pandas output) has at least one body row
        tables = browser.find_elements(By.CSS_SELECTOR, ".cell_output table")
        for t in tables:
            rows = t.find_elements(By.CSS_SELECTOR, "tbody tr")
            assert rows, f"{page}: a results table has no rows:\n{t.text[:300]}"

    hrefs = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));")
    bad = []
    for href in hrefs:
        u = urlparse(href)
        if u.scheme or href.startswith("#") or href.startswith("//") or not u.path:
            continue  # external (not fetched by viewing) or same-page anchors
        target = (path.parent / unquote(u.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(href)
    assert not bad, f"{page}: internal links to missing files: {sorted(set(bad))}"


def test_results_chapters_have_figures_and_tables(browser):
    """The executed notebooks actually produced output (not placeholders): every results
    chapter that draws a figure shows it (a kernel under MPLBACKEND=Agg once drew none)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    pages = [f"book/results/{name}.html" for name in
             ("00_data", "01_baseline", "02_dp_sgd", "03_dp_adam", "06_networks", "07_tuning",
              "04_proposed", "05_attacks", "08_mple", "09_federated",
              "10_summary")]
    count = ("return [document.querySelectorAll('.cell_output img').length,"
             " document.querySelectorAll('.cell_output table').length];")
    empty = []
    for page in pages:
        _open(browser, HTML / page)
        # poll: right after load, the theme's scripts rework the cell outputs, and a query then
        # has found none of a page's figures that were in its file (2 runs in 10, locally)
        try:
            WebDriverWait(browser, 10, poll_frequency=0.2).until(
                lambda d: all(n > 0 for n in d.execute_script(count)))
        except TimeoutException:
            imgs, tables = browser.execute_script(count)
            empty.append(f"{page}: {imgs} images, {tables} tables")
    assert not empty, f"results chapters without figures or tables: {empty}"


def test_every_figure_and_table_has_a_number_and_a_caption(browser):
    """Each results image is a numbered figure ("Fig. 9.1") and each results table a numbered
    table ("Table 9.2") with its caption, and the text's references to them resolved to their
    numbers."""
    from selenium.webdriver.common.by import By

    unnumbered, refs = [], {"Fig.": 0, "Table": 0}
    for page in [p for p in toc_pages() if p.startswith("book/results/")]:
        _open(browser, HTML / page)
        for img in browser.find_elements(By.CSS_SELECTOR, ".cell_output img"):
            fig = img.find_elements(By.XPATH, "ancestor::figure")
            num = fig[0].find_elements(By.CSS_SELECTOR, ".caption-number") if fig else []
            if not num or not num[0].text.strip().startswith("Fig."):
                unnumbered.append(f"{page}: {img.get_attribute('src')[-40:]}")
        for t in browser.find_elements(By.CSS_SELECTOR, ".cell_output table"):
            num = t.find_elements(By.CSS_SELECTOR, "caption .caption-number")
            text = t.find_elements(By.CSS_SELECTOR, "caption .caption-text")
            if not num or not num[0].text.strip().startswith("Table") or not text \
                    or not text[0].text.strip():
                unnumbered.append(f"{page}: table {t.text[:60]!r}")
        for a in browser.find_elements(By.CSS_SELECTOR, "a.reference.internal span.std-numref"):
            kind = next((k for k in refs if a.text.startswith(k)), None)
            assert kind, f"{page}: a reference reads {a.text!r}"
            refs[kind] += 1
    assert not unnumbered, f"figures or tables without a number: {unnumbered[:10]}"
    assert all(refs.values()), f"references by number: {refs}"


def test_the_bibliography_lists_every_entry_and_citations_resolve(browser):
    """Every entry of book/references.bib is listed, and no citation is left unresolved."""
    import re

    from selenium.webdriver.common.by import By

    n_entries = len(re.findall(r"^@\w+\{", (ROOT / "book" / "references.bib").read_text(), re.M))
    _open(browser, HTML / "book" / "bibliography.html")
    listed = browser.find_elements(By.CSS_SELECTOR, "div.citation[role='doc-biblioentry']")
    assert len(listed) == n_entries, f"{len(listed)} of {n_entries} entries listed"
    for page in ("book/intro.html", "book/methods.html", "book/data.html"):
        _open(browser, HTML / page)
        text = browser.find_element(By.CSS_SELECTOR, "main, article, body").text
        assert "{cite" not in text and "[?]" not in text, f"{page}: an unresolved citation"
