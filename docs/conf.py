"""Sphinx configuration for pyro-mpt."""

import os
import sys
import warnings

# Build from the source tree without requiring an install.
sys.path.insert(0, os.path.abspath(".."))

# arviz >= 0.23 warns on import about its coming refactor; not a problem of these docs.
warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)

project = "pyro-mpt"
author = "pyro_mpt developers"
copyright = "2025, pyro_mpt developers"

try:
    from importlib.metadata import version as _version

    release = _version("pyro-mpt")
except Exception:  # not installed
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
]

# Tutorials (../tutorials/*.py) run when the docs build; `.. plot:: name.py` resolves
# against plot_basedir. Set CI=1 for small sizes.
plot_basedir = os.path.abspath(os.path.join("..", "tutorials"))
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.max_open_warning": 0}
plot_pre_code = ""

# Docstrings use reST field lists (":param type name:"), so no napoleon.
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "none"
nitpicky = False

templates_path = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

html_theme = "alabaster"
html_static_path = []
html_title = f"pyro-mpt {release}"
