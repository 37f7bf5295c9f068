r"""The ``"linear_gaussian"`` backend: exact conditionals of linear-Gaussian models.

When every latent is a (multivariate) normal with a mean affine in its parents and a scale
free of latents, and the observations are normal likewise (a Kalman filter, PPCA with an
explicit :math:`z`, Bayesian linear regression, a hierarchical normal model with fixed
scales), the tokens of each sequence are jointly Gaussian,

.. math:: x_n \sim \mathcal N\big(b_n,\; A_n A_n^\top + \Sigma_n\big),

compiled by :func:`~pyro_mpt.conditionals.affine.compile_linear_gaussian`. Every masked
conditional is then a Gaussian conditional,

.. math:: x_j \mid x_O \sim \mathcal N\big(\mu_j + \Sigma_{jO}\Sigma_{OO}^{-1}(x_O-\mu_O),\,
    \Sigma_{jj} - \Sigma_{jO}\Sigma_{OO}^{-1}\Sigma_{Oj}\big),

scored by the existing Gaussian kernels (:mod:`~pyro_mpt.conditionals.kernels`): low-rank
(Woodbury, ``K x K`` work per mask) when the observation noise is diagonal and there are
fewer noise dimensions ``K`` than tokens, dense otherwise. Differentiable in the model's
parameters, so :class:`~pyro_mpt.MaskedELBO` trains them.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..options import check_positive_int, resolve_max_elements
from .affine import LinearGaussian, NotLinearGaussian, compile_linear_gaussian
from .base import Conditionals
from .kernels import DenseGaussianKernel, LowRankGaussianKernel
from .particles import ParticleScorer

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["LinearGaussianConditionals", "detect_linear_gaussian", "gaussian_kernel"]


def detect_linear_gaussian(
    model, args: tuple, kwargs: dict, layout: TokenLayout, trace, max_elements: int
) -> tuple[LinearGaussian | None, str]:
    """Whether the model is linear-Gaussian: ``(compiled, why)``, ``compiled`` ``None``
    when it is not, and ``why`` the reason either way.

    :param max_elements: memory budget of the dense covariance and the Jacobian."""
    if not layout.latents:
        return None, "the model has no latent sites"
    try:
        compiled = compile_linear_gaussian(model, args, kwargs, layout, trace, max_elements)
    except NotLinearGaussian as e:
        return None, f"not linear-Gaussian: {e}"
    except RuntimeError as e:  # autograd could not differentiate the model as written
        return None, f"not linear-Gaussian: the model could not be differentiated ({e})"
    return compiled, (
        f"every latent ({layout.latents}) is Normal with a mean affine in its parents, and "
        "so are the observations: their joint is Gaussian"
    )


#: Most autograd nodes walked to find the leaves a factor depends on; larger graphs keep
#: one factor per sequence.
_MAX_GRAPH_NODES = 20_000


def _graph_leaves(t: torch.Tensor) -> list | None:
    """The leaf tensors ``t`` depends on (``None`` if its graph is too large to walk)."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_GRAPH_NODES:
            return None
        if hasattr(node, "variable"):  # an AccumulateGrad node: its leaf
            leaves.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _enter_alike(tensors: list) -> bool:
    r"""Whether the parameters enter every sequence's tensor alike,
    :math:`\partial A_n / \partial\theta = \partial A_0 / \partial\theta` for all
    ``n``: then one shared tensor (the sequences' mean) has the right gradient. Tested on a
    random contrast :math:`c = \sum_n \langle R, A_n - A_0\rangle`, whose gradient is 0
    exactly then (to rounding, against the scale of :math:`\langle R, A_0\rangle`'s)."""
    g = torch.Generator().manual_seed(0)
    R = [torch.randn(t.shape[1:], generator=g, dtype=t.dtype).to(t.device) for t in tensors]
    first = sum((r * t[0]).sum() for r, t in zip(R, tensors))
    contrast = sum((r * (t - t[:1])).sum() for r, t in zip(R, tensors))
    leaves = _graph_leaves(first + contrast)
    if leaves is None:
        return False
    if not leaves:
        return True
    grad = torch.autograd.grad
    g_first = grad(first, leaves, retain_graph=True, allow_unused=True)
    g_contrast = grad(contrast, leaves, retain_graph=True, allow_unused=True)
    N = tensors[0].shape[0]
    scale = N * max((float(t.abs().max()) for t in g_first if t is not None), default=0.0)
    tol = 1e-9 * scale + 1e-300
    return all(c is None or float(c.abs().max()) <= tol for c in g_contrast)


def _shared(tensors: list) -> list | None:
    """One value per tensor for all sequences when every sequence has the same value and,
    if a gradient is asked for, the parameters enter every sequence alike
    (:func:`_enter_alike`); ``None`` otherwise (then one per sequence)."""
    if not all(bool((t == t[:1]).all()) for t in tensors):
        return None
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return [t[0] for t in tensors]
    if not _enter_alike(tensors):
        return None
    return [t.mean(0) for t in tensors]  # the mean: the gradient reaches every sequence


def gaussian_kernel(compiled: LinearGaussian):
    """The token kernel of :math:`\\mathcal N(b_n, A_n A_n^\\top + \\Sigma_n)`: low-rank
    when the noise is diagonal and positive and ``K < T``, dense otherwise; parameters
    shared over sequences where they are equal (and enter alike, see :func:`_shared`)."""
    x, loc, W, D = compiled.x, compiled.loc.unsqueeze(0), compiled.factor, compiled.noise_var
    if compiled.low_rank:
        shared = _shared([W, D])
        if shared is not None:
            return LowRankGaussianKernel(x, loc, *shared)
        return LowRankGaussianKernel(x, loc, W.unsqueeze(0), D.unsqueeze(0))
    cov = compiled.covariance()
    shared = _shared([cov])
    return DenseGaussianKernel(x, loc, cov.unsqueeze(0) if shared is None else shared[0])


class LinearGaussianConditionals(Conditionals):
    r"""Exact conditionals of a linear-Gaussian model (see the module docstring); the
    model's affine structure is found and checked by autograd at each step.

    :param int max_elements: memory budget of the dense covariance and the Jacobian;
        ``None``: the device's default (:func:`~pyro_mpt.options.resolve_max_elements`).
    :param compiled: an already compiled model, used once for the trace it was compiled
        from (``"auto"`` passes the one its detection made).

    Example::

        MaskedELBO(conditionals="linear_gaussian").estimate(kalman, None, y)
    """

    name = "linear_gaussian"
    options = {"max_elements": "max_elements"}

    def __init__(self, max_elements: int | None = None, compiled: tuple | None = None):
        self.max_elements = check_positive_int("max_elements", max_elements, allow_none=True)
        self._compiled = compiled  # (trace, LinearGaussian) or None

    def compile(self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace):
        """The :class:`~pyro_mpt.conditionals.affine.LinearGaussian` of the model.

        :raises ValueError: naming the site and the reason when the model is not
            linear-Gaussian."""
        if self._compiled is not None and self._compiled[0] is trace:
            compiled, self._compiled = self._compiled[1], None
            return compiled
        budget = resolve_max_elements(self.max_elements, layout.device)
        try:
            return compile_linear_gaussian(model, args, kwargs, layout, trace, budget)
        except NotLinearGaussian as e:
            raise ValueError(
                f"conditionals='linear_gaussian' cannot score this model: {e}. Use "
                "conditionals='auto' (it falls back to another backend), 'importance' or "
                "'quadrature'"
            ) from None

    def scorer(
        self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace
    ) -> ParticleScorer:
        compiled = self.compile(model, args, kwargs, layout, trace)
        kernel = gaussian_kernel(compiled)
        return ParticleScorer([(slice(0, layout.num_tokens), kernel)], layout, log_w0=None)

    def __repr__(self) -> str:
        return f"LinearGaussianConditionals(max_elements={self.max_elements})"
