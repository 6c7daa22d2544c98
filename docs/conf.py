"""Sphinx configuration of the mag-explore site: `make docs` (warnings are errors).

The course pages are the notebooks of ``notebooks/``, executed on the embedded model and kept in a
cache keyed by their content and the package's (``mag_explore.course.nbcache``); the API reference is
generated from ``__all__`` of every module. Both are written to ``docs/gen/`` (not in git) by the
extensions in ``docs/_ext`` before Sphinx reads anything.
"""
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]  # this checkout's package, then the extensions

from mag_explore.course.nbtools import repository_url  # noqa: E402

project = "mag-explore"
author = "the mag-explore authors"
copyright = "the mag-explore authors, MIT licence"

extensions = [
    "myst_nb",                 # Markdown pages and executed notebooks
    "sphinx.ext.autodoc",      # the API reference, from the docstrings
    "sphinx_copybutton",
    "mag_course",              # docs/_ext: the course pages, the syllabus, the slide examples
    "mag_api",                 # docs/_ext: one reference page per module with an __all__
]

# Notebooks arrive executed (docs/_ext/mag_course.py, through the cache): MyST-NB never runs them.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath", "substitution"]
myst_heading_anchors = 3
myst_substitutions = {"repository": repository_url(ROOT)}

exclude_patterns = ["_build", "**.ipynb_checkpoints", "_ext"]
suppress_warnings = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": False}

html_theme = "furo"
html_title = "mag-explore"
html_static_path = []
# The site works offline: no fonts or scripts from elsewhere (the furo theme ships its own).
html_theme_options = {"source_repository": repository_url(ROOT) + "/", "source_branch": "main",
                      "source_directory": "docs/"}
