r"""Mask estimators: each draws boolean masks and the weights that turn masked scores into an
estimate of :math:`\log p(x)`.

For a mask :math:`M` of :math:`m` tokens and :math:`O` the tokens conditioned on, the masked
score is :math:`s(M) = \frac1m \sum_{j\in M}\log p(x_j\mid x_O)` and
:math:`S(m) = \mathbb E_{|M|=m}[s(M)]`. The identity of Moreno-Muñoz et al. (2023) is

.. math:: \log p(x) = \sum_{m=1}^{T} S(m).

An estimator only makes masks; a conditional backend
(:mod:`pyro_mpt.conditionals`) scores them. Masks are drawn independently for every
sequence. Each chunk of masks is a :class:`MaskBatch` of ``R`` rows; row ``r`` of sequence
``n`` contributes ``weight[r, n] * sum_t scored[r, n, t] * log p(x_{n,t} | x_{n,O})`` to its
draw's estimate.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

import math
from dataclasses import dataclass
from itertools import combinations

import torch

from .options import check_choice, check_probability

__all__ = [
    "ESTIMATORS",
    "ChainEstimator",
    "ExhaustiveEstimator",
    "FixedRateEstimator",
    "MaskBatch",
    "MaskEstimator",
    "StratifiedEstimator",
    "UniformEstimator",
    "get_estimator",
]

#: The largest ``T`` for which :class:`ExhaustiveEstimator` enumerates all ``2^T - 1`` masks.
MAX_EXHAUSTIVE_TOKENS = 16


@dataclass
class MaskBatch:
    """A chunk of ``R`` mask rows for ``N`` sequences of ``T`` tokens.

    :ivar torch.Tensor observed: bool ``(R, N, T)``, the conditioning set :math:`O`.
    :ivar torch.Tensor scored: bool ``(R, N, T)``, the tokens :math:`j` whose
        :math:`\\log p(x_j \\mid x_O)` is scored; disjoint from ``observed``.
    :ivar torch.Tensor weight: ``(R, N)``, the weight of each scored log-probability.
    :ivar torch.Tensor size: long ``(R, N)``, the mask size :math:`m = T - |O|` a row stands
        for (the curve bins by it).
    :ivar torch.Tensor draw: long ``(R,)``, the independent draw each row belongs to.

    Example::

        batch = next(iter(StratifiedEstimator().batches(2, 5, 1, device="cpu",
                                                       dtype=torch.float64, max_rows=100)))
        batch.observed.shape, batch.weight.shape    # (5, 2, 5), (5, 2)
    """

    observed: torch.Tensor
    scored: torch.Tensor
    weight: torch.Tensor
    size: torch.Tensor
    draw: torch.Tensor


def _random_ranks(shape, T, device, generator=None):
    """A uniformly random permutation of ``range(T)`` for every leading index: ``ranks[..., t]``
    is the position of token ``t`` (argsort of i.i.d. uniforms is a uniform permutation)."""
    return torch.rand(*shape, T, device=device, generator=generator).argsort(-1)


def _row_chunks(num_rows, max_rows):
    for start in range(0, num_rows, max_rows):
        yield start, min(num_rows, start + max_rows)


class MaskEstimator:
    """Base class. Subclasses implement :meth:`batches`.

    :cvar str name: the registry name.
    :cvar bool unbiased: whether the expectation of the estimate is :math:`\\log p(x)` (given
        exact conditionals).
    :cvar bool chain_rule: whether every draw is the chain rule along one order (its rows
        score each token once, conditioned on the tokens before it); then a scorer that
        :attr:`~pyro_mpt.conditionals.base.Scorer.telescopes` gives the draw without rows.

    :meth:`batches` yields :class:`MaskBatch` chunks; a draw's estimate for sequence :math:`n`
    is :math:`\\sum_r w_{r,n} \\sum_{j \\in \\mathrm{scored}_r} \\log p(x_{n,j} \\mid x_{n,O_r})`
    over its rows :math:`r`.

    Example::

        est = get_estimator("stratified")
        batch = next(iter(est.batches(N, T, 1, device="cpu", dtype=torch.float64, max_rows=1024)))
        batch.observed.shape                        # (R, N, T)
    """

    name = None
    unbiased = True
    chain_rule = False

    def rows_per_draw(self, T):
        """The number of mask rows one draw needs for ``T`` tokens."""
        raise NotImplementedError

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        """Yields :class:`~pyro_mpt.estimators.MaskBatch` chunks of at most ``max_rows`` rows covering
        ``num_draws`` independent draws for ``N`` sequences of ``T`` tokens."""
        raise NotImplementedError

    def orders(self, N, T, num_draws, *, device, generator=None):
        """For an estimator whose rows are the prefixes of one random order per draw and
        sequence: long ``(num_draws, N, T)`` ranks (the position of each token), drawn as
        :meth:`batches` would draw them; row ``k`` of the order observes its first ``k``
        tokens, scores the others and has weight ``order_weight[k]``. ``None`` (default):
        the rows are not of that form."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}()"


class UniformEstimator(MaskEstimator):
    r"""One mask per draw: :math:`m \sim \mathcal U\{1..T\}`, :math:`M` uniform of size
    :math:`m`, estimate :math:`T\,s(M)`. Unbiased: :math:`\mathbb E[T s(M)] = \sum_m S(m)`.

    Example::

        MaskedELBO(estimator=UniformEstimator())    # same as estimator="uniform"
    """

    name = "uniform"

    def rows_per_draw(self, T):
        return 1

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        for start, stop in _row_chunks(num_draws, max_rows):
            R = stop - start
            size = torch.randint(1, T + 1, (R, N), device=device, generator=generator)
            scored = _random_ranks((R, N), T, device, generator) < size.unsqueeze(-1)
            weight = T / size.to(dtype)
            draw = torch.arange(start, stop, device=device)
            yield MaskBatch(~scored, scored, weight, size, draw)


class FixedRateEstimator(MaskEstimator):
    r"""BERT-style fixed rate :math:`r`: :math:`m = \max(1, \mathrm{round}(rT))`, estimate
    :math:`T\,s(M)`. Its expectation is :math:`T\,S(m)`, **not** :math:`\log p(x)`; the
    bias :math:`T S(m) - \log p(x)` depends on the model and the data.

    :param float mask_rate: in :math:`(0, 1]`.

    Example::

        MaskedELBO(estimator=FixedRateEstimator(0.15))   # same as estimator="fixed", mask_rate=0.15
    """

    name = "fixed"
    unbiased = False

    def __init__(self, mask_rate=0.15):
        self.mask_rate = check_mask_rate(mask_rate)

    def mask_size(self, T):
        return min(T, max(1, round(self.mask_rate * T)))

    def rows_per_draw(self, T):
        return 1

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        m = self.mask_size(T)
        for start, stop in _row_chunks(num_draws, max_rows):
            R = stop - start
            scored = _random_ranks((R, N), T, device, generator) < m
            weight = torch.full((R, N), T / m, dtype=dtype, device=device)
            size = torch.full((R, N), m, device=device)
            draw = torch.arange(start, stop, device=device)
            yield MaskBatch(~scored, scored, weight, size, draw)

    def __repr__(self):
        return f"FixedRateEstimator(mask_rate={self.mask_rate})"


class StratifiedEstimator(MaskEstimator):
    r"""The paper's estimator: for every :math:`m = 1..T` one uniform mask :math:`M_m` of
    size :math:`m`; estimate :math:`\sum_m s(M_m)`. Unbiased, ``T`` masks per draw.

    :param str masks: how the ``T`` masks of a draw (and sequence) are drawn; each is a
        uniform ``m``-subset whatever the choice, so the estimate is unbiased; the choice
        changes the masks' dependence (the variance) and the cost.

        - ``"auto"`` (default): ``"affine"``, or ``"independent"`` for ragged sequences
          (:mod:`pyro_mpt.ragged`): affine masks have the variance of independent ones at a
          lower cost (docs/benchmarks.rst, ``benchmarks/bench_nested_masks.py``).
        - ``"independent"``: one random order per mask (an argsort of
          ``(num_draws T, N, T)`` random keys per call).
        - ``"nested"``: ONE random order :math:`\pi` per draw,
          :math:`M_m = \{\pi_{T-m+1}, \dots, \pi_T\}` (the first :math:`T - m` tokens
          observed), so :math:`M_1 \subset M_2 \subset \dots`; an argsort of ``(num_draws, N,
          T)`` keys. Particle scorers with factorized tokens score all ``T`` masks of an order
          by one matrix product (:mod:`pyro_mpt.conditionals.orders`), exact Gaussian
          kernels by one factor per order (:mod:`pyro_mpt.conditionals.gaussian_orders`).
        - ``"affine"``: one random order (its ranks :math:`\rho_t`) per draw, and per mask an
          independent uniform affine map of :math:`\mathbb Z_T`,
          :math:`M_m = \{t : (a_m \rho_t + c_m) \bmod T < m\}` with :math:`a_m` a unit of
          :math:`\mathbb Z_T` and :math:`c_m \in \mathbb Z_T`. Given :math:`(a_m, c_m)` the
          map is a fixed bijection, so :math:`M_m` is the first ``m`` of a uniform order: a
          uniform ``m``-subset. With :math:`c_m` uniform and independent across sizes, two
          masks share :math:`m m' / T` tokens on average, as independent masks do (nested
          ones share :math:`\min(m, m')`), so the variance is close to that of independent
          masks; the keys are those of ``"nested"`` plus two integers per mask.

    Example::

        MaskedELBO(estimator=StratifiedEstimator(), num_masks=4)   # same as estimator="stratified"
        MaskedELBO(estimator=StratifiedEstimator(masks="nested"))  # one order per draw
    """

    name = "stratified"

    #: the kinds of masks
    MASKS = ("auto", "independent", "nested", "affine")

    def __init__(self, masks="auto"):
        self.masks = check_choice("masks", masks, self.MASKS)

    @property
    def nested(self):
        """Whether the masks of a draw are the suffixes of one order."""
        return self.masks == "nested"

    @property
    def resolved_masks(self):
        """The kind of masks drawn when every token is present (``"auto"`` is affine)."""
        return "affine" if self.masks == "auto" else self.masks

    def rows_per_draw(self, T):
        return T

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        masks = self.resolved_masks
        if masks != "independent":
            # ranks[d, n, t]: the position of token t in the order of draw d, sequence n
            ranks = _random_ranks((num_draws, N), T, device, generator)
        if masks == "affine":  # every mask's map, drawn before any chunk
            units = torch.arange(1, T + 1, device=device)
            units = units[torch.gcd(units, torch.tensor(T, device=device)) == 1]
            shape = (num_draws * T, N, 1)
            a = units[torch.randint(len(units), shape, device=device, generator=generator)]
            c = torch.randint(T, shape, device=device, generator=generator)
        for start, stop in _row_chunks(num_draws * T, max_rows):
            rows = torch.arange(start, stop, device=device)
            m = (rows % T + 1).unsqueeze(-1).expand(-1, N)
            if masks == "independent":
                scored = _random_ranks((stop - start, N), T, device, generator) < m.unsqueeze(-1)
            elif masks == "nested":  # materialised chunk by chunk: observed = rank < T - m
                scored = ranks[rows // T] >= (T - m).unsqueeze(-1)
            else:
                image = ranks[rows // T] * a[start:stop] + c[start:stop]
                scored = image % T < m.unsqueeze(-1)
            yield MaskBatch(~scored, scored, 1.0 / m.to(dtype), m, rows // T)

    def orders(self, N, T, num_draws, *, device, generator=None):
        if not self.nested:
            return None
        return _random_ranks((num_draws, N), T, device, generator)

    @staticmethod
    def order_weight(T, *, dtype, device):
        """``(T,)``: row ``k`` of an order (the first ``k`` tokens observed) is the mask of
        size ``T - k``, weight ``1 / (T - k)``."""
        return 1.0 / torch.arange(T, 0, -1, dtype=dtype, device=device)

    def __repr__(self):
        return f"StratifiedEstimator(masks={self.masks!r})"


class ChainEstimator(MaskEstimator):
    r"""One random order :math:`\pi` per draw:
    :math:`\sum_i \log p(x_{\pi_i} \mid x_{\pi_{<i}})`. The chain rule makes it exactly
    :math:`\log p(x)` for exact conditionals (zero variance); with self-normalised
    importance conditionals it telescopes to the per-sequence importance estimate.
    Row ``i`` conditions on the first ``i`` tokens of :math:`\pi` and scores the next; the
    tokens after it are marginalised, not observed.

    Example::

        mpt_estimate = MaskedELBO(estimator=ChainEstimator()).estimate(model, None, X)
    """

    name = "chain"
    chain_rule = True

    def rows_per_draw(self, T):
        return T

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        # The order must be shared by the T rows of a draw, so draw all orders first.
        ranks = _random_ranks((num_draws, N), T, device, generator)
        for start, stop in _row_chunks(num_draws * T, max_rows):
            rows = torch.arange(start, stop, device=device)
            r = ranks[rows // T]  # (R, N, T)
            i = (rows % T).view(-1, 1, 1)
            observed = r < i
            scored = r == i
            weight = torch.ones(stop - start, N, dtype=dtype, device=device)
            size = (T - rows % T).unsqueeze(-1).expand(-1, N)
            yield MaskBatch(observed, scored, weight, size, rows // T)


class ExhaustiveEstimator(MaskEstimator):
    r"""Every non-empty mask, weighted :math:`1/(m\binom{T}{m})`: returns
    :math:`\sum_m S(m)` exactly (no randomness). ``2^T - 1`` rows per draw: small ``T`` only
    (at most ``MAX_EXHAUSTIVE_TOKENS``). Every one of ``num_draws`` draws enumerates the
    same masks, so each draw is exact and their spread is 0; one draw is enough.

    Example::

        mpt_curve(model, X, exhaustive=True).area   # uses it; X: (N, T) with T <= 16
    """

    name = "exhaustive"

    def rows_per_draw(self, T):
        return 2**T - 1

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        if T > MAX_EXHAUSTIVE_TOKENS:
            raise ValueError(
                f"the exhaustive estimator enumerates 2^T - 1 masks; T = {T} tokens is more than "
                f"{MAX_EXHAUSTIVE_TOKENS}: use estimator='stratified' with num_masks > 1"
            )
        all_masks = [
            [t in subset for t in range(T)]
            for m in range(1, T + 1)
            for subset in combinations(range(T), m)
        ]
        masks = torch.tensor(all_masks, dtype=torch.bool, device=device)
        sizes = masks.sum(-1)
        counts = torch.tensor([math.comb(T, int(m)) for m in range(T + 1)], dtype=dtype)
        weight_by_size = 1.0 / (torch.arange(T + 1, dtype=dtype).clamp(min=1) * counts)
        weights = weight_by_size.to(device)[sizes]
        R0 = masks.shape[0]
        # every draw enumerates the same masks (each draw is exact); one chunk never spans
        # two draws, so a single draw chunks exactly as before
        for d in range(num_draws):
            for start, stop in _row_chunks(R0, max_rows):
                scored = masks[start:stop].unsqueeze(1).expand(-1, N, -1)
                size = sizes[start:stop].unsqueeze(1).expand(-1, N)
                weight = weights[start:stop].unsqueeze(1).expand(-1, N)
                draw = torch.full((stop - start,), d, dtype=torch.long, device=device)
                yield MaskBatch(~scored, scored, weight, size, draw)


#: The estimators by name.
ESTIMATORS = {
    cls.name: cls
    for cls in (
        UniformEstimator,
        StratifiedEstimator,
        ChainEstimator,
        FixedRateEstimator,
        ExhaustiveEstimator,
    )
}


def check_mask_rate(mask_rate):
    """``mask_rate`` as a float in :math:`(0, 1]`.

    :raises ValueError: naming ``mask_rate`` and the value received.
    """
    return check_probability("mask_rate", mask_rate)


def get_estimator(estimator, mask_rate=None):
    """Looks an estimator up by name (or passes an instance through).

    :param estimator: a name in :data:`ESTIMATORS` or a :class:`MaskEstimator`.
    :param float mask_rate: the rate of ``"fixed"``; ignored by the others.
    :returns: a :class:`MaskEstimator` instance.
    :raises ValueError: for an unknown name.

    Example::

        get_estimator("fixed", mask_rate=0.5)      # FixedRateEstimator(mask_rate=0.5)
    """
    if isinstance(estimator, MaskEstimator):
        return estimator
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid names are {sorted(ESTIMATORS)}")
    if estimator == "fixed":
        return FixedRateEstimator(0.15 if mask_rate is None else mask_rate)
    return ESTIMATORS[estimator]()
