"""The package's shape, checked from its source: small files and functions, imports that run
one way (down the layers), private upstream APIs used only in ``compat.py``, one paper
reference per module."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_mpt"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80

#: Layers, low to high: a module may import its own layer or lower ones only.
LAYERS = [
    {"options", "compat", "progress", "clock", "intervals"},
    {"tokens", "estimators", "estimate", "ragged", "models", "diagnostics", "plotting", "export"},
    {"conditionals"},
    {"engine", "scoring", "particle_error"},
    {"masked_elbo", "curve", "reference", "evaluation", "distributed"},
    {"report"},
    {"evaluator", "evaluator_options", "mlm"},
    {"experiments"},
    {"cli", "cli_args", "__main__", "__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_key(path):
    """The top-level module or subpackage of ``path`` inside ``pyro_mpt``."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _relpath(path):
    return str(path.relative_to(PACKAGE.parent))


def test_every_module_has_a_layer():
    assert {_module_key(p) for p in SOURCES} <= set(LAYER_OF)


@pytest.mark.parametrize("path", SOURCES, ids=_relpath)
def test_file_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_FILE_LINES


def _code_lines(fn):
    """Lines of a function's code, its docstring excluded."""
    lines = fn.end_lineno - fn.lineno + 1
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        doc = body[0]
        lines -= doc.end_lineno - doc.lineno + 1
    return lines


@pytest.mark.parametrize("path", SOURCES, ids=_relpath)
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = [
        (node.name, _code_lines(node))
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _code_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long


def _imported_modules(path):
    """The ``pyro_mpt`` modules that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    rel_parts = path.relative_to(PACKAGE).parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[: len(rel_parts) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x": x are top-level modules
                    out.update(alias.name for alias in node.names)
                    continue
                out.add(parts[0])
            elif node.module and node.module.split(".")[0] == "pyro_mpt":
                parts = node.module.split(".")[1:]
                if parts:
                    out.add(parts[0])
                else:
                    out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pyro_mpt" and len(parts) > 1:
                    out.add(parts[1])
    return out


#: Upward imports allowed, with the reason: deprecated aliases resolved lazily (a module
#: ``__getattr__`` that warns), never at import time.
DEPRECATED_ALIASES = {("report", "evaluator")}


@pytest.mark.parametrize("path", SOURCES, ids=_relpath)
def test_imports_run_down_the_layers(path):
    own = _module_key(path)
    upward = sorted(
        m
        for m in _imported_modules(path)
        if m in LAYER_OF and LAYER_OF[m] > LAYER_OF[own] and (own, m) not in DEPRECATED_ALIASES
    )
    assert not upward, f"{own} (layer {LAYER_OF[own]}) imports higher modules {upward}"


PRIVATE_UPSTREAM = re.compile(
    r"\._unbroadcasted|\._gpdfit|_enumerate_dim|_enumerate_symbol|_pyro_dims|\btorch\._(?!_)|\bpyro\.[\w.]*\._[a-z]|\barviz\.[\w.]*\._[a-z]"
)


@pytest.mark.parametrize("path", SOURCES, ids=_relpath)
def test_private_upstream_api_only_in_compat(path):
    if path.name == "compat.py":
        return
    assert not PRIVATE_UPSTREAM.findall(path.read_text())


@pytest.mark.parametrize("path", SOURCES, ids=_relpath)
def test_at_most_one_paper_reference_per_module(path):
    assert path.read_text().count("arXiv:2306.00520") <= 1


def test_private_pattern_catches_what_it_should():
    assert PRIVATE_UPSTREAM.findall("fn._unbroadcasted_scale_tril")
    assert PRIVATE_UPSTREAM.findall("arviz.stats.stats._gpdfit")
    assert not PRIVATE_UPSTREAM.findall("torch.linalg.cholesky(x)")
