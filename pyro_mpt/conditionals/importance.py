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
    latent_log_prob,
    particle_trace,
)
from .sites import build_kernels

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["ImportanceConditionals", "JointEnumerationError", "particle_scorer"]


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

    With :math:`z_s \sim p(z)`, :math:`s = 1..S`, the self-normalised estimate
    :math:`p(x_j \mid x_O) \approx \sum_s \bar w_s\, p(x_j \mid x_O, z_s)`,
    :math:`\bar w_s \propto p(x_O \mid z_s)`; consistent as :math:`S \to \infty`.

    Example::

        elbo = MaskedELBO(conditionals=ImportanceConditionals(num_samples=1024))
        elbo.estimate(ppca_latent, None, X, 2).total
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
