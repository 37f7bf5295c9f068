r"""Reference log marginal likelihoods: the number a masked estimate is checked against.

:func:`log_marginal_likelihood` returns :math:`\log p(X) = \sum_n \log p(x_n)` of a Pyro model
and data, per sequence (the sequences of :mod:`pyro_mpt.tokens`), by one of

- ``"exact"``: observed sites without latents (their log-density, Gaussians with a dense or
  low-rank covariance included), and discrete latents marked
  ``infer={"enumerate": "parallel"}`` summed out exactly (enumeration of the joint support,
  or variable elimination for Markov chains: :mod:`pyro_mpt.conditionals.elimination`);
- ``"importance"``: per-sequence importance sampling with the prior or a guide as proposal,

  .. math::
      \log p(x_n) \approx \log \frac1S \sum_{s=1}^S w_{s,n}, \qquad
      \log w_{s,n} = \log p(x_n, z_{s,n}) - \log q(z_{s,n}), \quad z_{s,n} \sim q,

  with the log-mean-exp *inside* the data plate (one weight per particle and sequence, as
  the IWAE bound of Burda et al. (2016) and unlike Pyro's
  :class:`~pyro.infer.Importance`, whose one weight per particle for the whole data set
  degenerates as :math:`N` grows). With the prior as proposal :math:`\log w_{s,n}` is just
  :math:`\log p(x_n \mid z_{s,n})`. Enumerated latents are summed out inside each weight;
- ``"quadrature"``: a midpoint grid of :math:`G^d` points over the continuous latents
  (:math:`d \le 3` per sequence), :math:`\log p(x_n) \approx \log \sum_s p(z_s)\,\Delta^d\,
  p(x_n \mid z_s)`, as in :mod:`pyro_mpt.conditionals.quadrature`;
- ``"auto"``: ``"exact"`` when every latent is enumerated (or there is none), otherwise
  ``"importance"``.

**Standard error and bias of importance sampling.** With
:math:`\mathrm{ESS}_n = (\sum_s w_{s,n})^2 / \sum_s w_{s,n}^2`, the delta method gives

.. math:: \mathrm{SE}\big(\log \hat p(x_n)\big) \approx
    \frac{\mathrm{sd}(w)}{\sqrt S\,\overline w}
    = \sqrt{\frac{S/\mathrm{ESS}_n - 1}{S - 1}},

and the estimate is biased *down* by about :math:`\mathrm{SE}^2/2` (Jensen; the bias is
:math:`O(1/S)`). Both, and the Pareto :math:`\hat k` of the weights (:mod:`pyro_mpt.diagnostics`),
are only as good as the weights' tail: when :math:`\hat k` exceeds
:math:`\min(1 - 1/\log_{10}S, 0.7)` the variance of the weights may be infinite and the
reported SE meaningless (Vehtari et al. 2024). Such sequences, and those with a small ESS,
raise a :class:`UserWarning` and set ``trustworthy=False``.

**Memory and devices.** Particles are drawn in chunks of ``chunk_size`` (by default as many
as keep the largest per-chunk tensor under ``max_elements`` elements, 2**27: about 0.5 GB in
float32, safe on a 16 GB GPU) and accumulated by a running log-sum-exp of :math:`w` and
:math:`w^2` and a running top-:math:`M` of the log-weights for :math:`\hat k`, so any number
of particles fits. All of it runs on the device of the data, without host synchronisation
between chunks; only the final diagnostics go to NumPy (and :math:`\hat k` is fitted on the
device, :func:`pyro_mpt.diagnostics.pareto_khat_from_tail`).

**Speed.** The eager chunk runs the model under Pyro's trace and is memory-bound: the
``(chunk, N, T)`` log-likelihood tensor is written and read several times. With
``compile="graph"`` a chunk (model, weights and their statistics) is captured once as an
ATen graph, checked against the eager chunk on a fresh draw, its latent matrix products
with a small inner dimension unrolled (so the ``(chunk, N, T)`` product is never stored) and
compiled by :func:`torch.compile`; the graph is kept for later calls with the same model and
arguments (re-checked each time). Measured on an H200 (float32, N = 1000, T = 784, K = 2,
S = 65536, the Bernoulli latent linear model, benchmarks/bench_importance_gpu.py): 3.5e11
particle-token evaluations per second end to end with chunks of 684 particles (2.8e11 with
the default budget), against 4.5e10 eager, 7.5e10 for a plain unfused PyTorch expression
and 3.1e10 for Pyro's ``vectorized_importance_weights``. The compiled chunk depends on the
chunk's shape only, not on the number of particles, so one compilation serves every ``S``.

References

[1] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
Sampling", Journal of Machine Learning Research 25(72):1-58, 2024.

[2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

[3] A. B. Owen, "Monte Carlo theory, methods and examples", 2013, chapter 9 (importance
sampling; the delta method for ratio estimates).
"""

import math
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .conditionals.base import ParticleScorer, particle_trace, resolve_max_elements
from .conditionals.elimination import contract_evidence
from .conditionals.enumerate import EnumerateConditionals
from .conditionals.quadrature import QuadratureConditionals
from .diagnostics import (
    effective_sample_size,
    khat_threshold,
    merge_tail,
    pareto_khat_from_tail,
    tail_size,
)
from .tokens import PARTICLE_PLATE, read_layout

__all__ = ["LMLEstimate", "METHODS", "log_marginal_likelihood"]

#: The methods of :func:`log_marginal_likelihood`.
METHODS = ("auto", "exact", "importance", "quadrature")

#: Default memory budget of one chunk of particles: elements of its largest tensor.
DEFAULT_LML_MAX_ELEMENTS = 2**27

#: Log-weights are returned (``LMLEstimate.log_weights``) when ``S * N`` is at most this.
KEEP_LOG_WEIGHTS = 2**22

#: The ESS floor is ``min(MIN_ESS, 0.01 * S)`` per sequence.
MIN_ESS = 100.0

#: Share of a sequence's quadrature mass on the grid's outer cells above which it warns.
MAX_EDGE_MASS = 1e-3

#: ``compile=None`` compiles on CUDA when the particle-token evaluations reach this.
COMPILE_MIN_EVALUATIONS = 1e12

_COMPILE_MODES = (None, False, True, "graph", "log_prob")


@dataclass
class LMLEstimate:
    r"""A reference estimate of :math:`\log p(X) = \sum_n \log p(x_n)`.

    :ivar torch.Tensor total: the estimate, subsampling scales applied (a scalar tensor).
    :ivar torch.Tensor per_sequence: ``(N,)`` :math:`\log p(x_n)`.
    :ivar float stderr: Monte Carlo standard error of ``total`` (0 for ``"exact"`` and
        ``"quadrature"``, whose error is not a sampling error).
    :ivar torch.Tensor per_sequence_stderr: ``(N,)``.
    :ivar str method: ``"exact"``, ``"importance"`` or ``"quadrature"`` (what ran).
    :ivar int num_particles: :math:`S` (grid points for quadrature; ``None`` for exact).
    :ivar torch.Tensor ess: ``(N,)`` effective sample sizes (importance), else ``None``.
    :ivar torch.Tensor khat: ``(N,)`` Pareto :math:`\hat k` (importance), else ``None``.
    :ivar float khat_threshold: ArviZ's :math:`\min(1 - 1/\log_{10}S, 0.7)` (importance).
    :ivar bool trustworthy: ``False`` when a diagnostic failed (see ``messages``).
    :ivar list messages: why the method was chosen, how it ran, what was flagged.
    :ivar torch.Tensor log_weights: ``(S, N)`` importance log-weights when
        :math:`SN \le 2^{22}`, else ``None``.
    :ivar torch.device device: where the computation ran.

    Example::

        ref = log_marginal_likelihood(ppca_collapsed, X, 2)    # X: (N, T)
        ref.total, ref.stderr, ref.per_sequence.shape          # (N,)
        ref.method, ref.trustworthy

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    total: torch.Tensor
    per_sequence: torch.Tensor
    stderr: float
    per_sequence_stderr: torch.Tensor
    method: str
    num_particles: int = None
    ess: torch.Tensor = None
    khat: torch.Tensor = None
    khat_threshold: float = None
    trustworthy: bool = True
    messages: list = field(default_factory=list)
    log_weights: torch.Tensor = None
    device: torch.device = None

    def __str__(self):
        value = float(self.total)
        line = f"log p(x) = {value:.4f}"
        if self.method == "importance":
            line += f" +- {self.stderr:.4f} (importance, S={self.num_particles}"
            if self.ess is not None:
                line += f", min ESS {float(self.ess.min()):.1f}"
            if self.khat is not None:
                line += f", max k-hat {float(self.khat.max()):.2f}"
            line += ")"
        elif self.method == "quadrature":
            line += f" (quadrature, {self.num_particles} grid points)"
        else:
            line += " (exact)"
        if not self.trustworthy:
            flagged = [m for m in self.messages if m.startswith("UNRELIABLE")]
            line += " -- NOT TRUSTWORTHY: " + ("; ".join(flagged) or "see messages")
        return line


# ----------------------------------------------------------------------------------------
# Log-densities per particle and sequence
# ----------------------------------------------------------------------------------------


def _per_sequence(lp, layout, size, name):
    """``(size, N)`` from a log-density of shape ``(size|1, *plate dims)`` (left-padded):
    summed over the token plate, if any, and broadcast over the sequences."""
    P = layout.max_plate_nesting
    if lp.dim() > P + 1:
        raise ValueError(
            f"site {name!r} has a log-density of shape {tuple(lp.shape)} with batch dims left "
            f"of the model's {P} plate dim(s); declare every batch dim with pyro.plate "
            "(or pass max_plate_nesting)"
        )
    lp = lp.reshape((1,) * (P + 1 - lp.dim()) + tuple(lp.shape))
    if layout.token_plate is not None:
        lp = lp.sum(layout.token_dim)
    try:
        lp = lp.expand(size, *layout.seq_shape)
    except RuntimeError:
        raise ValueError(
            f"site {name!r} has a log-density of shape {tuple(lp.shape)} that does not reduce "
            f"to one value per particle and sequence (sequences: {layout.seq_shape}); its "
            "batch dims must be plates of the sequences"
        ) from None
    return lp.reshape(size, layout.num_sequences)


def _site_log_prob(fn, value):
    return fn.log_prob(value)


def _masked_log_prob(site, log_prob=_site_log_prob):
    lp = log_prob(site["fn"], site["value"])
    return scale_and_mask(lp, mask=site["mask"]) if site["mask"] is not None else lp


def _log_joint(trace, layout, size, latents, log_prob=_site_log_prob):
    r"""``(size, N)``: :math:`\log p(x_n \mid z_s) + \sum_{\text{latents}} \log p(z_s)`, the
    enumerated latents summed out."""
    if layout.enumerated:
        return contract_evidence(trace, layout, PARTICLE_PLATE, size, latents)
    total = 0.0
    for info in layout.sites:
        site = trace.nodes[info.name]
        total = total + _per_sequence(_masked_log_prob(site, log_prob), layout, size, info.name)
    for name in latents:
        site = trace.nodes[name]
        total = total + _per_sequence(_masked_log_prob(site), layout, size, name)
    return total


def _guide_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _log_q(guide_trace, layout, size):
    total = 0.0
    for name, site in _guide_sites(guide_trace).items():
        total = total + _per_sequence(_masked_log_prob(site), layout, size, name)
    return total


def _is_point_mass(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, pyro.distributions.Delta)


def _check_guide(guide, args, kwargs, layout, continuous):
    """Traces the guide once (this also sets up an AutoGuide's prototype outside the
    particle plate) and checks that it proposes the model's continuous latents, one
    proposal per sequence."""
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = _guide_sites(trace)
    proposed = {n for n, s in sites.items() if not s["infer"].get("is_auxiliary")}
    missing = [n for n in continuous if n not in proposed]
    extra = sorted(proposed - set(continuous))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"it does not sample the model's latent site(s) {missing}")
        if extra:
            enumerated = [n for n in extra if n in layout.enumerated]
            note = (
                f" ({enumerated} are enumerated in the model and summed out exactly: the guide "
                "must not sample them)"
                if enumerated
                else ""
            )
            parts.append(f"it samples site(s) {extra} that are not latent in the model{note}")
        raise ValueError(
            "the guide does not match the model: "
            + "; ".join(parts)
            + f". The model's continuous latent sites are {continuous}; the guide must sample "
            "exactly those (e.g. pyro.infer.autoguide.AutoNormal(model))"
        )
    seq_plates = {
        f.name
        for s in layout.sites
        for f in s.frames
        if f.name != layout.token_plate and f.size > 1
    }
    auxiliary = any(s["infer"].get("is_auxiliary") for s in sites.values())
    for name, site in sites.items():
        frames = {f.name for f in site["cond_indep_stack"] if f.vectorized}
        outside = sorted(seq_plates - frames)
        if outside:
            raise ValueError(
                f"guide site {name!r} is not inside the sequence plate(s) {outside}: one "
                "proposal shared by all sequences does not factorise over them, so "
                "per-sequence importance sampling cannot use it (AutoMultivariateNormal, "
                "AutoDiagonalNormal and other AutoContinuous guides sample one global vector); "
                "use a guide with the model's plates, e.g. AutoNormal"
            )
        # A Delta is a proposal only as the image of an auxiliary draw (AutoNormal's
        # Delta(value, log_density) after its "_unconstrained" site), not on its own.
        if not auxiliary and _is_point_mass(site["fn"]):
            raise ValueError(
                f"guide site {name!r} is a point mass ({type(site['fn']).__name__}): it has no "
                "density to weigh draws by, so it cannot be an importance proposal (AutoDelta "
                "fits a MAP point); use e.g. AutoNormal"
            )


# ----------------------------------------------------------------------------------------
# Particle samplers: one chunk of draws -> (size, N) log-weights
# ----------------------------------------------------------------------------------------


class _Sampler:
    """Draws ``size`` particles and returns their log-weights ``(size, N)``.

    ``kind`` is ``"prior"``, ``"guide"`` or ``"grid"``; ``inputs(start, size)`` are the
    tensors a chunk depends on (the grid rows), passed to ``__call__`` after ``size``.
    """

    def __init__(self, model, args, kwargs, layout, kind, latents=(), guide=None, grid=None):
        self.model, self.args, self.kwargs = model, tuple(args), dict(kwargs)
        self.layout, self.kind = layout, kind
        self.latents = list(latents)  # continuous latents whose log p(z) enters the weight
        self.guide, self.grid, self.names = guide, grid, None
        self.site_log_prob = _site_log_prob

    def inputs(self, start, size):
        if self.grid is None:
            return ()
        return (self.grid[start : start + size],)

    def __call__(self, size, *inputs, log_prob=None):
        layout, P = self.layout, self.layout.max_plate_nesting
        log_prob = log_prob or _site_log_prob
        if self.kind == "prior":
            tr = particle_trace(self.model, self.args, self.kwargs, layout, num_particles=size)
            return _log_joint(tr, layout, size, [], log_prob)
        if self.kind == "grid":
            (grid,) = inputs
            values, offset = {}, 0
            for name, (k, event) in self.names.items():
                values[name] = grid[:, offset : offset + k].reshape(size, *event)
                offset += k
            tr = particle_trace(
                self.model, self.args, self.kwargs, layout, num_particles=size, values=values
            )
            return _log_joint(tr, layout, size, self.latents, log_prob)
        guide = self.guide

        def particle_guide(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, size, dim=-P - 1):
                return guide(*args, **kwargs)

        gtr = poutine.trace(particle_guide).get_trace(*self.args, **self.kwargs)
        model = poutine.replay(self.model, trace=gtr)
        tr = particle_trace(model, self.args, self.kwargs, layout, num_particles=size)
        return _log_joint(tr, layout, size, self.latents, log_prob) - _log_q(gtr, layout, size)


_COMPILED_LOG_PROB = None


def _compiled_log_prob():
    global _COMPILED_LOG_PROB
    if _COMPILED_LOG_PROB is None:
        _COMPILED_LOG_PROB = torch.compile(_site_log_prob, dynamic=False, fullgraph=True)
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


#: Matrix products with an inner dimension up to this are unrolled in captured graphs.
SMALL_MATMUL = 8


def _unroll_small_matmuls(gm):
    """Rewrites ``mm`` / ``bmm`` with a small inner dimension ``K`` (a latent dimension,
    e.g. ``z @ W.T`` with ``K = 2``) as a broadcast product summed over ``K``. The same
    function; but where cuBLAS writes the ``(S, N, T)`` product to memory, the compiler
    unrolls the ``K``-sum (``unroll_reductions_threshold``) and fuses it into the
    log-likelihood reduction that reads it, so the big tensor is never stored."""
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


def _build_chunk_fn(sampler, size, mode, device, messages):
    """The function that evaluates a full chunk of ``size`` particles: eager, or compiled.

    ``"log_prob"``: the observed sites' log-densities (the big ``(size, N, T)`` reduction)
    run under :func:`torch.compile`, fused into one pass. ``"graph"``: the whole chunk,
    model included, is captured by :func:`torch.fx.experimental.proxy_tensor.make_fx`
    (like :func:`torch.jit.trace`, shapes and Python control flow fixed) and compiled by
    :func:`torch.compile`; the capture is first checked against the eager code on a fresh
    draw with the same random seed, so control flow that depends on the draws is caught.
    Any failure falls back to eager evaluation, with a message.
    """

    def eager(*inputs):
        return _chunk_stats(sampler(size, *inputs))

    if mode is False:
        return eager
    inputs = sampler.inputs(0, size)
    try:
        with warnings.catch_warnings():
            # torch's compiler stack imports deprecated torch.jit APIs: not the caller's concern
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\b")
            return _compile_chunk_fn(sampler, size, mode, device, messages, eager, inputs)
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so
        messages.append(
            f"compile={mode!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "ran eagerly instead"
        )
        return eager


#: Compiled chunk graphs of recent calls (``compile="graph"``), re-checked at every use.
_GRAPH_CACHE = OrderedDict()
_GRAPH_CACHE_SIZE = 4


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


def _reproduces(fn, eager, inputs, device):
    """Whether ``fn`` and the eager chunk agree on one fresh draw with the same seed."""
    seed = int(torch.randint(0, 2**62, ()).item())
    with _fork_rng(device):
        torch.manual_seed(seed)
        a = fn(*inputs)
        torch.manual_seed(seed)
        b = eager(*inputs)
    return _close(a, b)


def _compile_chunk_fn(sampler, size, mode, device, messages, eager, inputs):
    """Compiles the chunk function (see :func:`_build_chunk_fn`); raises on failure.

    The compiled code draws its random numbers as the eager code does (inductor's
    ``fallback_random``), so every compiled chunk function is checked against the eager
    chunk on one fresh draw with the same seed before it is used. A captured graph holds
    the model's tensors by reference; it is reused by a later call with the same model,
    arguments and chunk shape only after passing that check again (a parameter or argument
    rebound to another tensor, or a recycled ``id``, fail it and the chunk is captured
    anew)."""
    if mode == "log_prob":
        log_prob = _compiled_log_prob()

        def fused(*inputs):
            return _chunk_stats(sampler(size, *inputs, log_prob=log_prob))

        if not _reproduces(fused, eager, inputs, device):
            raise RuntimeError("the compiled log-densities differ from the eager ones")
        messages.append(
            "compile='log_prob': the observed sites' log-densities of each chunk ran "
            "fused by torch.compile"
        )
        return fused
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
    unrolled = _unroll_small_matmuls(gm)
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


def _progress_bar(num_chunks, progress, desc):
    from tqdm.auto import tqdm

    if progress is None:
        disable = num_chunks <= 1 or not sys.stderr.isatty()
    else:
        disable = not progress
    return tqdm(total=num_chunks, desc=desc, unit="chunk", disable=disable, leave=False)


def _chunk_stats(lw):
    r"""What the stream keeps of one chunk's ``(size, N)`` log-weights: the weights, their
    log-sum-exp, that of their squares and their minimum. (The running top-``M`` for
    :math:`\hat k` is taken outside: its size depends on the number of particles, and the
    compiled chunk must not, or every new particle count would compile anew.)"""
    return lw, torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0), lw.amin(0)


def _run_chunks(
    sampler,
    num_particles,
    chunk_size,
    compile_mode,
    progress,
    *,
    keep,
    tail_k,
    edge=None,
    desc="log p(x)",
    messages,
):
    """Streams the chunks: running log-sum-exp of w and w^2, the running minimum, the kept
    log-weights, a running top-``tail_k``, and (quadrature) the log-mass on the grid's edge.
    The per-chunk sums and minimum are part of the chunk function, so a compiled chunk
    computes them fused; the top-``tail_k`` is taken outside it (it depends on ``S``, the
    compiled chunk only on the chunk's shape). What is merged across chunks is ``(N,)`` or
    ``(tail_k, N)``."""
    layout = sampler.layout
    S = num_particles
    num_chunks = -(-S // chunk_size)
    fast = None
    lse1 = lse2 = lse_edge = tail = low = None
    kept = []
    with _progress_bar(num_chunks, progress, desc) as bar:
        for i in range(num_chunks):
            start = i * chunk_size
            size = min(chunk_size, S - start)
            inputs = sampler.inputs(start, size)
            if size == chunk_size and compile_mode is not False and num_chunks > 1:
                if fast is None:
                    fast = _build_chunk_fn(sampler, size, compile_mode, layout.device, messages)
                lw, a, b, c = fast(*inputs)
            else:
                lw, a, b, c = _chunk_stats(sampler(size, *inputs))
            if lse1 is None:
                lse1, lse2, low = a, b, c
                lse_edge = torch.full_like(a, -math.inf)
            else:
                lse1, lse2 = torch.logaddexp(lse1, a), torch.logaddexp(lse2, b)
                low = torch.minimum(low, c)
            if edge is not None:
                e = edge[start : start + size].unsqueeze(-1)
                lse_edge = torch.logaddexp(
                    lse_edge, torch.logsumexp(torch.where(e, lw, -math.inf), 0)
                )
            if keep:
                kept.append(lw)
            if tail_k:
                top = torch.topk(lw, min(tail_k, size), dim=0).values
                tail = top if tail is None else merge_tail(tail, top, tail_k)
            bar.update()
    log_weights = torch.cat(kept, 0) if keep else None
    return lse1, lse2, log_weights, tail, lse_edge, low


# ----------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------


def _check_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _per_particle_cost(model, args, kwargs, layout, trace):
    """Elements of the largest tensor of one particle (all sequences, enumerated)."""
    if layout.enumerated:
        trace = particle_trace(model, args, kwargs, layout)
    cost = 1
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn, value = site["fn"], site["value"]
        vshape = tuple(value.shape) if torch.is_tensor(value) else ()
        shape = torch.broadcast_shapes(tuple(fn.batch_shape) + tuple(fn.event_shape), vshape)
        # a site's log-density per token: (batch, tokens); Gaussian events are T x T at most
        n = math.prod(shape)
        cost = max(cost, n)
    return cost


def _exact(model, args, kwargs, layout, trace, continuous, max_elements, messages):
    if continuous:
        discrete = [n for n in continuous if trace.nodes[n]["fn"].support.is_discrete]
        hint = (
            f" The discrete site(s) {discrete} can be summed out exactly: mark them "
            "infer={'enumerate': 'parallel'}."
            if discrete
            else ""
        )
        raise ValueError(
            f"method='exact' cannot integrate the latent site(s) {continuous}: it covers "
            "observed sites without latents (Gaussians included) and discrete latents marked "
            "infer={'enumerate': 'parallel'}." + hint + " Use method='importance' (any model; "
            "pass a trained guide for a better proposal) or method='quadrature' (latent "
            "dimension <= 3 per sequence), or integrate the latent out in the model (as "
            "pyro_mpt.models.ppca_collapsed does)"
        )
    N, T = layout.num_sequences, layout.num_tokens
    if not layout.latents:
        per_seq = 0.0
        for info in layout.sites:
            lp = _masked_log_prob(trace.nodes[info.name])
            per_seq = per_seq + _per_sequence(lp, layout, 1, info.name)[0]
        messages.append("exact: the model's log-density (no latent sites)")
        return per_seq
    budget = resolve_max_elements(max_elements, layout.device)
    scorer = EnumerateConditionals(budget).scorer(model, args, kwargs, layout, trace)
    device = layout.device
    observed = torch.ones(1, N, T, dtype=torch.bool, device=device)
    if isinstance(scorer, ParticleScorer):
        messages.append(
            f"exact: enumeration of the joint support of {layout.enumerated} "
            f"({scorer.num_particles} configurations)"
        )
        return scorer.log_evidence(observed)[0]
    messages.append(f"exact: variable elimination over the enumerated sites {layout.enumerated}")
    return scorer.log_evidence(observed)[0]


def _quadrature_grid(dims, points, bounds, dtype, device):
    G, (low, high) = points, bounds
    width = (high - low) / G
    axis = low + width * (0.5 + torch.arange(G, dtype=dtype, device=device))
    d = sum(k for k, _ in dims.values())
    index = torch.stack(
        torch.meshgrid(*([torch.arange(G, device=device)] * d), indexing="ij"), -1
    ).reshape(-1, d)
    grid = axis[index]
    edge = ((index == 0) | (index == G - 1)).any(-1)
    return grid, edge, d * math.log(width)


def log_marginal_likelihood(
    model,
    *args,
    method="auto",
    num_particles=4096,
    guide=None,
    chunk_size=None,
    token_plate=None,
    max_plate_nesting=float("inf"),
    quadrature_points=20,
    quadrature_bounds=(-5.0, 5.0),
    max_elements=None,
    progress=None,
    compile=None,
    **kwargs,
):
    r"""A reference :math:`\log p(X) = \sum_n \log p(x_n)` of a Pyro model and its data, per
    sequence, with its Monte Carlo standard error and, for importance sampling, the effective
    sample size and Pareto :math:`\hat k` of each sequence's weights (see the module
    docstring for the estimators and their error).

    Example::

        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro_mpt.evaluation import log_marginal_likelihood

        ref = log_marginal_likelihood(model, X)                   # exact, or prior IS
        guide = AutoNormal(model)                                 # a better proposal
        ...  # train guide with SVI(model, guide, optim, Trace_ELBO())
        ref = log_marginal_likelihood(model, X, guide=guide, num_particles=100_000)
        print(ref)            # says NOT TRUSTWORTHY when k-hat or the ESS fail

    The estimate is a reference, not an objective: importance and quadrature run under
    :func:`torch.no_grad` (``"exact"`` stays differentiable). Distribution argument
    validation runs on the first trace of the model only, not on every chunk.

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it (so they must
        not use the keyword names below).
    :param str method: ``"auto"`` (default: exact where possible, else importance),
        ``"exact"``, ``"importance"`` or ``"quadrature"``.
    :param int num_particles: :math:`S`, draws per sequence for importance sampling.
    :param guide: a proposal for ``"importance"`` (e.g. an
        :class:`~pyro.infer.autoguide.AutoNormal` trained by SVI) sampling exactly the
        model's continuous latent sites, inside the sequence plates; the prior if ``None``.
    :param int chunk_size: particles per chunk; by default as many as ``max_elements``
        allows.
    :param str token_plate: mask along this plate (see :func:`pyro_mpt.tokens.read_layout`):
        its elements are the tokens of one sequence; needed when a global latent couples
        the data points.
    :param int max_plate_nesting: the model's plate depth; found by tracing if omitted.
    :param int quadrature_points: :math:`G`, grid points per latent dimension.
    :param tuple quadrature_bounds: ``(low, high)`` of every grid axis.
    :param int max_elements: memory budget of one chunk, in elements of its largest
        tensor (default :data:`DEFAULT_LML_MAX_ELEMENTS` = 2**27; for ``"exact"`` the
        budget of the enumeration, default 2**24).
    :param bool progress: a tqdm bar over the chunks; by default shown when there is more
        than one chunk and stderr is a terminal.
    :param compile: ``None`` (default: ``"graph"`` on CUDA when :math:`S N T \ge 10^{12}`,
        else off), ``False``, ``True`` or ``"graph"`` (capture each chunk, model included,
        and compile it; the first call compiles for some seconds, later calls with the same
        model and arguments reuse the graph), or ``"log_prob"`` (compile the observed
        sites' log-densities only). The capture fixes shapes and Python control flow, like
        :func:`torch.jit.trace`; each compiled chunk function is checked against the eager
        one on a fresh draw with the same seed before use, and any failure falls back to
        eager evaluation with a message.
    :returns: an :class:`LMLEstimate`.
    :raises ValueError: for an unknown ``method``, bad sizes, a model ``"exact"`` or
        ``"quadrature"`` cannot handle, or a guide that does not match the model.
    :warns UserWarning: when importance sampling is unreliable for some sequence
        (:math:`\hat k` above the threshold, or a small ESS) or a quadrature grid cuts
        off posterior mass.

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {list(METHODS)}")
    _check_int("num_particles", num_particles)
    _check_int("chunk_size", chunk_size, allow_none=True)
    _check_int("max_elements", max_elements, allow_none=True)
    _check_int("quadrature_points", quadrature_points)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    if compile not in _COMPILE_MODES:
        raise ValueError(
            f"unknown compile={compile!r}; valid values are None, False, True, 'graph', 'log_prob'"
        )

    trace = poutine.trace(model).get_trace(*args, **kwargs)
    layout = read_layout(trace, token_plate=token_plate, max_plate_nesting=max_plate_nesting)
    continuous = [n for n in layout.latents if n not in layout.enumerated]
    messages = []
    if method == "auto":
        if continuous:
            method = "importance"
            messages.append(
                f"method='auto' chose 'importance': the latent site(s) {continuous} are not "
                "enumerated, so no exact value is available"
            )
        else:
            method = "exact"
            why = (
                "the model has no latent sites"
                if not layout.latents
                else f"every latent site ({layout.enumerated}) is enumerated"
            )
            messages.append(f"method='auto' chose 'exact': {why}")
    if guide is not None and method != "importance":
        messages.append(f"guide ignored: method={method!r} does not sample from a proposal")

    N, dtype, device = layout.num_sequences, layout.dtype, layout.device
    scale = layout.scale
    if method == "exact":
        per_seq = _exact(model, args, kwargs, layout, trace, continuous, max_elements, messages)
        return LMLEstimate(
            total=(scale * per_seq).sum(),
            per_sequence=per_seq,
            stderr=0.0,
            per_sequence_stderr=torch.zeros_like(per_seq),
            method="exact",
            messages=messages,
            device=device,
        )

    budget = max_elements or DEFAULT_LML_MAX_ELEMENTS
    grid = edge = None
    if method == "quadrature":
        quad = QuadratureConditionals(quadrature_points, quadrature_bounds)
        sizes = quad.check(layout, trace)  # raises for d > 3, no or non-enumerated discrete
        dims = {n: (k, tuple(trace.nodes[n]["fn"].event_shape)) for n, k in sizes.items()}
        grid, edge, log_norm = _quadrature_grid(dims, quad.num_points, quad.bounds, dtype, device)
        S = grid.shape[0]
        sampler = _Sampler(model, args, kwargs, layout, "grid", latents=list(dims), grid=grid)
        sampler.names = dims
        messages.append(
            f"quadrature: a midpoint grid of {quad.num_points}^{grid.shape[1]} = {S} points on "
            f"{list(quad.bounds)} per axis over {list(dims)}; its error is not estimated "
            "(compare with more points or wider bounds)"
        )
    else:
        S = num_particles
        log_norm = -math.log(S)
        if guide is None:
            sampler = _Sampler(model, args, kwargs, layout, "prior")
            proposal = "the prior"
        else:
            _check_guide(guide, args, kwargs, layout, continuous)
            sampler = _Sampler(model, args, kwargs, layout, "guide", continuous, guide=guide)
            proposal = f"the guide {type(guide).__name__}"
        if not continuous:
            messages.append(
                "importance: the model has no continuous latents, so every weight is exact "
                "(use method='exact')"
            )

    cost = _per_particle_cost(model, args, kwargs, layout, trace)
    if chunk_size is None:
        chunk_size = max(1, min(S, budget // cost))
    chunk_size = min(chunk_size, S)
    num_chunks = -(-S // chunk_size)
    mode = compile
    if mode is None:
        evaluations = S * N * layout.num_tokens
        big = (
            device is not None and device.type == "cuda" and evaluations >= COMPILE_MIN_EVALUATIONS
        )
        mode = "graph" if big else False
    elif mode is True:
        mode = "graph"
    keep = method == "importance" and S * N <= KEEP_LOG_WEIGHTS
    tail_k = tail_size(S) + 1 if method == "importance" else 0

    with torch.no_grad(), pyro.validation_enabled(False):
        lse1, lse2, log_weights, tail, lse_edge, low = _run_chunks(
            sampler,
            S,
            chunk_size,
            mode,
            progress,
            keep=keep,
            tail_k=tail_k,
            edge=edge,
            desc=f"log p(x) {method}",
            messages=messages,
        )
    per_seq = lse1 + log_norm
    total = (scale * per_seq).sum()
    trustworthy = True
    nonfinite = ~torch.isfinite(per_seq)

    if method == "quadrature":
        edge_mass = torch.exp(lse_edge - lse1)
        bad = edge_mass > MAX_EDGE_MASS
        n_bad = int(bad.sum())
        if n_bad:
            trustworthy = False
            worst = float(edge_mass.max())
            msg = (
                f"UNRELIABLE: {n_bad} of {N} sequences put more than {MAX_EDGE_MASS:g} of their "
                f"posterior mass on the outer cells of the quadrature grid (up to {worst:.3g}): "
                "widen quadrature_bounds"
            )
            messages.append(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
        trustworthy = _flag_nonfinite(nonfinite, N, messages) and trustworthy
        return LMLEstimate(
            total=total,
            per_sequence=per_seq,
            stderr=0.0,
            per_sequence_stderr=torch.zeros_like(per_seq),
            method="quadrature",
            num_particles=S,
            trustworthy=trustworthy,
            messages=messages,
            device=device,
        )

    messages.insert(
        0 if not messages or not messages[0].startswith("method=") else 1,
        f"importance: {S} draws per sequence from {proposal} in {num_chunks} chunk(s) of up to "
        f"{chunk_size}; log p(x_n) = logmeanexp_s [log p(x_n, z_s) - log q(z_s)], delta-method "
        "standard errors (the estimate is biased down by about SE^2/2)",
    )
    ess = effective_sample_size(log_weights, 0) if keep else torch.exp(2 * lse1 - lse2)
    # PSIS k-hat from the M + 1 largest log-weights: the fit ArviZ's psislw makes from all
    # of them, batched over sequences on the device (diagnostics.pareto_khat_from_tail)
    khat = pareto_khat_from_tail(tail, S, dim=0)
    constant = torch.isfinite(low) & (low == tail.amax(0))  # bounded weights: exact
    khat = torch.where(constant, -math.inf, khat)
    messages.append(
        f"Pareto k-hat from the {tail_k - 1} largest weights per sequence (a running top-k; "
        "the same generalized Pareto fit ArviZ's psislw makes from all the weights)"
    )
    if S > 1:
        rel = (S / ess - 1).clamp(min=0) / (S - 1)
        se = rel.sqrt()
    else:
        se = torch.full_like(per_seq, math.nan)
    stderr = float(((scale * se) ** 2).sum().sqrt())
    threshold = khat_threshold(S)
    floor = min(MIN_ESS, 0.01 * S)
    bad_k = khat > threshold
    bad_ess = ess < floor
    bad = (bad_k | bad_ess) & ~nonfinite
    n_bad = int(bad.sum())
    if n_bad:
        trustworthy = False
        worst_k = float(khat[bad].max())
        min_ess = float(ess[bad].min())
        msg = (
            f"UNRELIABLE: importance sampling failed its diagnostics for {n_bad} of {N} "
            f"sequences: Pareto k-hat up to {worst_k:.2f} (threshold {threshold:.2f}, "
            f"{int(bad_k.sum())} above), ESS down to {min_ess:.1f} (floor {floor:g}, "
            f"{int(bad_ess.sum())} below); the estimate and its standard error may be far off: "
            "use a better proposal (a guide trained by SVI, e.g. AutoNormal) or more particles"
        )
        messages.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    trustworthy = _flag_nonfinite(nonfinite, N, messages) and trustworthy
    return LMLEstimate(
        total=total,
        per_sequence=per_seq,
        stderr=stderr,
        per_sequence_stderr=se,
        method="importance",
        num_particles=S,
        ess=ess,
        khat=khat,
        khat_threshold=threshold,
        trustworthy=trustworthy,
        messages=messages,
        log_weights=log_weights,
        device=device,
    )


def _flag_nonfinite(nonfinite, N, messages):
    n = int(nonfinite.sum())
    if not n:
        return True
    msg = (
        f"UNRELIABLE: {n} of {N} sequences have a non-finite estimate (every weight zero or "
        "NaN): the proposal or grid misses where the data put the latents"
    )
    messages.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)
    return False
