r"""Streaming over particles: any number of draws in chunks of bounded memory.

Particles are drawn in chunks of ``chunk_size`` (by default as many as keep
:data:`REFERENCE_CHUNK_FACTOR` times the largest per-chunk tensor under the memory budget,
:func:`pyro_mpt.options.resolve_max_elements`; a budget below one particle is refused)
and accumulated by a running log-sum-exp of :math:`w` and :math:`w^2`, a running minimum,
a running top-:math:`M` of the log-weights for :math:`\hat k`
(:func:`pyro_mpt.diagnostics.merge_tail`) and, on a grid, the running log-mass of the
grid's outer cells. All of it stays on the device of the data, without host
synchronisation between chunks. The per-chunk sums and minimum are part of the chunk
function (:mod:`pyro_mpt.reference.compile`), so a compiled chunk computes them fused; the
top-:math:`M` is taken outside it (it depends on :math:`S`, the compiled chunk only on the
chunk's shape). What is merged across chunks is ``(N,)`` or ``(M + 1, N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch

from ..diagnostics import merge_tail
from ..options import resolve_max_elements
from ..progress import logger, progress_bar
from .compile import build_chunk_fn, chunk_stats, resolve_compile_mode
from .sampler import per_particle_cost

__all__ = ["REFERENCE_CHUNK_FACTOR", "StreamStats", "plan_chunks", "run_chunks", "stream"]

#: Elements a chunk is budgeted per element of its largest per-particle tensor, so that
#: the chunk's peak (measured about 6 such tensors on PPCA) stays within about 2x
#: ``max_elements`` (issue 11).
REFERENCE_CHUNK_FACTOR = 4


@dataclass
class StreamStats:
    r"""What a stream of ``(size, N)`` log-weights :math:`\log w` leaves, per sequence.

    :ivar lse1: ``(N,)`` :math:`\log \sum_s w_s`.
    :ivar lse2: ``(N,)`` :math:`\log \sum_s w_s^2`.
    :ivar low: ``(N,)`` :math:`\min_s \log w_s`.
    :ivar log_weights: ``(S, N)`` all log-weights when kept, else ``None``.
    :ivar tail: ``(tail_k, N)`` the largest log-weights (unordered), or ``None``.
    :ivar lse_edge: ``(N,)`` :math:`\log \sum_{s \in \text{edge}} w_s` (``-inf`` without
        an edge).
    :ivar int chunk_size: particles per full chunk.
    :ivar int num_chunks: chunks run.
    """

    lse1: torch.Tensor = None
    lse2: torch.Tensor = None
    low: torch.Tensor = None
    log_weights: torch.Tensor = None
    tail: torch.Tensor = None
    lse_edge: torch.Tensor = None
    chunk_size: int = 0
    num_chunks: int = 0

    def add(self, lw, a, b, c, edge=None, tail_k=0):
        """Merges one chunk: its log-weights ``lw`` and their statistics ``a, b, c``
        (:func:`~pyro_mpt.reference.compile.chunk_stats`); ``edge`` the chunk's rows of
        the grid's edge mask."""
        if self.lse1 is None:
            self.lse1, self.lse2, self.low = a, b, c
            self.lse_edge = torch.full_like(a, -math.inf)
        else:
            self.lse1, self.lse2 = torch.logaddexp(self.lse1, a), torch.logaddexp(self.lse2, b)
            self.low = torch.minimum(self.low, c)
        if edge is not None:
            on_edge = torch.where(edge.unsqueeze(-1), lw, -math.inf)
            self.lse_edge = torch.logaddexp(self.lse_edge, torch.logsumexp(on_edge, 0))
        if tail_k:
            top = torch.topk(lw, min(tail_k, lw.shape[0]), dim=0).values
            self.tail = top if self.tail is None else merge_tail(self.tail, top, tail_k)


def plan_chunks(num_samples, chunk_size, budget, cost):
    """``(chunk_size, num_chunks)``: ``chunk_size`` if given, else as many particles as
    keep ``cost`` elements per particle under ``budget``; at most ``num_samples``."""
    if chunk_size is None:
        chunk_size = max(1, min(num_samples, budget // cost))
    chunk_size = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk_size)
    logger.debug(
        "reference: %d particles in %d chunk(s) of up to %d (%d elements per particle, budget %d)",
        num_samples,
        num_chunks,
        chunk_size,
        cost,
        budget,
    )
    return chunk_size, num_chunks


def run_chunks(
    sampler,
    num_samples,
    chunk_size,
    compile_mode,
    progress,
    *,
    keep,
    tail_k,
    edge=None,
    desc="log p(x)",
    messages,
) -> StreamStats:
    """Streams ``num_samples`` particles of ``sampler`` in chunks (see the module
    docstring). Full chunks run through the compiled chunk function when ``compile_mode``
    is not ``False`` and there is more than one chunk.

    :param bool keep: keep every log-weight (``StreamStats.log_weights``).
    :param int tail_k: the size of the running top-k (0: none).
    :param edge: bool ``(S,)``, the grid points on its outer cells, or ``None``."""
    S = num_samples
    num_chunks = -(-S // chunk_size)
    stats = StreamStats(chunk_size=chunk_size, num_chunks=num_chunks)
    fast, kept = None, []
    with progress_bar(num_chunks, progress, desc, unit="chunk") as bar:
        for i in range(num_chunks):
            start = i * chunk_size
            size = min(chunk_size, S - start)
            inputs = sampler.inputs(start, size)
            if size == chunk_size and compile_mode is not False and num_chunks > 1:
                if fast is None:
                    device = sampler.layout.device
                    fast = build_chunk_fn(sampler, size, compile_mode, device, messages)
                lw, a, b, c = fast(*inputs)
            else:
                lw, a, b, c = chunk_stats(sampler(size, *inputs))
            chunk_edge = None if edge is None else edge[start : start + size]
            stats.add(lw, a, b, c, edge=chunk_edge, tail_k=tail_k)
            if keep:
                kept.append(lw)
            bar.update()
    stats.log_weights = torch.cat(kept, 0) if keep else None
    return stats


def stream(problem, sampler, num_samples, options, *, keep, tail_k, edge=None, desc, messages):
    """Sizes the chunks by the memory budget, picks the compile mode and streams the
    particles of ``sampler`` (:func:`run_chunks`) without gradients and without Pyro's
    argument validation (it ran on the first trace of the model)."""
    layout = problem.layout
    largest = per_particle_cost(problem.model, problem.args, problem.kwargs, layout, problem.trace)
    # a chunk holds several tensors of its largest one's size (the model's location, the
    # log-density and its temporaries: about 6 measured on PPCA), so that many are budgeted
    cost = REFERENCE_CHUNK_FACTOR * largest
    budget = resolve_max_elements(options.max_elements, layout.device)
    if options.chunk_size is None and cost > budget:  # refused before drawing anything
        raise ValueError(
            f"max_elements={budget} is too small for the {desc.split()[-1]} reference: one "
            f"particle over every sequence has tensors of {largest} elements, about {cost} "
            f"in all ({REFERENCE_CHUNK_FACTOR} x {largest}); pass max_elements >= {cost}, "
            "or fewer sequences per call"
        )
    chunk_size, _ = plan_chunks(num_samples, options.chunk_size, budget, cost)
    evaluations = num_samples * layout.num_sequences * layout.num_tokens
    mode = resolve_compile_mode(options.compile, evaluations, layout.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        return run_chunks(
            sampler,
            num_samples,
            chunk_size,
            mode,
            options.progress,
            keep=keep,
            tail_k=tail_k,
            edge=edge,
            desc=desc,
            messages=messages,
        )
