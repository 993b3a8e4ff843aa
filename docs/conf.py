"""Sphinx configuration: Markdown pages (MyST), the furo theme, autodoc for the reference.

Build with ``nox -s docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``):
any warning fails the build.
"""

from __future__ import annotations

import flowdsl

project = "flowdsl"
author = "the flowdsl authors"
copyright = "the flowdsl authors"
release = flowdsl.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Cross-references to private modules (``~flowdsl._records.RunRecord``) appear in
# docstrings on purpose; they render as code without a link rather than failing the build.
nitpicky = False

# --- MyST -----------------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # ``[text](#a-heading)`` links to headings down to level 3

# --- autodoc --------------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}

# --- HTML -----------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"flowdsl {release}"
html_static_path: list[str] = []
