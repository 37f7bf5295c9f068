r"""Exact conditionals for discrete latents enumerated in parallel.

Sites marked ``infer={"enumerate": "parallel"}`` are enumerated by
:func:`pyro.poutine.enum`. When every enumerated site has a dim of its own, their joint
support is a set of particles with weights :math:`w^0_c = p(z = c)` and the mixture formula
of :mod:`pyro_mpt.conditionals.particles` is exact. Markov chains (:func:`pyro.markov` recycles
enumeration dims, so the joint support grows as :math:`C^T`) are scored by variable
elimination with the masked tokens' evidence removed (the theory page of the docs,
section 2b), see :mod:`pyro_mpt.conditionals.elimination`; one chain of states with
emissions (an HMM) by its scaled forward-backward
(:mod:`pyro_mpt.conditionals.forward_backward`).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..options import check_positive_int, resolve_max_elements
from .base import Conditionals, Scorer
from .elimination import EliminationScorer
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

__all__ = ["EnumerateConditionals"]

#: Joint supports larger than this are scored by variable elimination instead.
MAX_JOINT_SUPPORT = 2**14


class EnumerateConditionals(Conditionals):
    r"""Enumeration of discrete latents; exact.

    For discrete latents :math:`z` (enumerated in parallel),
    :math:`p(x_j \mid x_O) = \sum_z p(z \mid x_O)\, p(x_j \mid z, x_O)`, by variable
    elimination over the enumerated dimensions.

    :param int max_elements: memory budget, in tensor elements, of one chunk; ``None``:
        the default of the data's device (:func:`~pyro_mpt.options.resolve_max_elements`).

    Example::

        est = MaskedELBO(conditionals="enumerate").estimate(gaussian_mixture, None, X, 3)
    """

    name = "enumerate"
    options = {"max_elements": "max_elements"}

    def __init__(self, max_elements: int | None = None):
        self.max_elements = check_positive_int("max_elements", max_elements, allow_none=True)

    def _eliminate(self, model, args, kwargs, layout, trace):
        budget = resolve_max_elements(self.max_elements, layout.device)
        return EliminationScorer(model, args, kwargs, layout, trace, budget)

    def check(self, layout: TokenLayout, trace) -> None:
        missing = [n for n in layout.latents if n not in layout.enumerated]
        if missing:
            raise ValueError(
                f"conditionals='enumerate' needs every latent enumerated, but {missing} are "
                "not marked infer={'enumerate': 'parallel'}; mark discrete latents so, and use "
                "conditionals='importance' or 'quadrature' for continuous ones"
            )

    def scorer(self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace) -> Scorer:
        """A :class:`~pyro_mpt.conditionals.particles.ParticleScorer` over the joint support
        when every enumerated site has a dim of its own and the support has at most
        ``MAX_JOINT_SUPPORT`` configurations; an
        :class:`~pyro_mpt.conditionals.elimination.EliminationScorer` otherwise."""
        self.check(layout, trace)
        tr = particle_trace(model, args, kwargs, layout)
        dims = list(enumerated_dims(tr).values())
        support = 1
        for name in layout.enumerated:
            support *= tr.nodes[name]["value"].shape[0] if tr.nodes[name]["value"].dim() else 1
        if len(set(dims)) < len(dims) or support > MAX_JOINT_SUPPORT:
            return self._eliminate(model, args, kwargs, layout, tr)
        try:
            parts = [(lp, 0) for lp in latent_log_prob(tr, layout.enumerated, layout)]
        except PerTokenLatent:
            return self._eliminate(model, args, kwargs, layout, tr)
        kernels, lead = build_kernels(tr, layout, parts)
        log_w0 = combine_log_weights(parts, layout, lead)
        if not layout.enumerated:
            log_w0 = None
        return ParticleScorer(kernels, layout, log_w0)
