r"""The ``"conjugate"`` reference: the exact :math:`\log p(x_n)` of one conjugate latent
and its tokens (Beta -> Bernoulli / Binomial, Dirichlet -> Categorical, Gamma -> Poisson /
Exponential; :mod:`pyro_mpt.conditionals.conjugate`),

.. math:: \log p(x_n) = \sum_t h_{n,t} + Z\Big(\alpha_n + \sum_t s_{n,t}\Big) - Z(\alpha_n),

over each sequence's present tokens (those Pyro's masks keep). Differentiable in the
prior's parameters: it runs with gradients.
"""

from __future__ import annotations

from ..conditionals.conjugate import NotConjugate, compile_conjugate
from ..conditionals.particles import ParticleScorer
from .problem import Problem
from .result import LMLEstimate, fixed_estimate

__all__ = ["conjugate_reference"]


def conjugate_reference(problem: Problem, options, messages: list) -> LMLEstimate:
    """The exact :math:`\\log p(x_n)` of each sequence of a conjugate model.

    :param problem: the traced model (:class:`~pyro_mpt.reference.problem.Problem`).
    :param options: the checked options (none is used).
    :param messages: extended with how the value was computed.
    :raises ValueError: naming the site and the reason when the model is not conjugate."""
    layout = problem.layout
    try:
        kernel = compile_conjugate(
            problem.model, problem.args, problem.kwargs, layout, problem.trace
        )
    except NotConjugate as e:
        raise ValueError(
            f"method='conjugate' cannot integrate this model: {e}. Use method='auto' (it "
            "falls back to another method) or 'importance'"
        ) from None
    scorer = ParticleScorer([(slice(0, layout.num_tokens), kernel)], layout, log_w0=None)
    messages.append(
        f"conjugate: the latent {layout.latents} integrated in closed form "
        f"({kernel.family} family, {layout.num_tokens} tokens per sequence)"
    )
    observed = layout.present_tokens().unsqueeze(0)  # masked-out tokens marginalised
    per_seq = scorer.log_evidence(observed)[0]
    return fixed_estimate(per_seq, layout.scale, "conjugate", messages, layout.device)
