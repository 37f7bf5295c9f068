r"""Where a mask estimator meets a scorer: the one loop that turns mask rows into estimates.

An estimator (:mod:`pyro_mpt.estimators`) yields chunks of mask rows; a scorer (a
conditional backend's :class:`~pyro_mpt.conditionals.base.Scorer`, or a masked language
model's :class:`~pyro_mpt.mlm.scorer.PredictorScorer`) returns each row's weighted sum of
:math:`\log p(x_{n,j} \mid x_{n,O})` over its scored tokens. :func:`score_masks` adds the
rows into their draws (and, for the curve, into bins by mask size). With exact conditionals
the draws are unbiased for :math:`\log p(x_n) = \sum_{m=1}^{T} S(m)`.

:class:`~pyro_mpt.MaskedELBO` and :func:`~pyro_mpt.mpt_curve` share :class:`MPTOptions`
(validated once, on construction), :func:`prepare` (trace, token layout, backend) and
:func:`score`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .conditionals import CONDITIONALS, get_conditionals
from .conditionals.probe import probe_particles
from .estimate import MPTEstimate
from .estimators import FixedRateEstimator, MaskEstimator, StratifiedEstimator, get_estimator
from .options import (
    check_bool,
    check_choice,
    check_positive_int,
    check_probability,
    renamed_keyword,
    resolve_max_elements,
)
from .progress import logger
from .ragged import ragged_batches
from .tokens import TokenLayout, read_layout
from .tokens.checks import check_bounds, check_plate_options, trace_model
from .tokens.dependencies import check_semantics
from .tokens.subsample import replay_subsample

__all__ = [
    "MPTEstimate",
    "MPTOptions",
    "prepare",
    "score",
    "score_masks",
    "summarize",
    "telescoped_chain",
]


@dataclass
class MPTOptions:
    """The options shared by :class:`~pyro_mpt.MaskedELBO` and
    :func:`~pyro_mpt.mpt_curve`, validated on construction (integers may be NumPy integers).

    :ivar num_samples: prior draws of ``"importance"`` conditionals (``num_particles=`` is
        its deprecated old name).
    :ivar masks: ``"auto"``, ``"independent"``, ``"nested"`` or ``"affine"`` masks of the stratified
        estimator (see :class:`~pyro_mpt.estimators.StratifiedEstimator`); ``None``
        (default): the estimator's own. Only for ``estimator="stratified"``.

    The other fields are the parameters of :class:`~pyro_mpt.MaskedELBO`.
    """

    estimator: object = "stratified"
    mask_rate: float = 0.15
    num_masks: int = 1
    num_samples: int = 256
    conditionals: object = "auto"
    token_plate: str = None
    max_plate_nesting: float = float("inf")
    quadrature_points: int = 20
    quadrature_bounds: tuple = (-5.0, 5.0)
    max_elements: int = None
    share_masks: bool = False
    masks: str = None
    num_particles: dataclasses.InitVar[int] = None

    def __post_init__(self, num_particles):
        if num_particles is not None:
            check_positive_int("num_particles", num_particles)
        self.num_samples = renamed_keyword(
            "MPTOptions", "num_particles", "num_samples", num_particles, self.num_samples, 256
        )
        self.mask_rate = check_probability("mask_rate", self.mask_rate)
        by_name = isinstance(self.estimator, str)
        self.estimator = get_estimator(self.estimator, self.mask_rate)
        if self.masks is not None:
            self.estimator = _with_masks(self.estimator, self.masks, by_name)
        if isinstance(self.conditionals, str):
            check_choice("conditionals", self.conditionals, ["auto", *sorted(CONDITIONALS)])
        for name in ("num_masks", "num_samples", "quadrature_points"):
            setattr(self, name, check_positive_int(name, getattr(self, name)))
        # None: the device's default, resolved once the data's device is known
        self.max_elements = check_positive_int("max_elements", self.max_elements, allow_none=True)
        self.share_masks = check_bool("share_masks", self.share_masks)
        self.quadrature_bounds = check_bounds(self.quadrature_bounds)
        check_plate_options(self.token_plate, self.max_plate_nesting)


def _with_masks(estimator: MaskEstimator, masks: str, by_name: bool) -> StratifiedEstimator:
    """The stratified ``estimator`` with ``masks`` (one of
    :attr:`StratifiedEstimator.MASKS <pyro_mpt.estimators.StratifiedEstimator.MASKS>`;
    ``by_name``: it was given as ``"stratified"``, so it is built with them).

    :raises ValueError: naming ``masks`` for another choice, another estimator, or a
        stratified instance built with other masks.
    """
    check_choice("masks", masks, StratifiedEstimator.MASKS)
    if not isinstance(estimator, StratifiedEstimator):
        raise ValueError(
            f"masks={masks!r} applies to estimator='stratified' only, got {estimator!r}"
        )
    if by_name:
        return StratifiedEstimator(masks=masks)
    if estimator.masks != masks:
        raise ValueError(f"masks={masks!r} contradicts the estimator {estimator!r}")
    return estimator


def prepare(model, args, kwargs, options: MPTOptions, *, curve: bool = False):
    """Traces the model once, reads its token layout and builds the backend's scorer.

    :param bool curve: the masked averages :math:`S(m)` themselves are wanted (the curve),
        so a model whose observed tokens are parents of other tokens is refused
        (:mod:`pyro_mpt.tokens.dependencies`), as it is for ``estimator="fixed"``.
    :returns: ``(layout, scorer, backend)``.
    """
    trace = trace_model(model, args, kwargs)
    model = replay_subsample(model, trace)  # one subsample per call, in every trace
    layout = read_layout(
        trace, token_plate=options.token_plate, max_plate_nesting=options.max_plate_nesting
    )
    backend = get_conditionals(
        options.conditionals,
        layout,
        options.num_samples,  # the backend's prior draws (positional: renamed upstream)
        quadrature_points=options.quadrature_points,
        quadrature_bounds=options.quadrature_bounds,
        max_elements=resolve_max_elements(options.max_elements, layout.device),
        model_call=(model, args, kwargs, trace),
    )
    fixed_rate = isinstance(options.estimator, FixedRateEstimator)
    refuse = "mpt_curve" if curve else "estimator='fixed'" if fixed_rate else None
    check_semantics(model, args, kwargs, trace, layout, refuse)
    logger.debug("pyro_mpt: conditionals %r for %d latent site(s)", backend, len(layout.latents))
    if backend.draws_latents:  # a model not vectorised over particles fails now, clearly
        probe_particles(model, args, kwargs, layout, trace)
    scorer = backend.scorer(model, args, kwargs, layout, trace)
    return layout, scorer, backend


def score_masks(
    scorer,
    estimator: MaskEstimator,
    num_draws: int,
    *,
    num_sequences: int,
    num_tokens: int,
    dtype: torch.dtype,
    device,
    max_elements: int | None = None,
    by_size: bool = False,
    share_masks: bool = False,
    generator: torch.Generator | None = None,
    present: torch.Tensor | None = None,
):
    r"""Scores ``num_draws`` independent draws of ``estimator``'s masks for ``N =
    num_sequences`` sequences of ``T = num_tokens`` tokens, in chunks of mask rows whose
    ``scorer.row_cost`` stays under ``max_elements`` (``None``: the device's default).

    A draw of sequence :math:`n` is :math:`\sum_r w_{r,n} \sum_{j \in \mathrm{scored}_r}
    \log p(x_{n,j} \mid x_{n,O_r})` over its rows :math:`r`, the row sums coming from
    ``scorer.row_scores(observed, scored) -> (R, N)``.

    :param bool share_masks: every sequence of a draw gets the same masks (still uniform for
        each sequence, so still unbiased, but the sequences' errors are then correlated).
    :param generator: the random generator of the masks (``None``: torch's global one).
    :param present: bool ``(N, T)``, the tokens Pyro's masks keep (``None``: all); masks
        are then drawn over each sequence's present tokens (:mod:`pyro_mpt.ragged`), never
        shared, and the order path is not taken.
    :returns: ``(draws, bins)``: ``draws`` ``(num_draws, N)``; ``bins`` ``(num_draws, N, T +
        1)`` the weighted row scores binned by mask size (entry ``m`` estimates
        :math:`S(m)`), or ``None`` unless ``by_size``.

    Two shortcuts skip the rows, with the same values: a chain draw
    (``estimator.chain_rule``) of a scorer that ``telescopes`` is :func:`telescoped_chain`
    (no rows, no random order) unless ``by_size``; an estimator whose rows are the prefixes
    of one order per draw (``estimator.orders``, the nested stratified masks) and a scorer
    that ``scores_orders`` give every row of an order at once (``scorer.suffix_scores``;
    should that underflow, rows are scored for freshly drawn masks).
    """
    N, T = num_sequences, num_tokens
    if estimator.chain_rule and hasattr(scorer, "chain_draws") and not by_size:
        # a scorer that runs whole orders (SMC) gives each chain draw from one sweep
        return scorer.chain_draws(num_draws, share_masks), None
    if estimator.chain_rule and getattr(scorer, "telescopes", False) and not by_size:
        return telescoped_chain(scorer, num_draws, N, T, device=device, present=present), None
    ranks = None
    if getattr(scorer, "scores_orders", False) and present is None:
        shape = (1 if share_masks else N, T, num_draws)
        ranks = estimator.orders(*shape, device=device, generator=generator)
    if ranks is not None:
        suffix = scorer.suffix_scores(ranks, resolve_max_elements(max_elements, device))
        if suffix is not None:
            return _order_draws(
                suffix, estimator.order_weight(T, dtype=dtype, device=device), by_size
            )
    max_elements = resolve_max_elements(max_elements, device)
    max_rows = max(1, max_elements // max(1, scorer.row_cost(share_masks)))
    logger.debug("pyro_mpt: %d mask row(s) per chunk (max_elements=%d)", max_rows, max_elements)
    draws = torch.zeros(num_draws, N, dtype=dtype, device=device)
    bins = torch.zeros(num_draws * N * (T + 1), dtype=dtype, device=device) if by_size else None
    seq = torch.arange(N, device=device)
    if present is not None:  # ragged: every sequence its own masks over its present tokens
        batches = ragged_batches(
            estimator, present, num_draws, dtype=dtype, max_rows=max_rows, generator=generator
        )
    else:
        batches = estimator.batches(
            1 if share_masks else N,
            T,
            num_draws,
            device=device,
            dtype=dtype,
            max_rows=max_rows,
            generator=generator,
        )
    for batch in batches:
        rows = scorer.row_scores(batch.observed, batch.scored) * batch.weight  # (R, N)
        draws = draws.index_add(0, batch.draw, rows)
        if by_size:
            size = batch.size.expand(rows.shape)
            index = (batch.draw.unsqueeze(-1) * N + seq) * (T + 1) + size
            bins = bins.index_add(0, index.reshape(-1), rows.reshape(-1))
    if by_size:
        bins = bins.reshape(num_draws, N, T + 1)
    return draws, bins


def _order_draws(suffix: torch.Tensor, weight: torch.Tensor, by_size: bool):
    r"""``(draws, bins)`` of ``(D, N, T)`` suffix sums of orders: row ``k`` (the first ``k``
    tokens observed) is the mask of size ``T - k`` with weight ``weight[k]``."""
    rows = suffix * weight  # (D, N, T)
    bins = None
    if by_size:  # size T - k: bins[..., m] = rows[..., T - m], bin 0 empty
        bins = torch.cat([rows.new_zeros(*rows.shape[:-1], 1), rows.flip(-1)], -1)
    return rows.sum(-1), bins


def telescoped_chain(
    scorer, num_draws: int, N: int, T: int, *, device, present: torch.Tensor | None = None
) -> torch.Tensor:
    r"""``(num_draws, N)``: the chain estimate of a scorer that ``telescopes``, the same for
    every order :math:`\pi`,

    .. math:: \sum_{k=1}^{T} \log p(x_{\pi_k} \mid x_{\pi_{<k}})
        = \sum_{k=1}^{T} \big(\log p(x_{\pi_{\le k}}) - \log p(x_{\pi_{<k}})\big)
        = \log p(x_{1..T}) - \log p(x_\emptyset),

    exact (not an approximation of the row path): the scorer's conditionals are ratios of
    its own evidences (``scorer.log_evidence``), so the sum telescopes term by term. The
    last term is 0 for exact evidence and :math:`\operatorname{LSE}_s \log w^0_s` for
    weighted particles. Two evidence rows instead of ``T`` conditional rows per draw.
    With ``present`` (``(N, T)`` bool) the order runs over the present tokens only.
    """
    everything = torch.ones(1, N, T, dtype=torch.bool, device=device)
    nothing = torch.zeros_like(everything)
    if present is not None:
        everything = present.unsqueeze(0)
    evidence = scorer.log_evidence(torch.cat([everything, nothing]))  # (2, N)
    return (evidence[0] - evidence[1]).expand(num_draws, N).clone()


def score(
    layout: TokenLayout,
    scorer,
    estimator: MaskEstimator,
    num_draws: int,
    *,
    max_elements: int | None,
    by_size: bool = False,
    share_masks: bool = False,
):
    """:func:`score_masks` for a Pyro model's token layout (its sequences, tokens, dtype
    and device).

    :returns: ``(draws, bins)`` as :func:`score_masks`.
    """
    return score_masks(
        scorer,
        estimator,
        num_draws,
        num_sequences=layout.num_sequences,
        num_tokens=layout.num_tokens,
        dtype=layout.dtype,
        device=layout.device,
        max_elements=max_elements,
        by_size=by_size,
        share_masks=share_masks,
        present=layout.present,
    )


def summarize(
    draws, layout, estimator, backend, share_masks=False, particle_var=None
) -> MPTEstimate:
    """Turns ``(K, N)`` draws into an :class:`MPTEstimate` (the layout's subsampling scale
    applied; ``particle_var``: see ``MPTEstimate.from_draws``)."""
    return MPTEstimate.from_draws(
        draws,
        estimator,
        backend.name,
        scale=layout.scale,
        share_masks=share_masks,
        particle_var=particle_var,
    )
