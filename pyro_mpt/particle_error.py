r"""The particle error of importance conditionals, which the spread over masks cannot see.

The :math:`S` prior draws of :class:`~pyro_mpt.conditionals.ImportanceConditionals` are
drawn once and shared by every mask draw, so the :math:`K` draws' spread measures the
masks' randomness only; with the chain estimate (which telescopes to the same importance
estimate for every order) that spread is exactly 0 while the particle error is not.

**Estimator (independent particle groups, batch means).** The particles are iid, so
splitting them into :math:`G` groups of :math:`S/G` gives :math:`G` independent estimates
:math:`\hat L_g` (each group's particles alone, every group on the same masks, one mask
draw). The particle variance of the full estimate is estimated by

.. math:: \widehat{\mathrm{Var}}_\mathrm{part}(\hat L) = \frac{1}{G}\,\frac{1}{G-1}
    \sum_{g=1}^{G} \big(\hat L_g - \bar L\big)^2 ,

on :math:`G - 1` degrees of freedom: the variance of a mean of :math:`G` independent
group estimates. It is conservative: a group's :math:`S/G` particles have the larger
error (and :math:`O(G/S)` bias) of fewer draws, and one mask draw's particle error is at
least that of the mean over :math:`K` draws. :class:`~pyro_mpt.MPTEstimate` adds it to the
masks' variance, with Welch-Satterthwaite degrees of freedom.

**Bias (delete-a-group jackknife).** Self-normalised importance conditionals are ratios of
particle averages, so their logs are biased, and the bias adds up over tokens and sequences
while the standard error shrinks as :math:`1/\sqrt S`: with few effective particles no
standard error covers it. The same masks are also scored with each group left out
(:math:`S(G-1)/G` particles); if :math:`\mathbb E\hat L_S = L + c\,S^{-a}`, the difference
:math:`\Delta = \bar L_{(-g)} - \hat L` estimates :math:`c\,S^{-a}((G/(G-1))^a - 1)`, so

.. math:: \hat b_a = \frac{\Delta}{(G/(G-1))^a - 1}, \qquad
    \hat b_1 = (G-1)\,\Delta, \qquad \hat b_{1/2} = \frac{\Delta}{\sqrt{G/(G-1)} - 1}
    \approx 2.07\,\hat b_1 \ (G = 8)

estimates the bias of the full estimate (:func:`particle_error`). With many effective
particles the bias expands in :math:`1/S` (:math:`a = 1`, the classical jackknife). With few
(a sequence whose conditional ESS, below, is under :data:`MIN_CONDITIONAL_ESS`) it decays
more slowly: the log of a mean of weights whose tail has Pareto index :math:`1/k`,
:math:`1/2 < k < 1`, is biased by :math:`O(S^{1 - 1/k})` (a tail argument, not a theorem
about finite :math:`S`), so :math:`a \ge 1/2` while :math:`k \le 2/3` (PSIS's limit of
usable weights is :math:`k \approx 0.7`); measured there (hard calibration regime,
:math:`S/8` to :math:`S` particles) :math:`a \approx 0.6`-:math:`0.8`. For
:math:`1/2 \le a \le 1` the expected bias lies between those of :math:`\hat b_1` and
:math:`\hat b_{1/2}`, and :class:`~pyro_mpt.MPTEstimate` subtracts the midpoint
:math:`\hat b = (\hat b_1 + \hat b_{1/2})/2` and adds the mean square of the two ends to the
particle variance:

.. math:: \widehat{\mathrm{Var}} = \widehat{\mathrm{Var}}_\mathrm{part}
    + \tfrac12\big(\hat B_1^2 + \hat B_{1/2}^2\big) = \widehat{\mathrm{Var}}_\mathrm{part}
    + \hat B^2 + \big(\tfrac{\hat B_{1/2} - \hat B_1}{2}\big)^2

(:math:`\hat B` the totals over sequences; still on :math:`G - 1` dof): the correction's
own noise (:math:`\hat B^2`; the bias estimate is a noisy difference) and the unknown rate
(the half-range). Elsewhere :math:`\hat b_{1/2} := \hat b_1` and this is the jackknife with
:math:`\hat b_1^2` added, negligible against the variance (:math:`O(S^{-2})` against
:math:`O(1/S)`). The correction is a constant: ``total`` stays differentiable with the
uncorrected estimate's gradient. In the degenerate regime the interval is wide and
conservative by design, and ``MPTEstimate.reliable`` is ``False`` (measured coverages:
the Reliability page).

**Diagnostic.** The effective sample size of the weights given every token,
:math:`\mathrm{ESS}_n = (\sum_s w_{s,n})^2 / \sum_s w_{s,n}^2` with
:math:`\log w_{s,n} = \log w^0_s + \log p(x_n \mid z_s)` (the most degenerate of the
conditionals' weights): when more than :data:`MAX_LOW_ESS_FRACTION` of the sequences have
:math:`\mathrm{ESS}_n <` :data:`MIN_CONDITIONAL_ESS`, a :class:`UserWarning` says that the
conditionals (and their standard error) cannot be trusted.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from typing import NamedTuple

import torch

from .engine import score_masks

__all__ = [
    "MAX_LOW_ESS_FRACTION",
    "MIN_CONDITIONAL_ESS",
    "NUM_GROUPS",
    "STOCHASTIC_BACKENDS",
    "ParticleError",
    "conditional_ess",
    "particle_error",
    "particle_variance",
    "smc_chain_terms",
]

#: Conditional backends whose particles are random draws (their error is counted).
STOCHASTIC_BACKENDS = frozenset({"importance", "smc"})

#: Independent particle groups :math:`G` (at most :math:`S`).
NUM_GROUPS = 8

#: A sequence's conditional weights with a smaller ESS are degenerate.
MIN_CONDITIONAL_ESS = 10.0

#: The warning fires when more than this fraction of the sequences are degenerate.
MAX_LOW_ESS_FRACTION = 0.1


def _scorer_with(scorer, log_w0: torch.Tensor):
    """A shallow copy of ``scorer`` mixing over the particles of ``log_w0`` (the kernels,
    and their particle tensors, are shared, not copied)."""
    sub = copy.copy(scorer)
    sub.log_w0 = log_w0
    return sub


class ParticleError(NamedTuple):
    r"""The particle error of a total: ``variance`` (batch means) on ``dof`` degrees of
    freedom, ``bias`` ``(N,)`` the jackknife estimate :math:`\hat b_1` of each sequence's
    bias read as :math:`O(1/S)`, and ``bias_slow`` ``(N,)`` the same difference read as
    :math:`O(S^{-1/2})` (:math:`\hat b_{1/2}`; ``particle_terms`` keeps it for the
    sequences whose conditionals are degenerate only, ``bias`` for the others, ``None`` when
    none is). Unscaled; NaN with fewer than 2 particles. Indexing ``[0]``, ``[1]`` gives the ``(variance, dof)`` pair of
    :func:`particle_variance`."""

    variance: float
    dof: float
    bias: torch.Tensor | None = None
    bias_slow: torch.Tensor | None = None
    #: whether the estimate's variance also takes the squared bias (the jackknife's
    #: noisy bias estimate: yes; SMC's Jensen gap, whose noise is ``variance``: no)
    widen: bool = True


def _one_draw_per_weights(scorer, estimator, layout, weights, *, share_masks, max_elements):
    """``(V, N)``: one mask draw of every sequence for each of the ``V`` particle weightings
    ``weights`` (each ``log_w0``-shaped), all on the same masks, so that their differences
    are the particles' alone."""
    seed = int(torch.randint(0, 2**62, ()))
    rows = []
    with torch.no_grad():
        for log_w0 in weights:  # 2G + 1 weightings (17), not a loop over particles
            generator = torch.Generator(device=layout.device).manual_seed(seed)
            draws, _ = score_masks(
                _scorer_with(scorer, log_w0),
                estimator,
                1,
                num_sequences=layout.num_sequences,
                num_tokens=layout.num_tokens,
                dtype=layout.dtype,
                device=layout.device,
                max_elements=max_elements,
                share_masks=share_masks,
                generator=generator,
                present=layout.present,  # Pyro's masks: the estimate's own ragged masks
            )
            rows.append(draws[0])
    return torch.stack(rows).to(torch.float64)


def particle_error(
    scorer,
    estimator,
    layout,
    *,
    share_masks: bool = False,
    max_elements: int | None = None,
    num_groups: int = NUM_GROUPS,
) -> ParticleError:
    r"""The particle variance of the total (batch means, see the module docstring) and the
    jackknife estimates of each sequence's bias, from one mask draw scored with the full
    :math:`S` particles (:math:`\hat L`), with each group alone (:math:`\hat L_g`) and with
    each group left out (:math:`\hat L_{(-g)}`, :math:`S(G-1)/G` particles), every one on
    the same masks:

    .. math:: \Delta = \frac1G\sum_{g=1}^G \hat L_{(-g)} - \hat L, \qquad
        \hat b_1 = (G-1)\,\Delta, \qquad \hat b_{1/2} = \frac{\Delta}{\sqrt{G/(G-1)} - 1}.

    If :math:`\mathbb E\hat L_S = L + b/S + O(S^{-2})`, then :math:`\mathbb E\hat b_1 = b/S
    + O(S^{-2})` (the delete-a-group jackknife, Quenouille 1956; Efron & Tibshirani 1993,
    ch. 10); if :math:`\mathbb E\hat L_S = L + c\,S^{-1/2}`, :math:`\hat b_{1/2}` is
    unbiased for the bias instead (the module docstring: which one applies, and how
    :class:`~pyro_mpt.MPTEstimate` combines them). ``(nan, nan, None, None)`` with a single
    particle.

    :param scorer: a particle scorer with ``log_w0`` ``(S, N)`` (e.g.
        :class:`~pyro_mpt.conditionals.particles.ParticleScorer`).
    :param estimator: the :class:`~pyro_mpt.estimators.MaskEstimator` of the estimate.
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout` (sizes, scale).
    :param bool share_masks: as for the estimate.
    :param int max_elements: the scoring chunk budget.
    :param int num_groups: :math:`G` (at most :math:`S`).
    """
    log_w0 = scorer.log_w0
    S = log_w0.shape[0]
    G = min(num_groups, S)
    if G < 2:
        return ParticleError(math.nan, math.nan, None, None)
    group = torch.arange(S, device=log_w0.device) % G
    group = group.reshape(S, *([1] * (log_w0.dim() - 1)))
    none = log_w0.new_tensor(-math.inf)
    # each subset renormalised to total weight 1, as that many draws of its own
    alone = [torch.where(group == g, log_w0 + math.log(G), none) for g in range(G)]
    left_out = [torch.where(group == g, none, log_w0 + math.log(G / (G - 1))) for g in range(G)]
    rows = _one_draw_per_weights(
        scorer,
        estimator,
        layout,
        [log_w0, *alone, *left_out],
        share_masks=share_masks,
        max_elements=max_elements,
    )
    full, alone, left_out = rows[0], rows[1 : G + 1], rows[G + 1 :]
    scale = 1.0 if layout.scale is None else layout.scale.to(torch.float64)
    totals = (scale * alone).sum(-1)
    delta = left_out.mean(0) - full
    slow = delta / (math.sqrt(G / (G - 1)) - 1)  # the bias if it decays like S^(-1/2)
    return ParticleError(float(totals.var() / G), float(G - 1), (G - 1) * delta, slow)


def particle_variance(
    scorer,
    estimator,
    layout,
    *,
    share_masks: bool = False,
    max_elements: int | None = None,
    num_groups: int = NUM_GROUPS,
) -> tuple[float, float]:
    r"""``(variance, dof)``: the batch-means estimate of the particle variance of the
    total (see the module docstring), :math:`G - 1` degrees of freedom; ``(nan, nan)``
    with a single particle. The parameters are those of :func:`particle_error`."""
    error = particle_error(
        scorer,
        estimator,
        layout,
        share_masks=share_masks,
        max_elements=max_elements,
        num_groups=num_groups,
    )
    return error.variance, error.dof


def conditional_ess(scorer, layout) -> torch.Tensor | None:
    r"""``(N,)`` the ESS of the particle weights given every token,
    :math:`\exp(2\operatorname{LSE}_s a_s - \operatorname{LSE}_s 2a_s)` with
    :math:`a_s = \log w^0_s + \log p(x_n \mid z_s)`; ``None`` for a scorer without
    particle kernels."""
    kernels = getattr(scorer, "kernels", None)
    chunked = getattr(scorer, "particle_log_weights", None)  # particles in chunks
    if (kernels is None and chunked is None) or scorer.log_w0 is None:
        return None
    N, T = layout.num_sequences, layout.num_tokens
    observed = torch.ones(1, N, T, dtype=torch.bool, device=layout.device)
    none = torch.zeros_like(observed)
    with torch.no_grad():
        a = scorer.log_w0 if chunked is None else chunked(observed)
        for sl, kernel in kernels or ():
            marginal, _ = kernel(observed[..., sl], none[..., sl], True)
            a = a + marginal  # (1, S, N)
        a = a.reshape(-1, *a.shape[-2:])[0] if a.dim() > 2 else a
        return torch.exp(2 * torch.logsumexp(a, 0) - torch.logsumexp(2 * a, 0))


def degenerate(ess: torch.Tensor | None) -> bool:
    """Whether more than :data:`MAX_LOW_ESS_FRACTION` of the sequences' conditional weights
    have an ESS (:func:`conditional_ess`) below :data:`MIN_CONDITIONAL_ESS` (``False``
    without particles): the measured regime where the interval under-covers."""
    if ess is None:
        return False
    return float((ess < MIN_CONDITIONAL_ESS).float().mean()) > MAX_LOW_ESS_FRACTION


def warn_low_ess(ess: torch.Tensor | None, num_samples: int) -> None:
    """Warns (``UserWarning``) when more than :data:`MAX_LOW_ESS_FRACTION` of the sequences'
    conditional weights have an ESS below :data:`MIN_CONDITIONAL_ESS`."""
    if not degenerate(ess):
        return
    low = ess < MIN_CONDITIONAL_ESS
    warnings.warn(
        f"importance conditionals degenerate for {int(low.sum())} of {ess.numel()} "
        f"sequences (ESS of the weights given every token below {MIN_CONDITIONAL_ESS:g}, "
        f"down to {float(ess.min()):.1f} of num_samples={num_samples}): the estimate "
        "and its standard error cannot be trusted; raise num_samples or use exact or "
        "quadrature conditionals",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the package: the warning points at
    the user's ``estimate`` / ``mpt_curve`` / ``evaluate`` call."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def particle_terms(scorer, backend, layout, options):
    """``(particle_var, ess)`` for an estimate with ``backend``'s conditionals: the
    particle variance and bias (:func:`particle_error`, its ``bias_slow`` kept only for the
    sequences whose conditional ESS is below :data:`MIN_CONDITIONAL_ESS`, or for all of
    them when more than :data:`MAX_LOW_ESS_FRACTION` are: :func:`degenerate`) and conditional
    ESS (:func:`conditional_ess`, warned by :func:`warn_low_ess`) when its particles are
    random draws, else ``(None, None)``.

    :param options: the :class:`~pyro_mpt.engine.MPTOptions` of the estimate."""
    if backend.name == "smc":  # independent sweeps: the draws' spread has their error
        return smc_chain_terms(scorer, layout), None
    if backend.name not in STOCHASTIC_BACKENDS or getattr(scorer, "log_w0", None) is None:
        return None, None
    var = particle_error(
        scorer,
        options.estimator,
        layout,
        share_masks=options.share_masks,
        max_elements=options.max_elements,
    )
    ess = conditional_ess(scorer, layout)
    warn_low_ess(ess, options.num_samples)
    if var.bias is not None:
        # the 1/S expansion holds for healthy weights (the range collapses to b_1); when
        # many sequences are degenerate, an ESS just above the threshold is no proof of
        # health, so all get the range, as reliable=False says (in the hard calibration
        # setting 17-20 of the 20 sequences are below it, 200 seeds)
        slow = None if ess is None else (ess < MIN_CONDITIONAL_ESS) | degenerate(ess)
        if slow is None or not bool(slow.any()):
            var = var._replace(bias_slow=None)
        else:
            var = var._replace(bias_slow=torch.where(slow, var.bias_slow, var.bias))
    return var, ess


def smc_chain_terms(scorer, layout) -> ParticleError | None:
    r"""The chain estimate with SMC conditionals: each draw is :math:`\log \hat Z` of an
    independent sweep, so the draws' spread already holds the particles' error, but the
    mean of the logs is low by Jensen's gap :math:`\tfrac12 \operatorname{Var} \log \hat
    Z_n` per sequence, which no number of draws removes
    (:meth:`~pyro_mpt.conditionals.smc.SMCScorer.chain_gap`). Returns that bias (subtracted
    from the estimate, not added to its variance) with the variance of its estimate, or
    ``None`` (other estimators, one draw)."""
    gap = getattr(scorer, "chain_gap", lambda: None)()
    if gap is None:
        return None
    bias, var, dof = gap
    scale = 1.0 if layout.scale is None else layout.scale.to(torch.float64)
    return ParticleError(float((scale**2 * var).sum()), dof, bias, widen=False)
