r"""Self-normalised importance conditionals from prior draws (the theory page of the docs,
section 2).

``S`` prior draws :math:`z_s` of the latents (reparameterised, so gradients reach the
parameters), weights :math:`w^0_s = 1/S`, and for each mask

.. math:: \log p(x_j \mid x_O) \approx
    \operatorname{logsumexp}_s\big(\textstyle\sum_{t\in O} l_{s,t} + l_{s,j}\big)
    - \operatorname{logsumexp}_s \textstyle\sum_{t\in O} l_{s,t},
    \qquad l_{s,t} = \log p(x_t \mid z_s).

Consistent as ``S`` grows, biased :math:`O(1/S)` in log space. Discrete latents marked
``infer={"enumerate": "parallel"}`` are enumerated jointly with the draws. Latents whose
observed child is Gaussian mix exact Gaussian conditionals over the draws (section 3).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import pyro.poutine as poutine

from ..options import check_positive_int, renamed_keyword, resolve_max_elements
from .base import Conditionals
from .chunked import chunked_particle_scorer, particle_chunk_size, particle_elements
from .particles import (
    ParticleScorer,
    PerTokenLatent,
    combine_log_weights,
    enumerated_dims,
    flatten_particles,
    latent_log_prob,
    particle_trace,
)
from .proposal import as_proposal
from .sites import build_kernels

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["ImportanceConditionals", "JointEnumerationError", "drawn_values", "particle_scorer"]


class JointEnumerationError(ValueError):
    """The enumerated sites cannot be particles jointly with the draws (see
    :func:`enumerated_log_weight`)."""


def enumerated_log_weight(trace, layout: TokenLayout) -> list:
    """log p(c) of the enumerated sites, as ``(tensor, extra_ndim=0)`` pairs.

    :raises JointEnumerationError: when the enumerated sites cannot be particles jointly with the
        draws: ``pyro.markov`` recycled their enumeration dims (a Markov chain), or one
        varies along the token plate; both are summed out exactly by ``"mixed"``."""
    dims = list(enumerated_dims(trace).values())
    why = None
    if len(set(dims)) < len(dims):
        why = "pyro.markov recycles their enumeration dims (a Markov chain)"
    else:
        try:
            return [(lp, 0) for lp in latent_log_prob(trace, layout.enumerated, layout)]
        except PerTokenLatent as e:
            why = f"{e.site!r} sits inside token_plate {layout.token_plate!r}"
    raise JointEnumerationError(
        f"conditionals='importance' enumerates the sites {layout.enumerated} jointly with its "
        f"draws, which is wrong here: {why}; use conditionals='mixed' (what 'auto' picks), "
        "which sums them out by variable elimination for each draw"
    )


def check_discrete_latents(trace, layout: TokenLayout, backend: str) -> None:
    """Raises ``ValueError`` for a latent that is neither enumerated nor reparameterisable
    (so ``backend`` cannot draw it)."""
    for name in layout.latents:
        site = trace.nodes[name]
        if name in layout.enumerated:
            continue
        if not site["fn"].has_rsample:
            raise ValueError(
                f"latent site {name!r} ({type(site['fn']).__name__}) cannot be reparameterised, "
                f"so conditionals={backend!r} cannot draw it: if it is discrete mark it "
                "infer={'enumerate': 'parallel'}"
            )


class ImportanceConditionals(Conditionals):
    r"""Prior draws as particles.

    :param int num_samples: ``S``, the prior draws per step (per sequence for local
        latents).
    :param int num_particles: deprecated name of ``num_samples``.
    :param int max_elements: memory budget of one chunk of draws
        (:mod:`~pyro_mpt.conditionals.chunked`); ``None``: the device's default.
    :param proposal: a guide to draw the latents from instead of the prior (e.g. an
        ``AutoNormal`` trained by ``Trace_ELBO``), or a
        :class:`~pyro_mpt.conditionals.proposal.Proposal`; ``None``: the prior. It gets no
        gradients (:mod:`~pyro_mpt.conditionals.proposal`).
    :param float prior_fraction: with a guide, the share :math:`\alpha` of the draws taken
        from the prior (the defensive mixture of :mod:`~pyro_mpt.conditionals.proposal`).

    With :math:`z_s \sim p(z)`, :math:`s = 1..S`, the self-normalised estimate
    :math:`p(x_j \mid x_O) \approx \sum_s \bar w_s\, p(x_j \mid x_O, z_s)`,
    :math:`\bar w_s \propto p(x_O \mid z_s)`; consistent as :math:`S \to \infty`. With a
    proposal, :math:`z_s \sim \tilde q = \alpha p + (1 - \alpha) q` and

    .. math:: \bar w_s \propto \frac{p(z_s)}{\tilde q(z_s)}\, p(x_O \mid z_s).

    Example::

        elbo = MaskedELBO(conditionals=ImportanceConditionals(num_samples=1024))
        elbo.estimate(ppca_latent, None, X, 2).total
        guide = AutoNormal(model)   # trained by SVI(model, guide, Adam(...), Trace_ELBO())
        MaskedELBO(conditionals=ImportanceConditionals(256, proposal=guide)).estimate(
            model, None, X
        )
    """

    name = "importance"
    draws_latents = True
    options = {"num_samples": "num_samples", "max_elements": "max_elements"}

    def __init__(
        self,
        num_samples: int = 256,
        *,
        num_particles: int | None = None,
        max_elements: int | None = None,
        proposal=None,
        prior_fraction: float | None = None,
    ):
        num_samples = renamed_keyword(
            "ImportanceConditionals",
            "num_particles",
            "num_samples",
            num_particles,
            num_samples,
            256,
        )
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.max_elements = check_positive_int("max_elements", max_elements, allow_none=True)
        self.proposal = as_proposal(proposal, prior_fraction)

    def __repr__(self) -> str:
        proposal = "" if self.proposal is None else f", proposal={self.proposal!r}"
        return f"ImportanceConditionals(num_samples={self.num_samples}{proposal})"

    @property
    def num_particles(self) -> int:
        """The old name of ``num_samples``."""
        return self.num_samples

    def check(self, layout: TokenLayout, trace) -> None:
        check_discrete_latents(trace, layout, self.name)

    def scorer(
        self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace
    ) -> ParticleScorer:
        self.check(layout, trace)
        S = self.num_samples
        budget = resolve_max_elements(self.max_elements, layout.device)
        chunk = particle_chunk_size(S, particle_elements(trace, layout), budget, self.name)
        if self.proposal is not None:
            self.proposal.check(args, kwargs, layout, trace)
            return chunked_particle_scorer(
                layout,
                S,
                chunk,
                partial(_draw_proposal, self.proposal, model, args, kwargs, layout, S),
            )

        def draw(start: int, size: int):
            tr = particle_trace(model, args, kwargs, layout, num_particles=size)
            drawn = drawn_values(tr, layout)  # replayed: every call sees the same draws

            def kernels() -> list:
                again = particle_trace(
                    poutine.replay(model, trace=drawn), args, kwargs, layout, num_particles=size
                )
                return particle_scorer(again, layout, S).kernels

            return particle_scorer(tr, layout, S), kernels

        return chunked_particle_scorer(layout, S, chunk, draw)


def _draw_proposal(proposal, model, args, kwargs, layout, num_samples, start, size):
    r"""One chunk of ``size`` draws from ``proposal``: its scorer, with
    :math:`\log w^0 = \log p(z) - \log \tilde q(z) - \log S`, and its kernels again."""
    drawn, log_q, alpha = proposal.draw(
        args,
        kwargs,
        layout,
        size,
        lambda n: particle_trace(model, args, kwargs, layout, num_particles=n),
    )
    replayed = poutine.replay(model, trace=drawn)
    tr = particle_trace(replayed, args, kwargs, layout, num_particles=size)
    log_p = sum(
        flatten_particles(lp, layout, (size,), 0)
        for lp in latent_log_prob(tr, layout.latents, layout)
    )
    log_w = proposal.log_weight(log_p, log_q, alpha)

    def kernels() -> list:
        again = particle_trace(replayed, args, kwargs, layout, num_particles=size)
        return build_kernels(again, layout)[0]

    kernels_now, _ = build_kernels(tr, layout)
    return ParticleScorer(kernels_now, layout, log_w - math.log(num_samples)), kernels


def drawn_values(trace, layout: TokenLayout) -> poutine.Trace:
    """A trace holding only the drawn values of the continuous latents of ``trace`` (the
    enumerated ones are enumerated again), for :func:`pyro.poutine.replay`."""
    drawn = poutine.Trace()
    for name in layout.latents:
        if name not in layout.enumerated:
            site = trace.nodes[name]
            drawn.add_node(
                name, type="sample", is_observed=False, value=site["value"], infer=site["infer"]
            )
    return drawn


def particle_scorer(trace, layout: TokenLayout, num_samples: int) -> ParticleScorer:
    r"""The :class:`~pyro_mpt.conditionals.particles.ParticleScorer` of a trace with
    ``num_samples`` prior draws and the enumerated sites' joint support:
    :math:`\log w^0 = \log p(c) - \log S`.

    :raises JointEnumerationError: see :func:`enumerated_log_weight`."""
    parts = enumerated_log_weight(trace, layout)
    kernels, lead = build_kernels(trace, layout, parts)
    log_w0 = combine_log_weights(parts, layout, lead, base=-math.log(num_samples))
    return ParticleScorer(kernels, layout, log_w0)
