r"""The importance-sampling reference: per-sequence importance sampling with the prior or a
guide as proposal,

.. math::
    \log p(x_n) \approx \log \frac1S \sum_{s=1}^S w_{s,n}, \qquad
    \log w_{s,n} = \log p(x_n, z_{s,n}) - \log q(z_{s,n}), \quad z_{s,n} \sim q,

with the log-mean-exp *inside* the data plate (one weight per particle and sequence, as
the IWAE bound of Burda et al. (2016) and unlike Pyro's :class:`~pyro.infer.Importance`,
whose one weight per particle for the whole data set degenerates as :math:`N` grows). With
the prior as proposal :math:`\log w_{s,n}` is just :math:`\log p(x_n \mid z_{s,n})`.
Enumerated latents are summed out inside each weight.

**Standard error and bias.** With :math:`\mathrm{ESS}_n = (\sum_s w_{s,n})^2 / \sum_s
w_{s,n}^2`, the delta method (Owen 2013, chapter 9) gives

.. math:: \mathrm{SE}\big(\log \hat p(x_n)\big) \approx
    \frac{\mathrm{sd}(w)}{\sqrt S\,\overline w}
    = \sqrt{\frac{S/\mathrm{ESS}_n - 1}{S - 1}},

and the log-mean is biased *down* by about :math:`\mathrm{SE}^2/2` (Jensen; the bias is
:math:`O(1/S)`): it is added back, and its size widens the interval
(:func:`_bias_corrected`). Both, and the Pareto :math:`\hat k` of the weights
(:mod:`pyro_mpt.diagnostics`), are only as good as the weights' tail: when :math:`\hat k`
exceeds :math:`\min(1 - 1/\log_{10}S, 0.7)` the variance of the weights may be infinite
and the reported SE meaningless (Vehtari et al. 2024). Such sequences, and those with a
small ESS, raise a :class:`UserWarning` and set ``trustworthy=False``; so does any run
with continuous latents and fewer than :data:`MIN_SAMPLES` draws, too few for any
diagnostic. :math:`\hat k` is fitted on the device from a running top-:math:`M` of the
log-weights (:func:`pyro_mpt.diagnostics.pareto_khat_from_tail`).

References: Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders",
ICLR 2016; A. B. Owen, "Monte Carlo theory, methods and examples", 2013; A. Vehtari,
D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance Sampling", JMLR
25(72), 2024.
"""

from __future__ import annotations

import math

import torch

from ..diagnostics import effective_sample_size, khat_threshold, pareto_khat_from_tail, tail_size
from ..options import resolve_max_elements
from .guide import check_guide
from .result import LMLEstimate, flag_nonfinite, flag_unreliable
from .sampler import Sampler
from .streaming import stream

__all__ = ["KEEP_LOG_WEIGHTS", "MIN_ESS", "MIN_SAMPLES", "importance_reference"]

#: Log-weights are returned (``LMLEstimate.log_weights``) when ``S * N`` is at most this.
KEEP_LOG_WEIGHTS = 2**22

#: The ESS floor is ``min(MIN_ESS, 0.01 * S)`` per sequence.
MIN_ESS = 100.0

#: The data-level verdict fails when more than this fraction of the sequences fail their
#: own diagnostics: k-hat of a few sequences among many exceeds its threshold by chance
#: even when the total is accurate (measured in docs/reliability.rst); their own verdicts
#: are in ``sequence_trustworthy``.
MAX_BAD_FRACTION = 0.75

#: Below this many draws per sequence no diagnostic can be claimed (the Pareto fit rests on
#: fewer than 20 tail weights, and a high ESS out of so few draws proves nothing): a model
#: with continuous latents is then flagged not trustworthy whatever its k-hat and ESS.
MIN_SAMPLES = 100


def _sampler(problem, guide):
    """The sampler of the proposal, and its name for the messages."""
    p = problem
    if guide is None:
        return Sampler(p.model, p.args, p.kwargs, p.layout, "prior"), "the prior"
    check_guide(guide, p.args, p.kwargs, p.layout, p.continuous)
    sampler = Sampler(p.model, p.args, p.kwargs, p.layout, "guide", p.continuous, guide=guide)
    return sampler, f"the guide {type(guide).__name__}"


def _khat(stats, S, tail_k, messages, budget):
    # PSIS k-hat from the M + 1 largest log-weights: the fit ArviZ's psislw makes from all
    # of them, batched over sequences on the device (diagnostics.pareto_khat_from_tail)
    # in batches under the memory budget
    khat = pareto_khat_from_tail(stats.tail, S, dim=0, max_elements=budget)
    constant = torch.isfinite(stats.low) & (stats.low == stats.tail.amax(0))  # bounded: exact
    messages.append(
        f"Pareto k-hat from the {tail_k - 1} largest weights per sequence (a running top-k; "
        "the same generalized Pareto fit ArviZ's psislw makes from all the weights)"
    )
    return torch.where(constant, -math.inf, khat)


def _standard_errors(ess, S, per_seq):
    """Per-sequence delta-method standard errors (NaN for one draw)."""
    if S > 1:
        return ((S / ess - 1).clamp(min=0) / (S - 1)).sqrt()
    return torch.full_like(per_seq, math.nan)


def _check_diagnostics(ess, khat, S, per_seq, messages):
    """Flags the (finite) sequences whose k-hat or ESS fail; returns ``(trustworthy,
    sequence_ok)``: the data-level verdict fails when more than :data:`MAX_BAD_FRACTION`
    of the sequences fail (:func:`_check_bias` adds the other data-level check)."""
    threshold = khat_threshold(S)
    floor = min(MIN_ESS, 0.01 * S)
    bad_k, bad_ess = khat > threshold, ess < floor
    bad = (bad_k | bad_ess) & torch.isfinite(per_seq)
    n_bad = int(bad.sum())
    if not n_bad:
        return True, ~bad
    if n_bad <= MAX_BAD_FRACTION * per_seq.numel():
        messages.append(
            f"note: {n_bad} of {per_seq.numel()} sequences failed their own diagnostics "
            f"(k-hat up to {float(khat[bad].max()):.2f}, threshold {threshold:.2f}); at most "
            f"{MAX_BAD_FRACTION:.0%} of the sequences, so the total is still trusted (see "
            "sequence_trustworthy)"
        )
        return True, ~bad
    return flag_unreliable(
        messages,
        f"importance sampling failed its diagnostics for {n_bad} of {per_seq.numel()} "
        f"sequences: Pareto k-hat up to {float(khat[bad].max()):.2f} (threshold "
        f"{threshold:.2f}, {int(bad_k.sum())} above), ESS down to {float(ess[bad].min()):.1f} "
        f"(floor {floor:g}, {int(bad_ess.sum())} below); the estimate and its standard error "
        "may be far off: use a better proposal (a guide trained by SVI, e.g. AutoNormal) or "
        "more particles",
    ), ~bad


def _bias_corrected(per_seq, se, scale):
    r"""``(per_seq, se, stderr)``: Jensen's bias of each log-mean added back, each sequence's
    s.e. and the total's widened by the size of the correction:

    .. math:: \log \hat p(x_n) + b_n, \quad b_n = \tfrac12 \mathrm{se}_n^2, \qquad
        \sqrt{\mathrm{se}_n^2 + b_n^2}, \qquad
        \sqrt{\textstyle\sum_n c_n^2 \mathrm{se}_n^2 + \big(\sum_n c_n b_n\big)^2}.

    The correction is second-order (delta method), and heavy-tailed weights make both it
    and ``se`` too small; the biases of all sequences have one sign, so the total's
    interval is widened by their sum. Measured on PPCA with the prior as proposal
    (docs/reliability.rst): without it, 5 of 20 runs were more than 2.5 s.e. low while
    reported trustworthy. One draw (``se`` NaN) is left as it is."""
    bias = torch.nan_to_num(se * se / 2, nan=0.0)
    per_seq_se = torch.where(torch.isnan(se), se, (se * se + bias * bias).sqrt())
    total_bias = (scale * bias).sum()
    stderr = float(((scale * se) ** 2).sum().add(total_bias**2).sqrt())
    return per_seq + bias, per_seq_se, stderr


def _check_bias(se, scale, messages):
    r"""The data-level check that tracks the error itself: the delta method's bias
    estimate :math:`\sum_n c_n \mathrm{se}_n^2/2` must not exceed the standard error
    :math:`\sqrt{\sum_n c_n^2 \mathrm{se}_n^2}` (else the interval misses the truth).

    :returns: ``trustworthy``."""
    bias = float((scale * se**2).sum() / 2)
    total_se = float(((scale * se) ** 2).sum().sqrt())
    if not bias > total_se:  # also passes NaN (one draw: flagged elsewhere)
        return True
    return flag_unreliable(
        messages,
        f"the estimate's bias (about sum_n se_n^2 / 2 = {bias:.3g}) exceeds its standard "
        f"error {total_se:.3g}, so its interval misses log p(x): use a better proposal "
        "(e.g. a trained AutoNormal guide) or more particles",
    )


def _note_method(messages, S, proposal, stats):
    at = 0 if not messages or not messages[0].startswith("method=") else 1
    messages.insert(
        at,
        f"importance: {S} draws per sequence from {proposal} in {stats.num_chunks} chunk(s) of "
        f"up to {stats.chunk_size}; log p(x_n) = logmeanexp_s [log p(x_n, z_s) - log q(z_s)], "
        "+ se_n^2 / 2 (the log-mean's bias, added back; its size is added to the delta-method "
        "standard error in quadrature)",
    )


def importance_reference(problem, options, messages) -> LMLEstimate:
    """Importance sampling of every sequence's :math:`\\log p(x_n)` with ``options.guide``
    (the prior if ``None``) as proposal, ``options.num_samples`` draws per sequence.

    :raises ValueError: for a guide that does not match the model.
    :warns UserWarning: when :math:`\\hat k` or the ESS fail for some sequence, or an
        estimate is not finite."""
    S, layout = options.num_samples, problem.layout
    sampler, proposal = _sampler(problem, options.guide)
    if not problem.continuous:
        messages.append(
            "importance: the model has no continuous latents, so every weight is exact "
            "(use method='exact')"
        )
    keep = S * layout.num_sequences <= KEEP_LOG_WEIGHTS
    tail_k = tail_size(S) + 1
    stats = stream(
        problem,
        sampler,
        S,
        options,
        keep=keep,
        tail_k=tail_k,
        desc="log p(x) importance",
        messages=messages,
    )
    per_seq = stats.lse1 - math.log(S)
    _note_method(messages, S, proposal, stats)
    lw = stats.log_weights
    ess = effective_sample_size(lw, 0) if keep else torch.exp(2 * stats.lse1 - stats.lse2)
    budget = resolve_max_elements(options.max_elements, layout.device)
    khat = _khat(stats, S, tail_k, messages, budget)
    se = _standard_errors(ess, S, per_seq)
    trustworthy, sequence_ok = _check_diagnostics(ess, khat, S, per_seq, messages)
    trustworthy = _check_bias(se, layout.scale, messages) and trustworthy
    per_seq, se, stderr = _bias_corrected(per_seq, se, layout.scale)
    if problem.continuous and S < MIN_SAMPLES:
        trustworthy = flag_unreliable(
            messages,
            f"num_samples={S} is below {MIN_SAMPLES}: with so few draws per sequence neither "
            "the ESS nor Pareto k-hat can show that the estimate is reliable (it may be far "
            f"off); use num_samples >= {MIN_SAMPLES} (thousands for a prior proposal)",
        )
    trustworthy = flag_nonfinite(per_seq, messages) and trustworthy
    scale = layout.scale
    return LMLEstimate(
        total=(scale * per_seq).sum(),
        per_sequence=per_seq,
        stderr=stderr,
        per_sequence_stderr=se,
        method="importance",
        num_samples=S,
        ess=ess,
        khat=khat,
        khat_threshold=khat_threshold(S),
        trustworthy=trustworthy,
        messages=messages,
        log_weights=lw,
        device=layout.device,
        sequence_trustworthy=sequence_ok & torch.isfinite(per_seq),
    )
