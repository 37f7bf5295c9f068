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
    "sphinx.ext.intersphinx",
    "myst_parser",  # the changelog page includes ../CHANGELOG.md (Markdown)
]

# Links to Python, torch, Pyro and arviz need their objects.inv. The docs build offline (no
# network at build time), so the inventories are read from local files when present
# (docs/_inventories/<name>.inv, e.g. fetched once by `python -m sphinx.ext.intersphinx URL`
# on a machine with a network) and otherwise skipped; names of those packages that cannot
# be resolved are then ignored by nitpick_ignore_regex below rather than failing `-n -W`.
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "pyro": "https://docs.pyro.ai/en/stable",
    "arviz": "https://python.arviz.org/en/stable",
}
_inv_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_inventories")
intersphinx_mapping = {
    name: (url, os.path.join(_inv_dir, f"{name}.inv"))
    for name, url in _INVENTORIES.items()
    if os.path.exists(os.path.join(_inv_dir, f"{name}.inv"))
}
intersphinx_disabled_reftypes = ["*"]  # only explicit external references, never guesses

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
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# every reference to the package's own names must resolve (`sphinx-build -n -W`); names of
# other packages resolve through intersphinx when its inventories are present (above),
# else they are ignored here (no network at build time).
nitpicky = True
# "more than one target found": the package documents some objects at two paths (e.g.
# pyro_mpt.conditionals.Conditionals and pyro_mpt.conditionals.base.Conditionals, the same
# class), and a bare type hint finds both; either target is right.
suppress_warnings = ["ref.python", "myst.header"]  # myst.header: the changelog starts at H2
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"~?(torch|pyro|arviz|matplotlib|pandas|numpy|np|xarray|scipy|transformers|tqdm|"
        r"warnings|typing|collections|os|io|logging|argparse|contextlib|types|pd|dataclasses)"
        r"(\..*)?",
    ),
    (r"py:.*", r"_\w+"),  # private upstream classes named by inherited type hints
    # builtins and typing names as the type hints spell them
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|TextIO|PathLike|Path|"
        r"Tensor|Axes|Figure|Module|Generator|InferenceData|ELPDData|DataFrame|Trace|"
        r"Distribution|TorchDistribution|Constraint|ExpandedDistribution|Messenger|None|"
        r"NoneType|ndarray|device|dtype|Literal|Optional|Union|Self|__call__)",
    ),
]

templates_path = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

html_theme = "alabaster"
html_static_path = []
html_title = f"pyro-mpt {release}"


def _lookup(path):
    """The object named by a dotted ``path`` (a module, then attributes), or ``None``."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_reexport(app, env, node, contnode):
    """A reference to one of the package's names under another path than the one it is
    documented at (``pyro_mpt.plot_curve`` for ``pyro_mpt.plotting.plot_curve``,
    ``LMLEstimate`` inside :mod:`pyro_mpt.reference`): resolved to the documented name of
    the same object, so docstrings may name objects as users import them."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    context = [node.get("py:module"), node.get("py:class")]
    candidates = [target]
    if node.get("py:module") and not target.startswith("pyro_mpt"):
        candidates.append(f"{context[0]}.{target}")
        if context[1]:
            candidates.append(f"{context[0]}.{context[1]}.{target}")
    domain = env.get_domain("py")
    tail = target.rsplit(".", 1)[-1]
    for candidate in candidates:
        if not candidate.startswith("pyro_mpt"):
            continue
        obj = _lookup(candidate)
        # only modules, classes and functions: a value (None, 0, a string) is not an identity
        if obj is None or not (hasattr(obj, "__qualname__") or hasattr(obj, "__path__")):
            continue
        for name in list(domain.objects):
            if name.rsplit(".", 1)[-1] == tail and name != candidate and _lookup(name) is obj:
                return domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], name, node, contnode
                )
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
