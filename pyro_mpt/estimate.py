r"""The result of a masked estimate: :class:`MPTEstimate`, its standard error, degrees of
freedom and Student-t interval, made from the ``(K, N)`` draws of a mask estimator.

With :math:`K` independent draws :math:`d_{k,n}` of each sequence's estimate, the total is
:math:`\sum_n c_n \bar d_n` and its variance :math:`\sum_n c_n^2 \widehat{\mathrm{Var}}(d_n)/K`
(each on :math:`K - 1` degrees of freedom, combined by Welch-Satterthwaite); with shared masks
or one sequence the draws' totals are correlated, so their own spread (:math:`K - 1` dof) is
used. A particle error (importance conditionals) is added as an independent variance, and
the particles' jackknife bias estimate is subtracted, its uncertainty added to the variance
(:func:`particle_bias_correction`, :mod:`pyro_mpt.particle_error`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .intervals import satterthwaite_dof, t_interval

if TYPE_CHECKING:
    from .estimators import MaskEstimator

__all__ = ["MPTEstimate", "particle_bias_correction"]


@dataclass
class MPTEstimate:
    r"""A masked estimate of :math:`\sum_n \log p(x_n)`.

    :ivar torch.Tensor total: the estimate (differentiable), subsampling scale applied.
    :ivar torch.Tensor per_sequence: ``(N,)`` each sequence's estimate, averaged over draws
        (minus its particle bias estimate with importance conditionals).
    :ivar torch.Tensor draws: ``(num_masks, N)`` the independent draws.
    :ivar float stderr: Monte Carlo standard error of ``total`` (NaN with one draw).
    :ivar str estimator: the estimator's name; ``conditionals``: the backend's.
    :ivar bool unbiased: whether the estimator is unbiased for :math:`\log p(x)`.
    :ivar float dof: the degrees of freedom of ``stderr`` (Welch-Satterthwaite over the
        sequences' variances, each on :math:`K - 1`; :math:`K - 1` with shared masks or one
        sequence; NaN with one draw): :meth:`ci` uses Student-t with it.
    :ivar float particle_stderr: the part of ``stderr`` from the particles of importance
        conditionals, :math:`\sqrt{\widehat{\mathrm{Var}}_\mathrm{part} + (\hat B_1^2 +
        \hat B_{1/2}^2)/2}` (0 for deterministic conditionals; see
        :func:`particle_bias_correction` and :mod:`pyro_mpt.particle_error`).
    :ivar float particle_bias: :math:`\hat B`, the jackknife estimate of the particles'
        bias of the total, already subtracted from ``total`` (0 for deterministic
        conditionals).
    :ivar bool reliable: ``False`` when the importance conditionals are degenerate (the
        ESS warning of :mod:`pyro_mpt.particle_error` fired): the bias correction then
        assumes that the bias decays at least like :math:`S^{-1/2}` and the interval is
        widened for it (conservative by design, measured to cover in the Reliability
        page's hard setting, with a wide interval); raise ``num_samples`` or use exact or
        quadrature conditionals.
    :ivar int num_tokens: ``T``, the tokens per sequence (the longest with ragged data;
        ``None`` when unknown).
    :ivar bool shared_masks: whether every sequence had the same masks.
    :ivar torch.Tensor particle_ess: ``(N,)`` the effective sample size of the importance
        conditionals' weights given every token (``None`` for other conditionals).

    The draw of a sequence :math:`x_n` with :math:`T` tokens is, for the stratified estimator,
    :math:`\sum_{m=1}^T s(M_m)` with :math:`s(M) = \frac1m\sum_{j\in M}\log p(x_{n,j}\mid
    x_{n,-M})`; ``total`` is :math:`\sum_n` of the mean over draws.

    Example::

        est = MaskedELBO(num_masks=8).estimate(ppca_collapsed, None, X, 2)   # X: (N, T)
        est.total, est.stderr
        est.draws.shape, est.per_sequence.shape                 # (8, N), (N,)
    """

    total: torch.Tensor
    per_sequence: torch.Tensor
    draws: torch.Tensor
    stderr: float
    estimator: str
    conditionals: str
    unbiased: bool
    dof: float = math.inf
    particle_stderr: float = 0.0
    shared_masks: bool = False
    particle_ess: torch.Tensor | None = None
    particle_bias: float = 0.0
    reliable: bool = True
    num_tokens: int | None = None

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        r"""The interval :math:`\hat L \pm t_{(1+\ell)/2,\nu}\,\mathrm{se}` of ``total``
        with :math:`\nu` = ``dof`` (:func:`pyro_mpt.intervals.t_interval`).

        :param float level: the coverage :math:`\ell`.
        :returns: ``(low, high)``."""
        return t_interval(self.total.detach(), self.stderr, self.dof, level)

    @classmethod
    def from_draws(
        cls,
        draws: torch.Tensor,
        estimator: MaskEstimator,
        conditionals: str,
        *,
        scale: torch.Tensor | None = None,
        share_masks: bool = False,
        particle_var: tuple[float, float] | None = None,
    ) -> MPTEstimate:
        r"""The estimate of ``(K, N)`` draws: :math:`\sum_n c_n \bar d_n` with the
        subsampling scale :math:`c_n` (``scale``; ``None``: 1) and standard error
        :math:`\sqrt{\sum_n c_n^2 \widehat{\mathrm{Var}}(d_n) / K}`; with ``share_masks`` the
        sequences are correlated, so the spread of the draws' totals is used instead.

        :param draws: ``(K, N)`` independent draws of every sequence.
        :param estimator: the :class:`~pyro_mpt.estimators.MaskEstimator` that made them.
        :param str conditionals: the name of the backend that scored them.
        :param particle_var: ``(variance, dof)`` of the particle error, or a
            :class:`~pyro_mpt.particle_error.ParticleError` whose bias correction is
            subtracted and whose uncertainty is added to the variance
            (:func:`particle_bias_correction`).
        """
        K = draws.shape[0]
        per_sequence = draws.mean(0)
        bias = getattr(particle_var, "bias", None)
        if bias is not None:  # a constant: the gradient is the uncorrected estimate's
            correction, total_bias, extra = particle_bias_correction(particle_var, scale)
            per_sequence = per_sequence - correction.to(per_sequence.dtype)
            if getattr(particle_var, "widen", True):
                particle_var = (particle_var[0] + extra, particle_var[1])
        total = per_sequence.sum() if scale is None else (scale * per_sequence).sum()
        detached = draws.detach()
        if K > 1 and (share_masks or draws.shape[1] == 1):
            terms = (detached if scale is None else detached * scale).sum(-1).var().unsqueeze(0)
        elif K > 1:
            terms = detached.var(0) if scale is None else scale**2 * detached.var(0)
        else:
            terms = detached.new_full((1,), float("nan"))
        terms = terms / K
        variances, dofs = [terms], [torch.full_like(terms, K - 1.0)]
        if particle_var is not None:
            variances.append(terms.new_tensor([particle_var[0]]))
            dofs.append(terms.new_tensor([particle_var[1]]))
        variances, dofs = torch.cat(variances), torch.cat(dofs)
        var = float(variances.sum())
        dof = satterthwaite_dof(variances, dofs)
        if K > 1 and var == 0.0:
            dof = math.inf  # deterministic draws (e.g. the chain with exact conditionals)
        return cls(
            total=total,
            per_sequence=per_sequence,
            draws=draws,
            stderr=math.sqrt(var),
            estimator=estimator.name,
            conditionals=conditionals,
            unbiased=estimator.unbiased,
            dof=dof,
            particle_stderr=0.0 if particle_var is None else math.sqrt(particle_var[0]),
            shared_masks=bool(share_masks),
            particle_bias=total_bias if bias is not None else 0.0,
        )


def particle_bias_correction(error, scale: torch.Tensor | None = None):
    r"""``(correction (N,), total, extra_variance)``: what to subtract from each sequence,
    its scaled total :math:`\hat B` and the variance to add, from the jackknife bias
    estimates :math:`\hat b_1` (``error.bias``) and :math:`\hat b_{1/2}` (``error.bias_slow``;
    ``bias`` when ``None``) of a :class:`~pyro_mpt.particle_error.ParticleError`
    (:mod:`pyro_mpt.particle_error`):

    .. math:: \hat b_n = \tfrac12(\hat b_{1,n} + \hat b_{1/2,n}), \qquad
        \hat B = \sum_n c_n \hat b_n, \qquad
        \text{extra} = \tfrac12\big(\hat B_1^2 + \hat B_{1/2}^2\big)

    with :math:`\hat B_a = \sum_n c_n \hat b_{a,n}`: the midpoint of the bias's range and
    the mean square of its ends (:math:`\hat B^2` plus the squared half-range). Where
    ``bias_slow`` equals ``bias`` this is :math:`\hat b_1` and :math:`\hat B_1^2` exactly.

    :param error: a :class:`~pyro_mpt.particle_error.ParticleError` with ``bias``.
    :param scale: ``(N,)`` the subsampling scale :math:`c_n` (``None``: 1).
    """
    fast = error.bias
    slow = fast if getattr(error, "bias_slow", None) is None else error.bias_slow
    ends = [float(b.sum() if scale is None else (scale * b).sum()) for b in (fast, slow)]
    return 0.5 * (fast + slow), 0.5 * (ends[0] + ends[1]), 0.5 * (ends[0] ** 2 + ends[1] ** 2)
