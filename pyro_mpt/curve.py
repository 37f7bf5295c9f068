r"""The masked pre-training curve :math:`m \mapsto S(m)` and its area, the LML estimate.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .engine import MPTOptions, prepare, score
from .estimate import particle_bias_correction
from .estimators import ExhaustiveEstimator, StratifiedEstimator, check_mask_rate
from .intervals import satterthwaite_dof, t_interval
from .options import (
    check_bool,
    check_choice,
    check_positive_int,
    renamed_keyword,
    resolve_max_elements,
)
from .particle_error import particle_terms
from .tokens.checks import check_draws_memory, forget_new_params_on_error

__all__ = ["MPTCurve", "mpt_curve"]


@dataclass
class MPTCurve:
    r"""Per-size masked scores :math:`S(m)`, summed over sequences.

    :ivar torch.Tensor sizes: ``(T,)`` the mask sizes :math:`m = 1..T`.
    :ivar torch.Tensor scores: ``(T,)`` :math:`S(m) = \sum_n \mathbb E_{|M|=m}[s_n(M)]`.
    :ivar torch.Tensor stderr: ``(T,)`` Monte Carlo standard errors (0 when exhaustive,
        NaN with one mask per size).
    :ivar torch.Tensor per_sequence: ``(N, T)`` :math:`S_n(m)` for every sequence.
    :ivar torch.Tensor area: :math:`\sum_m S(m)`, the estimate of :math:`\log p(X)`; with
        importance conditionals minus ``particle_bias``.
    :ivar float area_stderr: its standard error (with importance conditionals including
        the particles' error and the bias correction's uncertainty).
    :ivar float particle_bias: the particles' bias estimate subtracted from the area as a
        whole (:func:`pyro_mpt.estimate.particle_bias_correction`, as for
        :class:`~pyro_mpt.MPTEstimate`; 0 for deterministic conditionals): ``scores``,
        ``per_sequence`` and the fixed-rate estimates are not corrected, so then
        ``area = scores.sum() - particle_bias``.
    :ivar bool exhaustive: whether every mask was enumerated (then exact).
    :ivar float area_dof: the degrees of freedom of ``area_stderr`` (Welch-Satterthwaite
        over the sequences, :math:`K - 1` with shared masks or one sequence, NaN with one
        draw, infinite when exhaustive); :meth:`ci` uses Student-t with it.
    :ivar torch.Tensor dof: ``(T,)`` the same for each ``stderr``.
    :ivar bool shared_masks: whether every sequence had the same masks.

    Example::

        curve = mpt_curve(ppca_collapsed, X, 2, num_masks=8)   # X: (N, T)
        curve.scores.shape, curve.per_sequence.shape           # (T,), (N, T)
        curve.area, curve.fixed_rate_estimate(0.15)
    """

    sizes: torch.Tensor
    scores: torch.Tensor
    stderr: torch.Tensor
    per_sequence: torch.Tensor
    area: torch.Tensor
    area_stderr: float
    exhaustive: bool
    conditionals: str
    area_dof: float = math.inf
    dof: torch.Tensor | None = None
    shared_masks: bool = False
    particle_bias: float = 0.0

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        r"""The interval :math:`\text{area} \pm t_{(1+\ell)/2,\nu}\,\mathrm{se}` with
        :math:`\nu` = ``area_dof`` (:func:`pyro_mpt.intervals.t_interval`).

        :param float level: the coverage :math:`\ell`.
        :returns: ``(low, high)``."""
        return t_interval(self.area, self.area_stderr, self.area_dof, level)

    #: sequences have different numbers of present tokens (Pyro's masks): ``scores[m - 1]``
    #: sums :math:`S_n(m)` over the sequences with :math:`T_n \ge m`
    ragged: bool = False

    @classmethod
    def from_bins(
        cls,
        bins: torch.Tensor,
        draws: torch.Tensor,
        *,
        conditionals: str,
        exhaustive: bool = False,
        scale: torch.Tensor | None = None,
        share_masks: bool = False,
        **fields: Any,
    ) -> MPTCurve:
        r"""The curve of ``K`` draws binned by mask size (what
        :func:`~pyro_mpt.engine.score_masks` returns with ``by_size=True``).

        With the subsampling scale :math:`c_n` (``scale``; ``None``: 1) and bins
        :math:`b_{k,n,m}`: :math:`S_n(m) = \frac1K \sum_k b_{k,n,m}`,
        :math:`S(m) = \sum_n c_n S_n(m)`, area :math:`\sum_m S(m)`, and standard errors

        .. math:: \mathrm{se}(S(m)) = \sqrt{\textstyle\sum_n c_n^2\,
            \widehat{\mathrm{Var}}_k(b_{k,n,m}) / K}, \qquad
            \mathrm{se}(\text{area}) = \sqrt{\textstyle\sum_n c_n^2\,
            \widehat{\mathrm{Var}}_k(d_{k,n}) / K}

        over the draws :math:`d_{k,n}`; with ``share_masks`` the sequences are correlated and
        the spread of the draws' totals over :math:`n` is used instead. Exhaustive curves are
        exact (standard errors 0); one draw gives NaN.

        :param bins: ``(K, N, T + 1)``, entry ``m`` the draws' part from masks of size ``m``.
        :param draws: ``(K, N)`` the draws (the sums of the bins).
        :param fields: extra fields of a subclass (e.g. ``lengths`` of an MLM curve).
        """
        K = draws.shape[0]
        T = bins.shape[-1] - 1
        bins = bins[..., 1:]  # (K, N, T): sizes 1..T
        per_sequence = bins.mean(0)
        c = None if scale is None else scale.unsqueeze(-1)
        scores = (per_sequence if c is None else c * per_sequence).sum(0)
        area = scores.sum()
        dof, area_dof = _dofs(bins, draws, c, scale, K, exhaustive or share_masks)
        if exhaustive:
            stderr = torch.zeros_like(scores)
            area_stderr = 0.0
            dof, area_dof = torch.full_like(scores, math.inf), math.inf
        elif K > 1 and share_masks:
            # shared masks correlate the sequences: use the spread of the draws' totals
            totals = (bins if c is None else c * bins).sum(1)  # (K, T)
            stderr = (totals.var(0) / K).sqrt()
            area_stderr = math.sqrt(
                float((draws if scale is None else draws * scale).sum(-1).var() / K)
            )
        elif K > 1:
            stderr = ((bins.var(0) if c is None else c**2 * bins.var(0)).sum(0) / K).sqrt()
            dvar = draws.var(0) if scale is None else scale**2 * draws.var(0)
            area_stderr = math.sqrt(float(dvar.sum() / K))
        else:
            stderr = torch.full_like(scores, float("nan"))
            area_stderr = float("nan")
        return cls(
            sizes=torch.arange(1, T + 1, device=scores.device),
            scores=scores,
            stderr=stderr,
            per_sequence=per_sequence,
            area=area,
            area_stderr=area_stderr,
            exhaustive=exhaustive,
            conditionals=conditionals,
            area_dof=area_dof,
            dof=dof,
            shared_masks=bool(share_masks),
            **fields,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def mask_rates(self) -> torch.Tensor:
        """``(T,)`` the mask rates :math:`m / T`."""
        return self.sizes.to(self.scores.dtype) / self.num_tokens

    def mask_size(self, rate: float) -> int:
        """The mask size a fixed ``rate`` uses: :math:`\\max(1, \\mathrm{round}(rT))`."""
        rate = check_mask_rate(rate)
        return min(self.num_tokens, max(1, round(rate * self.num_tokens)))

    def fixed_rate_estimate(self, rate: float) -> torch.Tensor:
        r"""What a fixed mask rate estimates: :math:`T\,S(\mathrm{round}(rT))`.

        :raises ValueError: for a ``ragged`` curve (a fixed rate masks
            :math:`\mathrm{round}(r T_n)` tokens of each sequence; ``MaskedELBO(estimator=
            "fixed")`` does that)."""
        if self.ragged:
            raise ValueError(
                "fixed_rate_estimate: the sequences have different numbers of present tokens "
                "(poutine.mask / obs_mask), so one mask size per rate does not apply; use "
                "MaskedELBO(estimator='fixed', mask_rate=rate), which masks round(rate * T_n) "
                "tokens of each sequence"
            )
        return self.num_tokens * self.scores[self.mask_size(rate) - 1]

    def fixed_rate_bias(self, rate: float) -> torch.Tensor:
        r""":math:`T\,S(m) - \sum_m S(m)`: the bias of a fixed rate against the area."""
        return self.fixed_rate_estimate(rate) - self.area


def _dofs(bins, draws, c, scale, K, pooled):
    r"""``(dof (T,), area_dof)``: Welch-Satterthwaite's :math:`(\sum_n v_n)^2 / \sum_n
    v_n^2/(K-1)` over the sequences' variance terms :math:`v_n`; :math:`K - 1` when
    ``pooled`` (shared masks: one term) or with one sequence."""
    if K < 2:
        return torch.full((bins.shape[-1],), math.nan, device=bins.device), math.nan
    if pooled or bins.shape[1] == 1:
        return torch.full((bins.shape[-1],), K - 1.0, device=bins.device), K - 1.0
    v = bins.var(0) if c is None else c**2 * bins.var(0)  # (N, T)
    dof = v.sum(0) ** 2 / (v**2).sum(0) * (K - 1)
    dof = torch.where(v.sum(0) > 0, dof, torch.full_like(dof, math.inf))
    dv = draws.var(0) if scale is None else scale**2 * draws.var(0)
    return dof, satterthwaite_dof(dv, K - 1.0) if float(dv.sum()) > 0 else math.inf


def mpt_curve(
    model: Callable,
    *args: Any,
    num_masks: int = 1,
    exhaustive: bool = False,
    conditionals: str = "auto",
    num_samples: int = 256,
    token_plate: str | None = None,
    max_plate_nesting: float = float("inf"),
    quadrature_points: int = 20,
    quadrature_bounds: tuple[float, float] = (-5.0, 5.0),
    max_elements: int | None = None,
    share_masks: bool = False,
    masks: str = "auto",
    num_particles: int | None = None,
    **kwargs: Any,
) -> MPTCurve:
    r"""The curve :math:`S(m)`, :math:`m = 1..T`, and its area :math:`\sum_m S(m)`, which
    equals :math:`\log p(X)` (Moreno-Muñoz et al. 2023).

    Each :math:`S(m)` averages ``num_masks`` uniform masks of size :math:`m` per sequence
    (drawn independently per sequence, and per size unless ``masks`` says otherwise);
    ``exhaustive=True`` enumerates all
    :math:`2^T - 1` masks instead and is exact (small ``T``). Computed without gradients.

    Example::

        curve = mpt_curve(model, X, num_masks=8)
        curve.area, curve.area_stderr, curve.fixed_rate_estimate(0.15)

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
    :param int num_masks: masks per size and sequence.
    :param bool exhaustive: enumerate every mask.
    :param int num_samples: prior draws for ``"importance"`` conditionals.
    :param bool share_masks: the same masks for every sequence (see
        :class:`~pyro_mpt.MaskedELBO`); much faster for long low-rank Gaussian sequences.
    :param str masks: ``"auto"`` (default), ``"independent"``, ``"nested"`` or ``"affine"``:
        how the masks of the
        ``T`` sizes of one draw are drawn (see
        :class:`~pyro_mpt.estimators.StratifiedEstimator`); ``"nested"`` scores factorized
        particle models (importance, quadrature, enumeration) by one matrix product per order.
        Not with ``exhaustive``.
    :param int num_particles: deprecated old name of ``num_samples``.
    :returns: :class:`MPTCurve`; with importance conditionals ``area`` is corrected for the
        particles' bias as a whole (``particle_bias``) and ``area_stderr`` includes the
        particles' error and the correction's uncertainty (:mod:`pyro_mpt.particle_error`);
        the per-size ``scores`` and ``stderr`` not.

    The other options are those of :class:`~pyro_mpt.MaskedELBO`.
    """
    num_masks = check_positive_int("num_masks", num_masks)
    exhaustive = check_bool("exhaustive", exhaustive)
    if num_particles is not None:
        check_positive_int("num_particles", num_particles)
    num_samples = renamed_keyword(
        "mpt_curve", "num_particles", "num_samples", num_particles, num_samples, 256
    )
    masks = check_choice("masks", masks, StratifiedEstimator.MASKS)
    if exhaustive and masks not in ("auto", "independent"):
        raise ValueError(f"masks={masks!r} does not apply to exhaustive=True (every mask)")
    estimator = ExhaustiveEstimator() if exhaustive else StratifiedEstimator(masks=masks)
    options = MPTOptions(
        estimator=estimator,
        num_masks=1 if exhaustive else num_masks,
        num_samples=num_samples,
        conditionals=conditionals,
        token_plate=token_plate,
        max_plate_nesting=max_plate_nesting,
        quadrature_points=quadrature_points,
        quadrature_bounds=quadrature_bounds,
        max_elements=max_elements,
        share_masks=share_masks,
    )
    with torch.no_grad(), forget_new_params_on_error():
        layout, scorer, backend = prepare(model, args, kwargs, options, curve=True)
        check_draws_memory(
            "num_masks",
            options.num_masks,
            layout.num_sequences * (layout.num_tokens + 1),
            resolve_max_elements(options.max_elements, layout.device),
            layout.dtype,
        )
        draws, bins = score(
            layout,
            scorer,
            estimator,
            options.num_masks,
            max_elements=options.max_elements,
            by_size=True,
            share_masks=options.share_masks,
        )
        particle_var, _ = particle_terms(scorer, backend, layout, options)
    curve = MPTCurve.from_bins(
        bins,
        draws,
        conditionals=backend.name,
        exhaustive=exhaustive,
        scale=layout.scale,
        share_masks=options.share_masks,
        ragged=layout.present is not None,
    )
    if particle_var is not None:  # importance conditionals: the area's particle error
        if particle_var.bias is not None:  # the area as a whole (the scores are not)
            _, curve.particle_bias, extra = particle_bias_correction(particle_var, layout.scale)
            curve.area = curve.area - curve.particle_bias
            particle_var = (particle_var[0] + extra, particle_var[1])
        variances = [curve.area_stderr**2, particle_var[0]]
        curve.area_dof = satterthwaite_dof(variances, [curve.area_dof, particle_var[1]])
        curve.area_stderr = math.sqrt(sum(variances))
    return curve
