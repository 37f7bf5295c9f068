r"""Exact conditionals for models without latent variables.

Observed :class:`~pyro.distributions.MultivariateNormal` and
:class:`~pyro.distributions.LowRankMultivariateNormal` sites are conditioned in closed form,

.. math:: x_M \mid x_O \sim \mathcal N\big(\mu_M - \Lambda_{MM}^{-1}\Lambda_{MO}(x_O-\mu_O),
          \Lambda_{MM}^{-1}\big),

the low-rank ones by Woodbury (``K x K`` work per mask). Tokens of factorized sites
(independent ``Normal`` and any ``.to_event`` site) are independent, so
:math:`p(x_j \mid x_O) = p(x_j)`.
"""

from .base import Conditionals, ParticleScorer, build_kernels

__all__ = ["GaussianConditionals"]


class GaussianConditionals(Conditionals):
    """Exact closed-form conditionals; the model must have no latent sample sites."""

    name = "gaussian"

    def check(self, layout, trace):
        if layout.latents:
            raise ValueError(
                f"conditionals='gaussian' needs a model without latent sites, but "
                f"{layout.latents} are latent: integrate them out (e.g. a "
                "LowRankMultivariateNormal) or use conditionals='importance', 'enumerate' "
                "or 'quadrature'"
            )

    def scorer(self, model, args, kwargs, layout, trace):
        self.check(layout, trace)
        kernels, _ = build_kernels(trace, layout)
        return ParticleScorer(kernels, layout, log_w0=None)
