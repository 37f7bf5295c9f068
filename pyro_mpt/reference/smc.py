r"""The SMC reference: ``R`` independent data-annealed SMC sweeps per sequence
(:mod:`pyro_mpt.conditionals.smc`), each an unbiased estimate :math:`\hat Z_{r,n}` of
:math:`p(x_n)`, pooled as

.. math:: \log \hat p(x_n) = \log \frac1R \sum_{r=1}^R \hat Z_{r,n}
    + \frac{\mathrm{SE}_n^2}{2}, \qquad
    \mathrm{SE}_n = \sqrt{\frac{R / \mathrm{ESS}_n - 1}{R - 1}}, \quad
    \mathrm{ESS}_n = \frac{(\sum_r \hat Z_{r,n})^2}{\sum_r \hat Z_{r,n}^2},

the delta-method standard error of the log of a mean of ``R`` i.i.d. positive draws (as for
importance weights, with the runs as the draws). The log of the mean of unbiased
:math:`\hat Z_{r,n}` is biased down by :math:`\mathrm{SE}_n^2/2 + O(R^{-2})` (second-order
delta method, Jensen), which is added back. It is valid when the runs' spread is
finite and ``R`` is not tiny: (estimate - truth) / SE is then roughly Student-t with
``R - 1`` degrees of freedom per sequence, and the total over many sequences close to
normal. With few particles per run the runs' :math:`\hat Z_{r,n}` are heavy-tailed: the
sample :math:`\mathrm{SE}_n` then under-states the spread and the correction removes only
part of the bias (measured on the Reliability page: raise ``num_samples``). The runs are
flagged (not trustworthy) when they disagree (:math:`\mathrm{ESS}_n < R/4`: a spread of
:math:`\log \hat Z_r` beyond about a nat), or when the Metropolis moves barely move
(acceptance below :data:`MIN_ACCEPTANCE`), or when the estimate still drifts with the
particle count (:mod:`pyro_mpt.reference.smc_drift`: ``R`` more runs of a quarter of the
particles; a significant drift widens the standard error by the implied bias), or when
there are too few particles for that check to run (``num_samples`` below 1024).

Also here: the ``"auto"`` ladder (:func:`auto_ladder`): importance first, SMC when
importance fails its diagnostics, with a message saying which rung answered and why.

References: P. Del Moral, "Feynman-Kac formulae", Springer 2004; A. B. Owen, "Monte Carlo
theory, methods and examples", 2013, chapter 9.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from ..conditionals.proposal import Proposal, ProposalParticleModel
from ..conditionals.smc import DEFAULT_MOVES, sweep_in_chunks
from ..conditionals.smc_moves import ParticleModel, check_smc_model
from ..intervals import satterthwaite_dof
from ..options import resolve_max_elements
from .importance import MIN_SAMPLES, importance_reference
from .result import UNRELIABLE, LMLEstimate, flag_nonfinite, flag_unreliable
from .smc_drift import (
    DRIFT_FACTOR,
    MIN_DRIFT_PARTICLES,
    drift_message,
    particle_drift,
    pool_runs,
)
from .smc_importance import smc_importance_reference

__all__ = ["MIN_ACCEPTANCE", "SMC_RUNS", "auto_ladder", "smc_reference"]

#: Independent SMC runs per sequence, for the standard error.
SMC_RUNS = 8

#: The fewest particles per run.
MIN_PARTICLES = 32

#: Below this mean Metropolis acceptance rate the particles are flagged as stuck.
MIN_ACCEPTANCE = 0.02


def _check_runs(ess_runs, acceptance, R, per_seq, messages) -> bool:
    """Flags sequences whose runs disagree or whose moves are stuck; returns trustworthy."""
    bad_runs, stuck = ess_runs < R / 4, acceptance < MIN_ACCEPTANCE
    bad = (bad_runs | stuck) & torch.isfinite(per_seq)
    if not bool(bad.any()):
        return True
    return flag_unreliable(
        messages,
        f"SMC failed its diagnostics for {int(bad.sum())} of {per_seq.numel()} sequences: "
        f"the {R} runs disagree for {int(bad_runs.sum())} (ESS of the runs down to "
        f"{float(ess_runs[bad].min()):.1f}, floor {R / 4:g}) and the moves are stuck for "
        f"{int(stuck.sum())} (acceptance down to {float(acceptance[bad].min()):.3f}, floor "
        f"{MIN_ACCEPTANCE}); use more particles (num_samples) or a reparameterised model",
    )


def _particle_model(problem, guide, messages) -> ParticleModel:
    """The particles' model: prior draws, or a guide's (with a defensive share of prior
    draws, :mod:`~pyro_mpt.conditionals.proposal`) weighted by p(z) / q(z) at stage 0."""
    p = problem
    if guide is None:
        return ParticleModel(p.model, p.args, p.kwargs, p.layout)
    proposal = Proposal(guide)
    proposal.check(p.args, p.kwargs, p.layout, p.trace)
    messages.append(
        f"smc: initial particles from the guide {type(guide).__name__} mixed with "
        f"{proposal.prior_fraction:.0%} prior draws, weighted by p(z) / (a p(z) + (1 - a) "
        "q(z)); the sweep's evidence starts at their mean (unbiased), the annealing path "
        "and the moves are unchanged"
    )
    return ProposalParticleModel(p.model, p.args, p.kwargs, p.layout, proposal)


def smc_reference(problem, options, messages) -> LMLEstimate:
    """``SMC_RUNS`` independent SMC sweeps of every sequence along random token orders,
    ``options.num_samples // SMC_RUNS`` particles each (at least ``MIN_PARTICLES``),
    pooled as in the module docstring. With ``options.guide`` the initial particles are the
    guide's (:func:`_particle_model`).

    :raises ValueError: for a guide that does not match the model, or a model SMC cannot
        move (no continuous latent, a discrete one, or tokens not independent given the
        latents), naming the site.
    :warns UserWarning: when the runs fail the diagnostics of the module docstring."""
    layout, R = problem.layout, SMC_RUNS
    check_smc_model(layout, problem.trace, "smc")
    P = max(MIN_PARTICLES, options.num_samples // R)
    N, T, device = layout.num_sequences, layout.num_tokens, layout.device
    pm = _particle_model(problem, options.guide, messages)
    order = torch.rand(R, N, T, device=device).argsort(-1)
    full = torch.full((R, N), T, dtype=torch.long, device=device)
    budget = resolve_max_elements(options.max_elements, device)
    run = sweep_in_chunks(pm, order, full, P, DEFAULT_MOVES, False, budget, options.progress)
    log_z = run.log_evidence  # (R, N)
    ess_runs = torch.exp(2 * torch.logsumexp(log_z, 0) - torch.logsumexp(2 * log_z, 0))
    # the log of a mean is biased down by about se^2 / 2 (Jensen): added back per sequence
    per_seq, se = pool_runs(log_z)
    acceptance = run.acceptance.mean(0)
    messages.append(
        f"smc: {R} independent runs of {P} particles per sequence, tokens revealed in random "
        f"orders with adaptive tempering (ESS kept at P/2), systematic resampling and "
        f"{DEFAULT_MOVES} x max(1, d - 1) random-walk Metropolis steps per stage (d latent "
        "dimensions per sequence); log p(x_n) = logmeanexp_r "
        f"log Z_r + se^2/2 (the log-mean's bias), delta-method standard error over the "
        "runs; resampled "
        f"{float(run.resamples.mean()):.1f} times per run and sequence on average, mean "
        f"acceptance {float(acceptance.mean()):.2f}"
    )
    trustworthy = _check_runs(ess_runs, acceptance, R, per_seq, messages)
    trustworthy = flag_nonfinite(per_seq, messages) and trustworthy
    scale = layout.scale
    total, stderr = (scale * per_seq).sum(), float(((scale * se) ** 2).sum().sqrt())
    # after the runs above, so that the estimate itself is what it was without the check
    drift = particle_drift(
        pm, P, R, float(total), stderr, scale, budget, DEFAULT_MOVES, options.progress
    )
    if drift is not None:
        text = drift_message(drift, P)
        if drift.failed and trustworthy:
            trustworthy = flag_unreliable(messages, f"SMC failed its diagnostics: {text}")
        else:  # already flagged (one warning per estimate), or passed
            messages.append(text)
        if drift.failed:
            stderr = math.sqrt(stderr**2 + drift.bias**2)
    elif P // DRIFT_FACTOR < MIN_DRIFT_PARTICLES:
        # no diagnostic is claimed below the check's floor: at small particle counts the
        # bias is not in the s.e. (regression at 512 samples: 12 of 20 seeds covered)
        text = (
            f"particle-count check skipped: {P} // {DRIFT_FACTOR} particles per run is "
            f"below {MIN_DRIFT_PARTICLES}, so the bias of too few particles cannot be seen; "
            f"use num_samples >= {R * DRIFT_FACTOR * MIN_DRIFT_PARTICLES}"
        )
        if trustworthy:
            trustworthy = flag_unreliable(messages, text)
        else:  # already flagged: one warning per estimate
            messages.append(text)
    return LMLEstimate(
        total=total,
        per_sequence=per_seq,
        stderr=stderr,
        per_sequence_stderr=se,
        method="smc",
        num_samples=P,
        ess=run.min_ess.mean(0),
        trustworthy=trustworthy,
        messages=messages,
        device=device,
        resamples=run.resamples.mean(0),
        # each sequence's error rests on its R runs (R - 1 dof), combined over sequences
        dof=satterthwaite_dof((scale * se) ** 2, R - 1.0),
        drift=drift,
    )


def _without_guide(options, messages) -> list:
    """A copy of ``messages``, saying that the smc_importance rung does not use the guide."""
    if options.guide is None:
        return list(messages)
    return [
        *messages,
        "auto ladder: the smc_importance rung fits its own proposal to SMC sweeps and does "
        "not use the guide",
    ]


def auto_ladder(problem, options, messages) -> LMLEstimate:
    """The ``"auto"`` rungs for continuous latents: importance sampling; if it fails its
    diagnostics (Pareto k-hat, ESS) and SMC can move the model's latents,
    ``"smc_importance"`` with the same ``num_samples``
    (:mod:`~pyro_mpt.reference.smc_importance`); if that fails its own diagnostics too,
    SMC (at least the 1024 samples that its particle-count check needs,
    :mod:`~pyro_mpt.reference.smc_drift`). ``messages`` say which rung answered and why.
    Importance's warnings are re-raised only when its answer is the one returned; below
    ``MIN_SAMPLES`` draws it never escalates (too small a budget for either rung)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = importance_reference(problem, options, list(messages))
    try:
        check_smc_model(problem.layout, problem.trace, "smc")
        why_not = None
    except ValueError as err:
        why_not = str(err)
    if options.num_samples < MIN_SAMPLES:
        # a budget too small for importance's diagnostics is too small for SMC's runs too
        why_not = f"fewer than {MIN_SAMPLES} draws leave no rung a diagnostic to pass"
    if first.trustworthy or why_not is not None:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        note = "its diagnostics passed" if first.trustworthy else f"no SMC rung: {why_not}"
        first.messages.append(f"auto ladder: the importance rung answered ({note})")
        return first
    failed = [m[len(UNRELIABLE) :] for m in first.messages if m.startswith(UNRELIABLE)]
    said = f"importance said: {'; '.join(failed)}; importance estimate {float(first.total):.4f}"
    # the second rung: importance from Student-t fits to short SMC sweeps, about ten times
    # cheaper than the SMC reference at one budget (docs/benchmarks.rst) and as well covered
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = smc_importance_reference(problem, options, _without_guide(options, messages))
    if second.trustworthy:
        second.messages.append(
            "auto ladder: the importance rung failed its diagnostics, so the smc_importance "
            f"rung answered (its diagnostics passed); {said}"
        )
        return second
    # the SMC rung takes at least the particles its own particle-count check needs
    checked = SMC_RUNS * DRIFT_FACTOR * MIN_DRIFT_PARTICLES
    more = f" with num_samples={checked}" if options.num_samples < checked else ""
    messages.append(
        "auto ladder: the importance and smc_importance rungs failed their diagnostics, so "
        f"the SMC rung{more} answered; {said}; smc_importance estimate "
        f"{float(second.total):.4f}"
    )
    if more:
        options = dataclasses.replace(options, num_samples=checked)
    return smc_reference(problem, options, messages)
