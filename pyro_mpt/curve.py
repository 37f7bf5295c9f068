r"""The masked pre-training curve :math:`m \mapsto S(m)` and its area, the LML estimate."""

import math
from dataclasses import dataclass

import torch

from .estimators import ExhaustiveEstimator, StratifiedEstimator, check_mask_rate
from .scoring import MPTOptions, prepare, score

__all__ = ["MPTCurve", "mpt_curve"]


@dataclass
class MPTCurve:
    r"""Per-size masked scores :math:`S(m)`, summed over sequences.

    :ivar torch.Tensor sizes: ``(T,)`` the mask sizes :math:`m = 1..T`.
    :ivar torch.Tensor scores: ``(T,)`` :math:`S(m) = \sum_n \mathbb E_{|M|=m}[s_n(M)]`.
    :ivar torch.Tensor stderr: ``(T,)`` Monte Carlo standard errors (0 when exhaustive,
        NaN with one mask per size).
    :ivar torch.Tensor per_sequence: ``(N, T)`` :math:`S_n(m)` for every sequence.
    :ivar torch.Tensor area: :math:`\sum_m S(m)`, the estimate of :math:`\log p(X)`.
    :ivar float area_stderr: its standard error.
    :ivar bool exhaustive: whether every mask was enumerated (then exact).

    Example::

        curve = mpt_curve(ppca_collapsed, X, 2, num_masks=8)   # X: (N, T)
        curve.scores.shape, curve.per_sequence.shape           # (T,), (N, T)
        curve.area, curve.fixed_rate_estimate(0.15)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    sizes: torch.Tensor
    scores: torch.Tensor
    stderr: torch.Tensor
    per_sequence: torch.Tensor
    area: torch.Tensor
    area_stderr: float
    exhaustive: bool
    conditionals: str

    @property
    def num_tokens(self):
        return int(self.sizes.shape[0])

    @property
    def mask_rates(self):
        """``(T,)`` the mask rates :math:`m / T`."""
        return self.sizes.to(self.scores.dtype) / self.num_tokens

    def mask_size(self, rate):
        """The mask size a fixed ``rate`` uses: :math:`\\max(1, \\mathrm{round}(rT))`."""
        rate = check_mask_rate(rate)
        return min(self.num_tokens, max(1, round(rate * self.num_tokens)))

    def fixed_rate_estimate(self, rate):
        r"""What a fixed mask rate estimates: :math:`T\,S(\mathrm{round}(rT))`."""
        return self.num_tokens * self.scores[self.mask_size(rate) - 1]

    def fixed_rate_bias(self, rate):
        r""":math:`T\,S(m) - \sum_m S(m)`: the bias of a fixed rate against the area."""
        return self.fixed_rate_estimate(rate) - self.area


def mpt_curve(
    model,
    *args,
    num_masks=1,
    exhaustive=False,
    conditionals="auto",
    num_particles=256,
    token_plate=None,
    max_plate_nesting=float("inf"),
    quadrature_points=20,
    quadrature_bounds=(-5.0, 5.0),
    max_elements=None,
    share_masks=False,
    **kwargs,
):
    r"""The curve :math:`S(m)`, :math:`m = 1..T`, and its area :math:`\sum_m S(m)`, which
    equals :math:`\log p(X)` (Moreno-Muñoz et al. 2023).

    Each :math:`S(m)` averages ``num_masks`` uniform masks of size :math:`m` per sequence
    (drawn independently per sequence and size); ``exhaustive=True`` enumerates all
    :math:`2^T - 1` masks instead and is exact (small ``T``). Computed without gradients.

    Example::

        curve = mpt_curve(model, X, num_masks=8)
        curve.area, curve.area_stderr, curve.fixed_rate_estimate(0.15)

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
    :param int num_masks: masks per size and sequence.
    :param bool exhaustive: enumerate every mask.
    :param bool share_masks: the same masks for every sequence (see
        :class:`~pyro_mpt.MaskedELBO`); much faster for long low-rank Gaussian sequences.
    :returns: :class:`MPTCurve`.

    The other options are those of :class:`~pyro_mpt.MaskedELBO`.

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"num_masks must be an integer >= 1, got {num_masks!r}")
    estimator = ExhaustiveEstimator() if exhaustive else StratifiedEstimator()
    options = MPTOptions(
        estimator=estimator,
        num_masks=1 if exhaustive else num_masks,
        num_particles=num_particles,
        conditionals=conditionals,
        token_plate=token_plate,
        max_plate_nesting=max_plate_nesting,
        quadrature_points=quadrature_points,
        quadrature_bounds=quadrature_bounds,
        max_elements=max_elements,
        share_masks=share_masks,
    )
    with torch.no_grad():
        layout, scorer, backend = prepare(model, args, kwargs, options)
        draws, bins = score(
            layout,
            scorer,
            estimator,
            options.num_masks,
            max_elements=max_elements,
            by_size=True,
            share_masks=share_masks,
        )
    K, T = draws.shape[0], layout.num_tokens
    scale = layout.scale
    bins = bins[..., 1:]  # (K, N, T): sizes 1..T
    per_sequence = bins.mean(0)
    scores = (scale.unsqueeze(-1) * per_sequence).sum(0)
    area = scores.sum()
    if exhaustive:
        stderr = torch.zeros_like(scores)
        area_stderr = 0.0
    elif K > 1 and share_masks:
        # shared masks correlate the sequences: use the spread of the draws' totals
        totals = (scale.unsqueeze(-1) * bins).sum(1)  # (K, T)
        stderr = (totals.var(0) / K).sqrt()
        area_stderr = math.sqrt(float((draws * scale).sum(-1).var() / K))
    elif K > 1:
        stderr = ((scale.unsqueeze(-1) ** 2 * bins.var(0)).sum(0) / K).sqrt()
        area_stderr = math.sqrt(float((scale**2 * draws.var(0)).sum() / K))
    else:
        stderr = torch.full_like(scores, float("nan"))
        area_stderr = float("nan")
    sizes = torch.arange(1, T + 1, device=scores.device)
    return MPTCurve(
        sizes=sizes,
        scores=scores,
        stderr=stderr,
        per_sequence=per_sequence,
        area=area,
        area_stderr=area_stderr,
        exhaustive=exhaustive,
        conditionals=backend.name,
    )
