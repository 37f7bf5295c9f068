r"""Particles in chunks under the memory budget ``max_elements`` (issue 11).

A :class:`~pyro_mpt.conditionals.particles.ParticleScorer` keeps its kernels' ``(S, N, T)``
tables whole. When they do not fit the budget, the particles (prior draws, grid points)
are cut into chunks :math:`c` of at most ``chunk`` particles each, and every call to the
scorer runs the model on one chunk at a time, merging the chunks by a streaming
log-sum-exp, which is exact:

.. math::
    \operatorname{LSE}_{s=1}^{S} v_s = \operatorname{LSE}_c \operatorname{LSE}_{s \in c} v_s,
    \qquad
    \log p(x_j \mid x_O) = \operatorname{LSE}_c \operatorname{LSE}_{s\in c}\big(a_s
    + \log p(x_j \mid x_O, z_s)\big) - \operatorname{LSE}_c \operatorname{LSE}_{s\in c} a_s,

:math:`a_s = \log w^0_s + \log p(x_O \mid z_s)`. Only a chunk's kernels (``(chunk, N, T)``)
and ``(R, N, T)`` running sums are alive at once; the draws themselves (the latents' values,
``(S, N, d)``, and the log-weights ``(S, N)``) are kept so that every chunk is the same set
of particles at every call (the model is replayed on them). The loop is over chunks only.

The model runs on all ``N`` sequences at once (a Pyro model cannot in general be run on a
subset of its data plate), so one particle over every sequence must fit: a budget below
:data:`CHUNK_FACTOR` times the largest site tensor of one particle is refused, before
anything is allocated, with a ``ValueError`` naming ``max_elements``.

Under autograd (``MaskedELBO`` training) every chunk's graph is kept until the backward
pass, so the budget bounds each chunk, not the whole step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pyro.poutine.util import site_is_subsample

from ..progress import logger
from .base import Scorer
from .chunked_orders import chunked_suffix_scores
from .kernels import FactorizedKernel
from .particles import ParticleScorer

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = [
    "CHUNK_FACTOR",
    "ChunkedParticleScorer",
    "chunked_particle_scorer",
    "particle_chunk_size",
    "particle_elements",
]

#: Tensor elements a chunk needs per element of its largest site tensor: the model's own
#: temporaries (a location, the log-density and its intermediates), the kernel's table and a
#: mask row over it (measured about 5-7 on PPCA with explicit latents).
CHUNK_FACTOR = 8


def particle_elements(trace, layout: TokenLayout, trace_enumerated: bool = False) -> int:
    """Elements of the largest site tensor of ONE particle over every sequence, times the
    joint support of the enumerated latents (enumerated jointly with the particles).

    :param trace: a plain trace of the model (one particle, nothing enumerated).
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param bool trace_enumerated: the trace already enumerates (its enumerated sites'
        values carry their support), so the support is not multiplied in again."""
    largest, support = 1, 1
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn, value = site["fn"], site["value"]
        vshape = tuple(value.shape) if torch.is_tensor(value) else ()
        shape = torch.broadcast_shapes(tuple(fn.batch_shape) + tuple(fn.event_shape), vshape)
        largest = max(largest, math.prod(shape))
        if name in layout.enumerated and not trace_enumerated:
            support *= int(fn.enumerate_support(expand=False).shape[0])
    return largest * support


def particle_chunk_size(num_particles: int, elements: int, budget: int, backend: str) -> int:
    r"""Particles per chunk: the most with ``CHUNK_FACTOR * elements * chunk <= budget``,
    at most ``num_particles``.

    :param int elements: :func:`particle_elements` of the model.
    :param int budget: ``max_elements``, resolved.
    :param str backend: the backend's name, for the message.
    :raises ValueError: naming ``max_elements`` when not even one particle fits."""
    need = CHUNK_FACTOR * elements
    if need > budget:
        raise ValueError(
            f"max_elements={budget} is too small for conditionals={backend!r}: one particle "
            f"over all {elements} elements of the model's largest site (every sequence at "
            f"once) needs about {need} elements ({CHUNK_FACTOR} x {elements}); pass "
            f"max_elements >= {need}, or score fewer sequences per call (a subsample of the "
            "data plate)"
        )
    chunk = min(num_particles, budget // need)
    logger.debug(
        "pyro_mpt: conditionals %r: %d particle(s) in chunks of %d (%d elements per "
        "particle, max_elements=%d)",
        backend,
        num_particles,
        chunk,
        elements,
        budget,
    )
    return chunk


@dataclass
class _Chunk:
    """One chunk: its rows ``[start, stop)`` of the flattened particles of ``log_w0`` and
    ``kernels()``, which runs the model on the chunk's particles and returns its kernels."""

    start: int
    stop: int
    kernels: Callable[[], list]


def _mix_terms(kernels, log_w0, observed, scored, need_cond=True):
    r"""``(num, den)``: :math:`\operatorname{LSE}_s(a_s + \log p(x_t \mid x_O, z_s))`
    ``(R, N, T)`` (``None`` unless ``need_cond``) and :math:`\operatorname{LSE}_s a_s`
    ``(R, N)`` over the particles of ``log_w0`` (``(S_c, N)``), as in
    :meth:`ParticleScorer.__call__ <pyro_mpt.conditionals.particles.ParticleScorer.__call__>`."""
    marginals, conds = [], []
    for sl, kernel in kernels:
        marginal, cond = kernel(observed[..., sl], scored[..., sl], True)
        marginals.append(marginal)
        conds.append(cond)
    a = log_w0 + sum(marginals)  # (R, S_c, N)
    den = torch.logsumexp(a, dim=1)
    if not need_cond:
        return None, den
    if len(conds) > 1:  # sites differ in token count: broadcast all but the token dim
        lead = torch.broadcast_shapes(*(c.shape[:-1] for c in conds))
        cond = torch.cat([c.expand(*lead, c.shape[-1]) for c in conds], -1)
    else:
        cond = conds[0]
    return torch.logsumexp(a.unsqueeze(-1) + cond, dim=1), den


def _merge(total, part):
    return part if total is None else torch.logaddexp(total, part)


class ChunkedParticleScorer(Scorer):
    r"""A :class:`~pyro_mpt.conditionals.particles.ParticleScorer` whose particles are
    scored a chunk at a time (the module docstring): same conditionals, same evidence,
    up to rounding (the log-sum-exp is taken per chunk, then across chunks).

    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param log_w0: ``(S, N)`` the log-weights of all (flattened) particles.
    :param chunks: the :class:`_Chunk` list, covering the rows of ``log_w0`` in order.
    :param int row_cost: elements one mask row needs with one chunk's kernels.
    :param bool scores_orders: every kernel is factorized, so the nested masks of an order
        are scored at once (:mod:`~pyro_mpt.conditionals.chunked_orders`); else row by row.
    """

    telescopes = True

    def __init__(
        self,
        layout: TokenLayout,
        log_w0: torch.Tensor,
        chunks: list,
        row_cost: int,
        scores_orders: bool = False,
    ):
        self.layout = layout
        self.log_w0 = log_w0  # (S, N); replaced by particle_error's reweightings
        self.chunks = chunks
        self._row_cost = row_cost
        self.scores_orders = scores_orders

    @property
    def num_particles(self) -> int:
        """``S``, all particles of all chunks."""
        return self.log_w0.shape[0]

    def suffix_scores(self, ranks: torch.Tensor, max_elements: int) -> torch.Tensor | None:
        """``(D, N, T)`` suffix sums of the orders ``ranks``
        (:func:`~pyro_mpt.conditionals.chunked_orders.chunked_suffix_scores`), or ``None``
        (then the engine scores rows)."""
        if not self.scores_orders:
            return None
        return chunked_suffix_scores(self, ranks, max_elements)

    def row_cost(self, shared: bool = False) -> int:
        # a chunk's row, plus the running sums (R, N, T) and their merge
        return self._row_cost + 3 * self.layout.num_sequences * self.layout.num_tokens

    def _stream(self, observed, scored, need_cond):
        num = den = None
        for chunk in self.chunks:
            part_num, part_den = _mix_terms(
                chunk.kernels(), self.log_w0[chunk.start : chunk.stop], observed, scored, need_cond
            )
            num = num if part_num is None else _merge(num, part_num)
            den = _merge(den, part_den)
        return num, den

    def particle_log_weights(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(R, S, N)``: :math:`a_s = \log w^0_s + \log p(x_O \mid z_s)` of every
        particle, chunk by chunk (``S N`` per row, small beside the kernels)."""
        none = torch.zeros_like(observed)
        out = []
        for chunk in self.chunks:
            a = self.log_w0[chunk.start : chunk.stop]
            for sl, kernel in chunk.kernels():
                a = a + kernel(observed[..., sl], none[..., sl], True)[0]
            out.append(a)
        return torch.cat(out, 1)

    def log_evidence(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(R, N)``: :math:`\operatorname{LSE}_s a_s`, streamed over the chunks."""
        return self._stream(observed, torch.zeros_like(observed), False)[1]

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        num, den = self._stream(observed, scored, True)
        out = num - den.unsqueeze(-1)
        return torch.where(scored, out, out.new_zeros(()))


def chunked_particle_scorer(
    layout: TokenLayout,
    num_particles: int,
    chunk: int,
    draw: Callable[[int, int], tuple[ParticleScorer, Callable[[], list]]],
) -> Scorer:
    """The scorer of ``num_particles`` particles drawn ``chunk`` at a time.

    :param int chunk: particles per chunk (:func:`particle_chunk_size`).
    :param draw: ``draw(start, size)`` runs the model on particles ``start .. start +
        size`` and returns their :class:`~pyro_mpt.conditionals.particles.ParticleScorer`
        and a function that runs the model again on the same particles and returns the
        kernels.
    :returns: the chunk's ``ParticleScorer`` itself when one chunk holds every particle
        (exactly the unchunked path), else a :class:`ChunkedParticleScorer` (each chunk's
        kernels dropped once its log-weights and row cost are known)."""
    if chunk >= num_particles:
        return draw(0, num_particles)[0]
    log_w0, chunks, row_cost, factorized = [], [], 0, True
    offset = 0
    for start in range(0, num_particles, chunk):
        scorer, kernels = draw(start, min(chunk, num_particles - start))
        size = scorer.log_w0.shape[0]  # flattened: the enumerated support included
        log_w0.append(scorer.log_w0)
        chunks.append(_Chunk(offset, offset + size, kernels))
        row_cost = max(row_cost, scorer.row_cost())
        factorized = factorized and all(isinstance(k, FactorizedKernel) for _, k in scorer.kernels)
        offset += size
        del scorer  # its (chunk, N, T) tables: only one chunk's at a time
    return ChunkedParticleScorer(layout, torch.cat(log_w0), chunks, row_cost, factorized)
