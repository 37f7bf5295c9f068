"""Runs a mask estimator against a conditional backend: the shared engine of
:class:`~pyro_mpt.MaskedELBO` and :func:`~pyro_mpt.mpt_curve`."""

import math
from dataclasses import dataclass

import pyro.poutine as poutine
import torch

from .conditionals import CONDITIONALS, get_conditionals
from .conditionals.base import resolve_max_elements
from .estimators import check_mask_rate, get_estimator
from .tokens import read_layout

__all__ = ["MPTEstimate", "MPTOptions", "prepare", "score"]


@dataclass
class MPTOptions:
    """The options shared by :class:`~pyro_mpt.MaskedELBO` and
    :func:`~pyro_mpt.mpt_curve`, validated on construction."""

    estimator: object = "stratified"
    mask_rate: float = 0.15
    num_masks: int = 1
    num_particles: int = 256
    conditionals: object = "auto"
    token_plate: str = None
    max_plate_nesting: float = float("inf")
    quadrature_points: int = 20
    quadrature_bounds: tuple = (-5.0, 5.0)
    max_elements: int = None
    share_masks: bool = False

    def __post_init__(self):
        self.mask_rate = check_mask_rate(self.mask_rate)
        self.estimator = get_estimator(self.estimator, self.mask_rate)
        if isinstance(self.conditionals, str) and self.conditionals not in {"auto", *CONDITIONALS}:
            raise ValueError(
                f"unknown conditionals {self.conditionals!r}; valid names are "
                f"{['auto'] + sorted(CONDITIONALS)}"
            )
        for name in ("num_masks", "num_particles", "quadrature_points", "max_elements"):
            value = getattr(self, name)
            if name == "max_elements" and value is None:
                continue  # the device's default, resolved once the data's device is known
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        low, high = self.quadrature_bounds
        if not float(low) < float(high):
            raise ValueError(
                f"quadrature_bounds must be (low, high) with low < high, got {self.quadrature_bounds!r}"
            )
        if self.token_plate is not None and not isinstance(self.token_plate, str):
            raise TypeError(f"token_plate must be a plate name (str), got {self.token_plate!r}")


@dataclass
class MPTEstimate:
    r"""A masked estimate of :math:`\sum_n \log p(x_n)`.

    :ivar torch.Tensor total: the estimate (differentiable), subsampling scale applied.
    :ivar torch.Tensor per_sequence: ``(N,)`` each sequence's estimate, averaged over draws.
    :ivar torch.Tensor draws: ``(num_masks, N)`` the independent draws.
    :ivar float stderr: Monte Carlo standard error of ``total`` (NaN with one draw).
    :ivar str estimator: the estimator's name; ``conditionals``: the backend's.

    The draw of a sequence :math:`x_n` with :math:`T` tokens is, for the stratified estimator,
    :math:`\sum_{m=1}^T s(M_m)` with :math:`s(M) = \frac1m\sum_{j\in M}\log p(x_{n,j}\mid
    x_{n,-M})`; ``total`` is :math:`\sum_n` of the mean over draws.

    Example::

        est = MaskedELBO(num_masks=8).estimate(ppca_collapsed, None, X, 2)   # X: (N, T)
        est.total, est.stderr
        est.draws.shape, est.per_sequence.shape                 # (8, N), (N,)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    total: torch.Tensor
    per_sequence: torch.Tensor
    draws: torch.Tensor
    stderr: float
    estimator: str
    conditionals: str
    unbiased: bool


def prepare(model, args, kwargs, options):
    """Traces the model once, reads its token layout and builds the backend's scorer.

    :returns: ``(layout, scorer, backend)``.
    """
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    layout = read_layout(
        trace, token_plate=options.token_plate, max_plate_nesting=options.max_plate_nesting
    )
    backend = get_conditionals(
        options.conditionals,
        layout,
        num_samples=options.num_particles,
        quadrature_points=options.quadrature_points,
        quadrature_bounds=options.quadrature_bounds,
        max_elements=resolve_max_elements(options.max_elements, layout.device),
    )
    scorer = backend.scorer(model, args, kwargs, layout, trace)
    return layout, scorer, backend


def score(layout, scorer, estimator, num_draws, *, max_elements, by_size=False, share_masks=False):
    r"""Scores ``num_draws`` independent draws of ``estimator``'s masks, in chunks of mask
    rows under ``max_elements`` (``None``: the device's default,
    :func:`~pyro_mpt.conditionals.base.resolve_max_elements`).

    With ``share_masks`` every sequence of a draw gets the same masks (still uniform for
    each sequence, so still unbiased, but the sequences' errors are then correlated); some
    backends (low-rank Gaussian) are much faster so.

    :returns: ``(draws, bins)``: ``draws`` ``(num_draws, N)`` the per-sequence estimates;
        ``bins`` ``(num_draws, N, T + 1)`` the weighted scores binned by mask size (entry
        ``m`` estimates :math:`S(m)`), or ``None`` unless ``by_size``.
    """
    N, T = layout.num_sequences, layout.num_tokens
    dtype, device = layout.dtype, layout.device
    max_elements = resolve_max_elements(max_elements, device)
    max_rows = max(1, max_elements // max(1, scorer.row_cost(share_masks)))
    draws = torch.zeros(num_draws, N, dtype=dtype, device=device)
    bins = torch.zeros(num_draws * N * (T + 1), dtype=dtype, device=device) if by_size else None
    seq = torch.arange(N, device=device)
    for batch in estimator.batches(
        1 if share_masks else N, T, num_draws, device=device, dtype=dtype, max_rows=max_rows
    ):
        rows = scorer.row_scores(batch.observed, batch.scored) * batch.weight  # (R, N)
        draws = draws.index_add(0, batch.draw, rows)
        if by_size:
            size = batch.size.expand(rows.shape)
            index = (batch.draw.unsqueeze(-1) * N + seq) * (T + 1) + size
            bins = bins.index_add(0, index.reshape(-1), rows.reshape(-1))
    if by_size:
        bins = bins.reshape(num_draws, N, T + 1)
    return draws, bins


def summarize(draws, layout, estimator, backend, share_masks=False):
    """Turns ``(K, N)`` draws into an :class:`MPTEstimate`."""
    K = draws.shape[0]
    scale = layout.scale
    per_sequence = draws.mean(0)
    total = (scale * per_sequence).sum()
    if K > 1 and share_masks:
        # shared masks correlate the sequences: use the spread of the draws' totals
        var = (draws.detach() * scale).sum(-1).var() / K
        stderr = math.sqrt(float(var))
    elif K > 1:
        var = (scale**2 * draws.detach().var(0)).sum() / K
        stderr = math.sqrt(float(var))
    else:
        stderr = float("nan")
    return MPTEstimate(
        total=total,
        per_sequence=per_sequence,
        draws=draws,
        stderr=stderr,
        estimator=estimator.name,
        conditionals=backend.name,
        unbiased=estimator.unbiased,
    )
