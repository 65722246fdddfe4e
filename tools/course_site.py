"""Sphinx extension of the course site (loaded by ``_config.yml``): an offline, readable site.

* Thebe (live code through Binder) is dropped: it loads from a CDN, cannot work offline, and
  sphinx-thebe registers its configuration script twice under Jupyter Book 1.x, so every page
  logged ``Identifier 'THEBE_JS_URL' has already been declared``.
* Sections get readable anchors: docutils keeps only ASCII in ids, so Chinese headings became
  ``#id2``; with ``myst_heading_anchors`` MyST computes a Unicode slug (``#11-准备环境数据与基线模型``)
  that is made the section's first id, the one links and the page's table of contents use.
* The colour mode starts as ``auto`` on a first visit: the theme reads it from
  ``localStorage`` and, finding none, logged ``Got invalid theme mode`` as a console error.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx

THEBE_MARKERS = ("THEBE_JS_URL", "sphinx-thebe")


def _is_thebe(asset: Any) -> bool:
    """True for a script or stylesheet that sphinx-thebe added."""
    text = (
        f"{getattr(asset, 'filename', '') or ''} {getattr(asset, 'attributes', {}).get('body', '')}"
    )
    return any(marker in text for marker in THEBE_MARKERS)


def drop_thebe(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Remove sphinx-thebe's scripts and stylesheet from every page."""
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [asset for asset in context[key] if not _is_thebe(asset)]


def slug_anchors(app: Sphinx, doctree: nodes.document) -> None:
    """Make MyST's Unicode heading slug the first id of each section."""
    for section in doctree.findall(nodes.section):
        slug = section.get("slug")
        if slug and slug not in section["ids"] and slug not in doctree.ids:
            section["ids"].insert(0, slug)
            doctree.ids[slug] = section


FIRST_VISIT_MODE = 'if (!document.documentElement.dataset.mode) { document.documentElement.dataset.mode = "auto"; }'


def setup(app: Sphinx) -> dict:
    app.add_js_file(None, body=FIRST_VISIT_MODE, priority=100)
    app.connect("doctree-read", slug_anchors, priority=100)  # before the toc and label collectors
    app.connect("html-page-context", drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
