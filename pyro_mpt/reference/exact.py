r"""The exact reference: :math:`\log p(x_n)` without sampling error, for observed sites
without latents (their log-density, Gaussians with a dense or low-rank covariance
included) and for discrete latents marked ``infer={"enumerate": "parallel"}``, summed out
exactly (enumeration of the joint support, or variable elimination for Markov chains:
:mod:`pyro_mpt.conditionals.elimination`). Differentiable: it runs with gradients.
"""

from __future__ import annotations

import torch

from ..conditionals.base import ParticleScorer
from ..conditionals.enumerate import EnumerateConditionals
from ..options import resolve_max_elements
from .result import LMLEstimate, fixed_estimate
from .sampler import masked_log_prob, per_sequence

__all__ = ["exact_reference"]


def _cannot_integrate(problem):
    continuous = problem.continuous
    nodes = problem.trace.nodes
    discrete = [n for n in continuous if nodes[n]["fn"].support.is_discrete]
    hint = (
        f" The discrete site(s) {discrete} can be summed out exactly: mark them "
        "infer={'enumerate': 'parallel'}."
        if discrete
        else ""
    )
    return ValueError(
        f"method='exact' cannot integrate the latent site(s) {continuous}: it covers "
        "observed sites without latents (Gaussians included) and discrete latents marked "
        "infer={'enumerate': 'parallel'}." + hint + " Use method='importance' (any model; "
        "pass a trained guide for a better proposal) or method='quadrature' (latent "
        "dimension <= 3 per sequence), or integrate the latent out in the model (as "
        "pyro_mpt.models.ppca_collapsed does)"
    )


def _exact_per_sequence(problem, max_elements, messages):
    layout, trace = problem.layout, problem.trace
    if not layout.latents:
        per_seq = 0.0
        for info in layout.sites:
            lp = masked_log_prob(trace.nodes[info.name])
            per_seq = per_seq + per_sequence(lp, layout, 1, info.name)[0]
        messages.append("exact: the model's log-density (no latent sites)")
        return per_seq
    budget = resolve_max_elements(max_elements, layout.device)
    scorer = EnumerateConditionals(budget).scorer(
        problem.model, problem.args, problem.kwargs, layout, trace
    )
    N, T = layout.num_sequences, layout.num_tokens
    observed = torch.ones(1, N, T, dtype=torch.bool, device=layout.device)
    if isinstance(scorer, ParticleScorer):
        messages.append(
            f"exact: enumeration of the joint support of {layout.enumerated} "
            f"({scorer.num_particles} configurations)"
        )
    else:
        messages.append(
            f"exact: variable elimination over the enumerated sites {layout.enumerated}"
        )
    return scorer.log_evidence(observed)[0]


def exact_reference(problem, options, messages) -> LMLEstimate:
    """The exact :math:`\\log p(x_n)` of each sequence.

    :raises ValueError: for a model with a latent that is not enumerated, saying which
        methods can handle it."""
    if problem.continuous:
        raise _cannot_integrate(problem)
    per_seq = _exact_per_sequence(problem, options.max_elements, messages)
    layout = problem.layout
    return fixed_estimate(per_seq, layout.scale, "exact", messages, layout.device)
