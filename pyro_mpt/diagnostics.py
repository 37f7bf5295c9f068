r"""Diagnostics of importance weights: effective sample size and Pareto :math:`\hat k`.

For log-weights :math:`\log w_s`, :math:`s = 1..S`, of an importance sampler
(:math:`w_s = p(x, z_s) / q(z_s)`, :math:`z_s \sim q`):

- the effective sample size (Kish) :math:`\mathrm{ESS} = (\sum_s w_s)^2 / \sum_s w_s^2`,
  between 1 and :math:`S`;
- the Pareto :math:`\hat k`: the shape of a generalized Pareto distribution fitted to the
  largest weights. The variance of the weights is finite for :math:`k < 1/2` and their
  mean exists for :math:`k < 1`; Vehtari et al. (2024) show that the estimate can be trusted
  for :math:`\hat k < \min(1 - 1/\log_{10} S,\ 0.7)` (:func:`khat_threshold`), the rule
  ArviZ applies.

:math:`\hat k` is ArviZ's own estimate (:func:`arviz.psislw`, whose generalized Pareto fit,
:func:`pyro_mpt.compat.generalized_pareto_fit`, is the empirical-Bayes fit of Zhang & Stephens (2009) with
ArviZ's weakly informative prior on :math:`k`). When the weights are too many to keep,
:func:`pareto_khat_from_tail` gives the same number from the :math:`M + 1` largest
log-weights only (:func:`tail_size`), which a streaming sampler keeps with a running top-k.

References

[1] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
Sampling", Journal of Machine Learning Research 25(72):1-58, 2024.

[2] J. Zhang, M. A. Stephens, "A New and Efficient Estimation Method for the Generalized
Pareto Distribution", Technometrics 51(3):316-325, 2009.

[3] L. Kish, "Survey Sampling", Wiley, 1965 (the effective sample size).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .compat import generalized_pareto_fit, import_arviz

__all__ = [
    "effective_sample_size",
    "gpdfit",
    "khat_threshold",
    "merge_tail",
    "pareto_khat",
    "pareto_khat_from_tail",
    "tail_size",
]


def khat_threshold(num_samples: int) -> float:
    r"""ArviZ's threshold on Pareto :math:`\hat k` for ``num_samples`` draws:
    :math:`\min(1 - 1/\log_{10} S,\ 0.7)` (Vehtari et al. 2024, section 3.2.4). Below it the
    importance-sampling estimate is reliable. Negative for :math:`S < 10` (no estimate
    from so few draws is trusted).

    :param int num_samples: :math:`S`.
    :rtype: float

    Example::

        khat_threshold(4096)                       # 0.7
        khat_threshold(100)                        # 0.5
    """
    S = int(num_samples)
    if S < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    if S == 1:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(S), 0.7)


def effective_sample_size(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Kish's effective sample size of importance weights,

    .. math:: \mathrm{ESS} = \frac{\big(\sum_s w_s\big)^2}{\sum_s w_s^2}
        = \exp\big(2\,\mathrm{LSE}_s \log w_s - \mathrm{LSE}_s\, 2\log w_s\big),

    computed in log space (no overflow for any scale of the weights).

    :param torch.Tensor log_weights: log-weights, the draws along ``dim``.
    :param int dim: the draws' dimension (default 0: ``(S, N)`` gives ``(N,)``).
    :returns: a tensor without ``dim``, between 1 and :math:`S` (NaN where every weight is 0).

    Example::

        ess = effective_sample_size(ref.log_weights)   # (S, N) -> (N,)
        (ess < 100).any()
    """
    lw = torch.as_tensor(log_weights)
    return torch.exp(2 * torch.logsumexp(lw, dim) - torch.logsumexp(2 * lw, dim))


def tail_size(num_samples: int) -> int:
    r"""The number :math:`M = \lceil \min(S/5,\ 3\sqrt S) \rceil` of largest weights to which
    PSIS fits the generalized Pareto distribution (ArviZ's ``psislw`` with ``reff=1``). The
    fit uses the exceedances over the :math:`(M+1)`-th largest weight, so a streaming sampler
    keeps the :math:`M + 1` largest log-weights.

    :param int num_samples: :math:`S`.
    :rtype: int

    Example::

        tail_size(4096)                            # 192 = ceil(min(819.2, 192))
    """
    S = int(num_samples)
    return int(np.ceil(min(S / 5.0, 3 * S**0.5)))


def merge_tail(
    tail: torch.Tensor | None, log_weights: torch.Tensor, k: int, dim: int = 0
) -> torch.Tensor:
    """Streaming top-k: the ``k`` largest of ``tail`` and ``log_weights`` along ``dim``
    (``tail`` may be ``None`` on the first chunk). Stays on the tensors' device; no host
    synchronisation.

    :param tail: ``(K', N)`` (with ``dim=0``) the tail kept so far, or ``None``.
    :param torch.Tensor log_weights: ``(S_c, N)`` a new chunk of log-weights.
    :param int k: the number to keep, e.g. ``tail_size(S) + 1``.
    :returns: ``(min(k, K' + S_c), N)``, the largest along ``dim`` (in no particular order).

    Example::

        tail = None
        for chunk in chunks:                       # each (S_c, N)
            tail = merge_tail(tail, chunk, tail_size(S) + 1)
        khat = pareto_khat_from_tail(tail, S)      # (N,)
    """
    both = log_weights if tail is None else torch.cat([tail, log_weights], dim)
    k = min(k, both.shape[dim])
    return torch.topk(both, k, dim=dim, sorted=False).values


def _khat_1d(x_desc: np.ndarray, num_samples: int) -> float:
    """k-hat of one sequence from its largest log-weights ``x_desc`` (float64, sorted
    descending, the ``M + 1`` largest or all ``S``), exactly as ArviZ's ``_psislw`` computes
    it from all the weights."""
    S = num_samples
    M = tail_size(S)
    if not np.isfinite(x_desc[0]):  # NaN weights, or every weight zero
        return math.nan
    x = x_desc - x_desc[0]
    if len(x) == S and x[-1] == 0.0:
        return -math.inf  # all weights equal: bounded, the estimate is exact
    if S < 2 or len(x) < M + 1:
        return math.inf
    xcutoff = max(x[M], np.log(np.finfo(float).tiny))
    tail = x[x > xcutoff]
    if len(tail) <= 4:  # too few tail draws for the fit: ArviZ returns inf
        return math.inf
    tail = np.sort(np.exp(tail) - np.exp(xcutoff))
    with np.errstate(all="ignore"):
        k, _ = generalized_pareto_fit(tail)
    return float(k)


#: Elements of the ``(rows, m, n)`` intermediate of one batch of :func:`gpdfit`.
_GPDFIT_ELEMENTS = 2**25


def gpdfit(
    exceedances: torch.Tensor, max_elements: int = _GPDFIT_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""ArviZ's generalized Pareto fit, batched over rows: a line-by-line port of
    :func:`pyro_mpt.compat.generalized_pareto_fit` (the empirical-Bayes estimate of Zhang &
    Stephens (2009) with ArviZ's prior: ``prior_bs = 3``, ``prior_k = 10``) to torch, so that thousands of
    sequences are fitted in one pass on their device. Tested equal to ArviZ's function.

    With :math:`x_{(1)} \le \dots \le x_{(n)}` one row, :math:`m = 30 + \lfloor\sqrt n\rfloor`
    candidates :math:`b_j = 1/x_{(n)} + (1 - \sqrt{m/(j - 1/2)})/(3\,x_{(\lfloor n/4 + 1/2\rfloor)})`,
    profile :math:`k(b) = \overline{\log(1 - b x)}`, weights
    :math:`w_j \propto 1/\sum_i e^{\ell_i - \ell_j}`,
    :math:`\ell_j = n(\log(-b_j/k(b_j)) - k(b_j) - 1)` (negligible ones dropped),
    :math:`\hat b = \sum_j w_j b_j`, :math:`\hat k = k(\hat b)`, :math:`\sigma = -\hat k/\hat b`,
    and :math:`\hat k` shrunk to :math:`(n\hat k + 5)/(n + 10)`.

    :param torch.Tensor exceedances: ``(R, n)``, each row sorted ascending, positive.
    :param int max_elements: rows are fitted in batches whose ``(rows, m, max(m, n))``
        intermediates (about three alive at once) stay under this many elements.
    :returns: ``(k, sigma)``, each ``(R,)``.

    Example::

        k, sigma = gpdfit(torch.sort(exceedances, dim=-1).values)   # (R, n) -> (R,), (R,)
    """
    x = exceedances
    R, n = x.shape
    prior_bs, prior_k = 3.0, 10.0
    m = 30 + int(n**0.5)
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    b0 = 1 - torch.sqrt(m / (j - 0.5))  # (m,)
    eps = torch.finfo(x.dtype).eps
    ks, sigmas = [], []
    step = max(1, max_elements // (3 * m * max(m, n)))
    for rows in x.split(step):
        b = b0 / (prior_bs * rows[:, int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)])
        b = b + 1 / rows[:, -1:]  # (r, m)
        k = torch.log1p(-b.unsqueeze(-1) * rows.unsqueeze(1)).mean(-1)  # (r, m)
        ell = n * (torch.log(-(b / k)) - k - 1)
        w = 1 / torch.exp(ell.unsqueeze(-2) - ell.unsqueeze(-1)).sum(-1)
        w = torch.where(w >= 10 * eps, w, torch.zeros_like(w))  # ArviZ drops them
        w = w / w.sum(-1, keepdim=True)
        b_post = (b * w).sum(-1)
        k_post = torch.log1p(-b_post.unsqueeze(-1) * rows).mean(-1)
        sigmas.append(-k_post / b_post)
        ks.append((n * k_post + prior_k * 0.5) / (n + prior_k))
    return torch.cat(ks), torch.cat(sigmas)


def pareto_khat_from_tail(
    tail: torch.Tensor | np.ndarray,
    num_samples: int,
    dim: int = 0,
    max_elements: int = _GPDFIT_ELEMENTS,
) -> torch.Tensor | np.ndarray:
    r"""Pareto :math:`\hat k` per sequence from the :math:`M + 1` largest log-weights of each
    (:func:`tail_size`, :func:`merge_tail`), the same number ArviZ's :func:`~arviz.psislw`
    computes from all :math:`S` log-weights.

    With :math:`x_{(1)} \ge x_{(2)} \ge \dots` the sorted log-weights, ArviZ fits the
    generalized Pareto distribution to the exceedances
    :math:`e^{x_{(i)} - x_{(1)}} - e^{c - x_{(1)}}` of the weights above the cutoff
    :math:`c = x_{(M+1)}` (floored at the smallest positive double relative to the largest
    weight), i.e. to at most the :math:`M` largest weights. Those lie in the kept tail, so
    the fit is identical. Sequences with :math:`M` weights strictly above the cutoff (the
    usual case) are fitted together by :func:`gpdfit` on the tail's device; the others
    (ties at the cutoff, zero weights, fewer than 5 tail weights) one by one by ArviZ's own
    fit, with ArviZ's conventions (:math:`\infty` for fewer than 5 tail weights). A
    sequence whose weights are all equal (a tail of all :math:`S` weights) gets
    :math:`-\infty` (bounded weights: the estimate is exact).

    :param tail: ``(K, N)`` (with ``dim=0``) tensor or array, ``K >= min(S, M + 1)``,
        any order.
    :param int num_samples: :math:`S`, the number of draws the tail was taken from.
    :param int max_elements: memory budget of one batch of :func:`gpdfit`.
    :returns: the k-hats without ``dim``: a float64 tensor on the tail's device, or a numpy
        array for an array input.

    Example::

        k = tail_size(S) + 1
        khat = pareto_khat_from_tail(log_weights.topk(k, dim=0).values, S)   # (S, N) -> (N,)
    """
    is_tensor = torch.is_tensor(tail)
    t = torch.as_tensor(tail).detach().to(torch.float64).movedim(dim, -1)
    shape = t.shape[:-1]
    x = t.reshape(-1, t.shape[-1]).sort(-1, descending=True).values
    S = int(num_samples)
    M = tail_size(S)
    out = torch.full(x.shape[:1], math.nan, dtype=torch.float64, device=x.device)
    regular = torch.zeros(x.shape[:1], dtype=torch.bool, device=x.device)
    if S >= 2 and M > 4 and x.shape[-1] >= M + 1:
        xs = x - x[:, :1]
        cut = xs[:, M].clamp(min=math.log(np.finfo(float).tiny))
        regular = torch.isfinite(x[:, 0]) & (xs[:, :M] > cut.unsqueeze(-1)).all(-1)
        if bool(regular.any()):
            ex = xs[regular, :M].exp() - cut[regular].exp().unsqueeze(-1)
            out[regular] = gpdfit(ex.flip(-1), max_elements)[0]
    rest = (~regular).nonzero().flatten()
    if len(rest):
        rows = x[rest].cpu().numpy()
        k = [_khat_1d(row, S) for row in rows]
        out[rest] = torch.as_tensor(k, dtype=torch.float64).to(out.device)
    out = out.reshape(shape)
    if is_tensor:
        return out
    return out.cpu().numpy()


def pareto_khat(log_weights: torch.Tensor | np.ndarray, dim: int = 0) -> torch.Tensor | np.ndarray:
    r"""Pareto :math:`\hat k` of importance log-weights by ArviZ's PSIS
    (:func:`arviz.psislw`, ``reff=1``), per sequence.

    :math:`\hat k` is the shape of the generalized Pareto distribution fitted to the
    :math:`M = \lceil\min(S/5, 3\sqrt S)\rceil` largest weights; the estimate is reliable
    below :func:`khat_threshold` (Vehtari et al. 2024). A sequence whose weights are all
    equal gets :math:`-\infty` (ArviZ returns :math:`\infty` for such a tail of ties).

    :param log_weights: tensor or array with the draws along ``dim`` (default 0: ``(S, N)``).
    :returns: the k-hats, without ``dim``: a tensor on the input's device (float64 on the
        CPU for an array input, as a numpy array).

    Example::

        khat = pareto_khat(ref.log_weights)        # (S, N) -> (N,)
        (khat > khat_threshold(ref.log_weights.shape[0])).any()
    """
    az = import_arviz()
    is_tensor = torch.is_tensor(log_weights)
    lw = log_weights.detach().to("cpu", torch.float64).numpy() if is_tensor else log_weights
    lw = np.moveaxis(np.asarray(lw, dtype=float), dim, -1)
    flat = lw.reshape(-1, lw.shape[-1])
    if flat.shape[-1] < 2:  # ArviZ cannot fit one draw
        khat = np.full(flat.shape[0], np.inf)
    else:
        with np.errstate(all="ignore"):
            _, khat = az.psislw(flat.copy(), reff=1.0)
        khat = np.asarray(khat, dtype=float).reshape(-1)
    constant = np.all(flat == flat[:, :1], axis=-1) & np.isfinite(flat[:, 0])
    khat[constant] = -np.inf
    khat = khat.reshape(lw.shape[:-1])
    if is_tensor:
        return torch.as_tensor(khat, dtype=torch.float64).to(log_weights.device)
    return khat
