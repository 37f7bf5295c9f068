r"""The chunk function of the streaming reference, eager or compiled.

A chunk function maps one chunk's inputs to its ``(size, N)`` log-weights and the
statistics the stream keeps (:func:`chunk_stats`). The eager chunk runs the model under
Pyro's trace and is memory-bound: the ``(chunk, N, T)`` log-likelihood tensor is written
and read several times. Two compiled forms:

- ``"log_prob"``: the observed sites' log-densities (the big reduction) run under
  :func:`torch.compile`, fused into one pass;
- ``"graph"``: the whole chunk, model included, is captured as an ATen graph by
  :func:`torch.fx.experimental.proxy_tensor.make_fx` (like :func:`torch.jit.trace`, shapes
  and Python control flow fixed), its latent matrix products with a small inner dimension
  are unrolled (:func:`unroll_small_matmuls`: the ``(chunk, N, T)`` product is never
  stored) and it is compiled by :func:`torch.compile`. The graph is kept for later calls
  with the same model, arguments and chunk shape (a small cache); it depends on the
  chunk's shape only, not on the number of particles, so one compilation serves every
  :math:`S`.

Every compiled function is checked against the eager chunk on a fresh draw with the same
seed before use (inductor's ``fallback_random`` draws as eager code does), so control flow
that depends on the draws is caught; any failure falls back to eager evaluation with a
message.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from ..progress import logger
from .sampler import site_log_prob

__all__ = [
    "COMPILE_MIN_EVALUATIONS",
    "COMPILE_MODES",
    "SMALL_MATMUL",
    "build_chunk_fn",
    "check_compile",
    "chunk_stats",
    "resolve_compile_mode",
    "unroll_small_matmuls",
]

#: The values of ``compile=``.
COMPILE_MODES = (None, False, True, "graph", "log_prob")

#: ``compile=None`` compiles on CUDA when the particle-token evaluations reach this.
COMPILE_MIN_EVALUATIONS = 1e12

#: Matrix products with an inner dimension up to this are unrolled in captured graphs.
SMALL_MATMUL = 8

#: Compiled chunk graphs of recent calls (``compile="graph"``), re-checked at every use.
_GRAPH_CACHE = OrderedDict()
_GRAPH_CACHE_SIZE = 4

_COMPILED_LOG_PROB = None


def check_compile(compile):
    """``compile`` if it is one of :data:`COMPILE_MODES` (``True``/``False`` as bools only).

    :raises ValueError: naming the value and the valid ones."""
    if compile is None or isinstance(compile, bool):
        return compile
    if isinstance(compile, str) and compile in ("graph", "log_prob"):
        return compile
    raise ValueError(
        f"unknown compile={compile!r}; valid values are None, False, True, 'graph', 'log_prob'"
    )


def resolve_compile_mode(compile, evaluations, device):
    """``False``, ``"graph"`` or ``"log_prob"``: ``None`` becomes ``"graph"`` on CUDA for
    at least :data:`COMPILE_MIN_EVALUATIONS` particle-token evaluations, else ``False``;
    ``True`` becomes ``"graph"``."""
    if compile is None:
        big = device is not None and device.type == "cuda"
        compile = "graph" if big and evaluations >= COMPILE_MIN_EVALUATIONS else False
    elif compile is True:
        compile = "graph"
    logger.debug("reference: compile mode %r for %.3g evaluations", compile, evaluations)
    return compile


def chunk_stats(lw):
    r"""What the stream keeps of one chunk's ``(size, N)`` log-weights: the weights, their
    log-sum-exp, that of their squares and their minimum. (The running top-``M`` for
    :math:`\hat k` is taken outside: its size depends on the number of particles, and the
    compiled chunk must not, or every new particle count would compile anew.)"""
    return lw, torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0), lw.amin(0)


def _compiled_log_prob():
    global _COMPILED_LOG_PROB
    if _COMPILED_LOG_PROB is None:
        _COMPILED_LOG_PROB = torch.compile(site_log_prob, dynamic=False, fullgraph=True)
    return _COMPILED_LOG_PROB


def _fork_rng(device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def _close(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if a.shape != b.shape:
        return False
    tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def _reproduces(fn, eager, inputs, device):
    """Whether ``fn`` and the eager chunk agree on one fresh draw with the same seed."""
    seed = int(torch.randint(0, 2**62, ()).item())
    with _fork_rng(device):
        torch.manual_seed(seed)
        a = fn(*inputs)
        torch.manual_seed(seed)
        b = eager(*inputs)
    return _close(a, b)


def unroll_small_matmuls(gm) -> int:
    """Rewrites ``mm`` / ``bmm`` with a small inner dimension ``K`` (a latent dimension,
    e.g. ``z @ W.T`` with ``K = 2``) as a broadcast product summed over ``K``. The same
    function; but where cuBLAS writes the ``(S, N, T)`` product to memory, the compiler
    unrolls the ``K``-sum (``unroll_reductions_threshold``) and fuses it into the
    log-likelihood reduction that reads it, so the big tensor is never stored.

    :returns: the number of products rewritten."""
    aten = torch.ops.aten
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.bmm.default):
            continue
        a, b = node.args[:2]
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if val is None or val.shape[-1] > SMALL_MATMUL:
            continue
        batched = node.target is aten.bmm.default
        with graph.inserting_before(node):
            ua = graph.call_function(aten.unsqueeze.default, (a, 3 if batched else 2))
            ub = graph.call_function(aten.unsqueeze.default, (b, 1 if batched else 0))
            prod = graph.call_function(aten.mul.Tensor, (ua, ub))
            out = graph.call_function(aten.sum.dim_IntList, (prod, [2 if batched else 1]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _arg_key(a):
    if torch.is_tensor(a):
        return ("tensor", id(a), tuple(a.shape), a.dtype, str(a.device))
    if isinstance(a, (int, float, str, bool, type(None))):
        return a
    return ("object", id(a))


def _graph_key(sampler, size, inputs):
    return (
        sampler.kind,
        id(sampler.model),
        id(sampler.guide),
        size,
        tuple(_arg_key(a) for a in sampler.args),
        tuple(sorted((k, _arg_key(v)) for k, v in sampler.kwargs.items())),
        sampler.layout.token_plate,
        tuple((tuple(i.shape), i.dtype, str(i.device)) for i in inputs),
    )


def build_chunk_fn(sampler, size, mode, device, messages):
    """The function that evaluates a full chunk of ``size`` particles: eager
    (``mode=False``) or compiled (``"log_prob"``, ``"graph"``; see the module docstring).
    Any compiler failure falls back to eager evaluation, with a message."""

    def eager(*inputs):
        return chunk_stats(sampler(size, *inputs))

    if mode is False:
        return eager
    inputs = sampler.inputs(0, size)
    try:
        with warnings.catch_warnings():
            # torch's compiler stack imports deprecated torch.jit APIs: not the caller's concern
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\b")
            if mode == "log_prob":
                return _compile_log_prob(sampler, size, device, messages, eager, inputs)
            return _compile_graph(sampler, size, device, messages, eager, inputs)
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so
        messages.append(
            f"compile={mode!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "ran eagerly instead"
        )
        logger.info("reference: compile=%r failed, running eagerly: %s", mode, e)
        return eager


def _compile_log_prob(sampler, size, device, messages, eager, inputs):
    log_prob = _compiled_log_prob()

    def fused(*inputs):
        return chunk_stats(sampler(size, *inputs, log_prob=log_prob))

    if not _reproduces(fused, eager, inputs, device):
        raise RuntimeError("the compiled log-densities differ from the eager ones")
    messages.append(
        "compile='log_prob': the observed sites' log-densities of each chunk ran "
        "fused by torch.compile"
    )
    return fused


def _compile_graph(sampler, size, device, messages, eager, inputs):
    """Captures and compiles the chunk, or reuses a cached graph. A captured graph holds
    the model's tensors by reference; it is reused by a later call with the same model,
    arguments and chunk shape only after passing the fresh-draw check again (a parameter
    or argument rebound to another tensor, or a recycled ``id``, fail it and the chunk is
    captured anew). Raises on failure."""
    from torch.fx.experimental.proxy_tensor import make_fx

    key = _graph_key(sampler, size, inputs)
    compiled = _GRAPH_CACHE.pop(key, None)
    if compiled is not None and _reproduces(compiled, eager, inputs, device):
        _GRAPH_CACHE[key] = compiled
        messages.append(
            "compile='graph': each chunk (model and weights) ran as one compiled graph, "
            "reused from an earlier call after it reproduced the model on a fresh draw"
        )
        return compiled
    gm = make_fx(eager)(*inputs)
    if not _reproduces(gm, eager, inputs, device):
        raise RuntimeError(
            "the captured graph does not reproduce the model on a fresh draw (Python "
            "control flow that depends on the latent draws?)"
        )
    unrolled = unroll_small_matmuls(gm)
    compiled = torch.compile(gm, dynamic=False, options={"fallback_random": True})
    if not _reproduces(compiled, eager, inputs, device):
        raise RuntimeError("the compiled graph does not reproduce the model on a fresh draw")
    _GRAPH_CACHE[key] = compiled
    while len(_GRAPH_CACHE) > _GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.popitem(last=False)
    messages.append(
        "compile='graph': each chunk (model and weights) ran as one graph captured by "
        "make_fx and compiled by torch.compile"
        + (f" ({unrolled} small matrix product(s) unrolled into it)" if unrolled else "")
    )
    return compiled
