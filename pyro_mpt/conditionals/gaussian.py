r"""Exact conditionals for models without latent variables.

Observed :class:`~pyro.distributions.MultivariateNormal` and
:class:`~pyro.distributions.LowRankMultivariateNormal` sites are conditioned in closed form,

.. math:: x_M \mid x_O \sim \mathcal N\big(\mu_M - \Lambda_{MM}^{-1}\Lambda_{MO}(x_O-\mu_O),
          \Lambda_{MM}^{-1}\big),

the low-rank ones by Woodbury (``K x K`` work per mask). Tokens of factorized sites
(independent ``Normal`` and any ``.to_event`` site) are independent, so
:math:`p(x_j \mid x_O) = p(x_j)`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Conditionals
from .particles import ParticleScorer
from .sites import build_kernels

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["GaussianConditionals"]


class GaussianConditionals(Conditionals):
    r"""Exact closed-form conditionals; the model must have no latent sample sites.

    For :math:`x \sim \mathcal N(\mu, \Sigma)` (dense or low-rank),
    :math:`x_M \mid x_O \sim \mathcal N(\mu_M + \Sigma_{MO}\Sigma_{OO}^{-1}(x_O - \mu_O),\,
    \Sigma_{MM} - \Sigma_{MO}\Sigma_{OO}^{-1}\Sigma_{OM})`, scored per token.

    Example::

        est = MaskedELBO(conditionals="gaussian").estimate(ppca_collapsed, None, X, 2)
    """

    name = "gaussian"

    def check(self, layout: TokenLayout, trace) -> None:
        if layout.latents:
            raise ValueError(
                f"conditionals='gaussian' needs a model without latent sites, but "
                f"{layout.latents} are latent: integrate them out (e.g. a "
                "LowRankMultivariateNormal) or use conditionals='importance', 'enumerate' "
                "or 'quadrature'"
            )

    def scorer(
        self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace
    ) -> ParticleScorer:
        self.check(layout, trace)
        kernels, _ = build_kernels(trace, layout)
        return ParticleScorer(kernels, layout, log_w0=None)
