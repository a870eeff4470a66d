"""Sphinx extension: keep the built book offline.

* drops the inline script sphinx-thebe always adds (it names a CDN URL for Thebe, which this
  book never launches);
* after the build, scans every HTML page for scripts, stylesheets, fonts or images loaded from
  http(s):// and emits a warning for each (the book builds with -W, so one fails the build).
"""
from __future__ import annotations

import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)

# src= / href= of <script>, <link>, <img>, <source>, <iframe> that point off the machine;
# plain <a href> links to the literature are fine (they are not fetched by viewing a page).
_REMOTE_LOAD = re.compile(
    r"<(script|link|img|source|iframe)\b[^>]*?\b(?:src|href)=[\"'](https?:)?//[^\"']+[\"']",
    re.IGNORECASE)
_REMOTE_CSS = re.compile(r"url\(\s*[\"']?(?:https?:)?//", re.IGNORECASE)
_IMPORT = re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def _drop_remote_scripts(app, pagename, templatename, context, doctree) -> None:
    files = context.get("script_files")
    if not files:
        return
    kept = []
    for js in files:
        body = getattr(js, "attributes", {}).get("body", "") if not isinstance(js, str) else ""
        name = js if isinstance(js, str) else getattr(js, "filename", "") or ""
        if "THEBE_JS_URL" in body or re.match(r"(https?:)?//", str(name)):
            continue
        kept.append(js)
    context["script_files"] = kept


def _check_offline(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    for page in sorted(out.rglob("*.html")):
        text = page.read_text(errors="replace")
        for m in _REMOTE_LOAD.finditer(text):
            logger.warning("%s loads a remote resource: %s", page.relative_to(out), m.group(0)[:160])
    for css in sorted((out / "_static").rglob("*.css")):
        text = css.read_text(errors="replace")
        if _REMOTE_CSS.search(text) or _IMPORT.search(text):
            logger.warning("%s loads a remote resource (url()/@import)", css.relative_to(out))


def setup(app):
    app.connect("html-page-context", _drop_remote_scripts)
    app.connect("build-finished", _check_offline, priority=900)  # after MathJax is copied
    return {"parallel_read_safe": True, "parallel_write_safe": True}
