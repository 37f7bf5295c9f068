r"""The ``"gaussian"`` reference: the exact :math:`\log p(x_n)` of a linear-Gaussian model.

When every latent is a (multivariate) normal whose mean is affine in its parents and whose
scale does not depend on latents, and the observations are normal likewise, the tokens of
each sequence are jointly Gaussian (:mod:`pyro_mpt.conditionals.affine`),

.. math:: \log p(x_n) = \log \mathcal N\big(x_n;\, b_n,\, A_n A_n^\top + \Sigma_n\big),

computed without sampling error by the Gaussian kernels of
:mod:`pyro_mpt.conditionals.kernels` (by Woodbury when the noise is diagonal and low-rank
pays). Differentiable in the model's parameters: it runs with gradients.
"""

from __future__ import annotations

import torch

from ..conditionals.affine import NotLinearGaussian, compile_linear_gaussian
from ..conditionals.linear_gaussian import gaussian_kernel
from ..conditionals.particles import ParticleScorer
from ..options import resolve_max_elements
from .problem import Problem
from .result import LMLEstimate, fixed_estimate

__all__ = ["gaussian_reference"]


def gaussian_reference(problem: Problem, options, messages: list) -> LMLEstimate:
    """The exact :math:`\\log p(x_n)` of each sequence of a linear-Gaussian model.

    :param problem: the traced model (:class:`~pyro_mpt.reference.problem.Problem`).
    :param options: the checked options (``max_elements`` bounds the dense covariance).
    :param messages: extended with how the value was computed.
    :raises ValueError: naming the site and the reason when the model is not
        linear-Gaussian."""
    layout = problem.layout
    budget = resolve_max_elements(options.max_elements, layout.device)
    try:
        compiled = compile_linear_gaussian(
            problem.model, problem.args, problem.kwargs, layout, problem.trace, budget
        )
    except NotLinearGaussian as e:
        raise ValueError(
            f"method='gaussian' cannot integrate this model: it is not linear-Gaussian: {e}. "
            "Use method='auto' (it falls back to importance sampling), 'importance' or "
            "'quadrature'"
        ) from None
    kernel = gaussian_kernel(compiled)
    scorer = ParticleScorer([(slice(0, layout.num_tokens), kernel)], layout, log_w0=None)
    N, T = layout.num_sequences, layout.num_tokens
    messages.append(
        f"gaussian: the tokens are jointly Gaussian ({type(kernel).__name__}, {T} tokens "
        f"per sequence, latents {layout.latents} integrated exactly)"
    )
    observed = torch.ones(1, N, T, dtype=torch.bool, device=layout.device)
    per_seq = scorer.log_evidence(observed)[0]
    return fixed_estimate(per_seq, layout.scale, "gaussian", messages, layout.device)
