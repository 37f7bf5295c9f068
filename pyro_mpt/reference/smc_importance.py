r"""Reference method ``"smc_importance"``: importance sampling from a proposal fitted to the
final particles of tempered SMC runs.

:data:`NUM_FITS` independent likelihood-tempered SMC runs per sequence
(:mod:`pyro_mpt.conditionals.smc_fit`, ``P`` particles each; the whole likelihood tempered
at once: 7 steps where revealing the tokens one by one took 29, on hard PPCA) end with
weighted particles of :math:`p(u \mid x_n)` on the unconstrained space; the weighted mean
:math:`m_{n,r}` and covariance :math:`\Sigma_{n,r}` of run :math:`r` define a multivariate
Student-t, and the proposal is their equal mixture :math:`q_n = \frac1R \sum_r t_\nu(m_{n,r}, c\,\Sigma_{n,r})`
(:data:`DF` :math:`\nu = 10`, :data:`INFLATE` :math:`c = 1`: each component's covariance
is :math:`\tfrac{\nu}{\nu-2}\Sigma = 1.25\,\Sigma`, and its tails, heavier than a Gaussian
posterior's, keep the weights bounded; a wider one, :math:`\nu = 5, c = 1.5`, doubled the
standard error on PPCA). Runs that settle in different modes each cover theirs; when
all settle in one mode, the others are missed and nothing here can see it (as for any
importance sampler). Then ``S`` fresh draws :math:`u_s \sim q_n` give

.. math:: \log \hat p(x_n) = \log \frac1S \sum_{s=1}^S
    \frac{p_U(u_s)\, p(x_n \mid T(u_s))}{q_n(u_s)},

unbiased in :math:`\exp` given the fit (the draws are independent of the runs that fitted
:math:`q_n`), with the importance reference's delta-method standard error, its
:math:`\mathrm{se}_n^2/2` bias term added back, ESS and Pareto :math:`\hat k`
(flagged when any sequence's :math:`\hat k` exceeds ArviZ's threshold, or when the bias
term exceeds the standard error).

Where the posterior is close to Gaussian on the unconstrained space this needs far fewer
model evaluations than SMC's tempering for the same error: the SMC estimate's variance
grows with the number of tempering steps (each at ESS ``P/2``), while here the weights are
nearly constant (the Benchmarks page: PPCA in the hard regime of issue 13).

References: A. B. Owen, "Monte Carlo theory, methods and examples", 2013, ch. 9; A.
Vehtari et al., "Pareto smoothed importance sampling", JMLR 25, 2024.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from ..conditionals.smc import DEFAULT_MOVES
from ..conditionals.smc_fit import tempered_fit
from ..conditionals.smc_moves import ParticleModel, check_smc_model, split_latents
from ..diagnostics import effective_sample_size, khat_threshold, pareto_khat
from ..options import resolve_max_elements
from .result import LMLEstimate, flag_nonfinite, flag_unreliable

__all__ = ["DF", "FIT_FRACTION", "INFLATE", "NUM_FITS", "smc_importance_reference"]

#: Degrees of freedom of the Student-t proposal.
DF = 10.0

#: The fitted covariance is scaled by this (a wider proposal than the posterior).
INFLATE = 1.0

#: Independent tempered SMC runs per sequence, one mixture component each: runs that
#: settle in different modes of a multimodal posterior each cover theirs.
NUM_FITS = 4

#: Each run has ``num_samples // FIT_FRACTION`` particles.
FIT_FRACTION = 64

#: Their fewest particles.
MIN_FIT_PARTICLES = 32

#: The total is flagged when more than this fraction of the sequences fail their k-hat
#: (0: any; the proposal is fitted to each sequence, so a failure is a real misfit).
MAX_BAD_FRACTION = 0.0


def _proposal(pm, P: int, budget: int, progress: bool):
    """:data:`NUM_FITS` tempered SMC runs per sequence, each final cloud fitted by a
    Student-t: ``(their equal mixture, batch shape (N,); the tempering steps)``."""
    layout = pm.layout
    N, device, R = layout.num_sequences, layout.device, NUM_FITS
    run = tempered_fit(pm, R, P, budget, DEFAULT_MOVES, progress)
    loc = run.mean[:, 0].transpose(0, 1)  # (N, R, d)
    scale_tril = INFLATE**0.5 * run.chol.transpose(0, 1)  # (N, R, d, d)
    # a sequence whose every particle lost its weight (the data outside the model's
    # support) has no cloud to fit: a standard Student-t there, so that its estimate comes
    # out -inf and is flagged (flag_nonfinite) instead of failing the distribution's checks
    lost = ~(torch.isfinite(loc).all(-1) & torch.isfinite(scale_tril).flatten(-2).all(-1))
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=device)
    loc = torch.where(lost.unsqueeze(-1), 0.0, loc)
    scale_tril = torch.where(lost[..., None, None], eye, scale_tril)
    df = torch.tensor(DF, dtype=loc.dtype, device=device)
    weights = dist.Categorical(logits=loc.new_zeros(N, R))
    q = dist.MixtureSameFamily(weights, dist.MultivariateStudentT(df, loc, scale_tril))
    return q, run.steps


def _sample(q: dist.MixtureSameFamily, n: int) -> torch.Tensor:
    r"""``(n, N, d)`` draws of the equal mixture ``q`` of Student-t's: a component
    :math:`c` uniform, then :math:`m_c + L_c \varepsilon / \sqrt{g / \nu}`,
    :math:`\varepsilon \sim \mathcal N(0, I)`, :math:`g \sim \chi^2_\nu`; the same law as
    ``q.sample`` (which draws every component and keeps one), at a fraction of its cost."""
    t = q.component_distribution
    N, R, d = t.loc.shape
    c = torch.randint(R, (n, N, 1, 1), device=t.loc.device)
    loc = t.loc.expand(n, N, R, d).gather(2, c.expand(n, N, 1, d))[:, :, 0]
    tril = t.scale_tril.expand(n, N, R, d, d)
    tril = tril.gather(2, c.unsqueeze(-1).expand(n, N, 1, d, d))[:, :, 0]
    eps = torch.randn(n, N, d, 1, dtype=loc.dtype, device=loc.device)
    df = loc.new_tensor(DF)  # every component's (q's df is broadcast to (N, R))
    g = dist.Chi2(df).sample((n, N, 1))
    return loc + (tril @ eps).squeeze(-1) / (g / df).sqrt()


def _log_weights(pm, q, S: int, budget: int) -> torch.Tensor:
    """``(S, N)`` :math:`\\log p_U(u) + \\log p(x \\mid T(u)) - \\log q(u)`, ``S`` draws in
    chunks whose ``(chunk, N, T)`` token tables fit ``budget``."""
    layout = pm.layout
    chunk = max(1, budget // (4 * layout.num_sequences * (layout.num_tokens + 8)))
    parts = []
    for start in range(0, S, chunk):
        n = min(chunk, S - start)
        like, _, _ = pm.draw(1, n)  # the sites' shapes at n particles, for evaluate
        u = _sample(q, n)  # (n, N, d)
        log_prior, table = pm.evaluate(split_latents(u.unsqueeze(0), like), 1, n)
        parts.append(log_prior[0] + table[0].sum(-1) - q.log_prob(u).to(log_prior.dtype))
    return torch.cat(parts)


def smc_importance_reference(problem, options, messages) -> LMLEstimate:
    """``options.num_samples`` importance draws per sequence from a Student-t proposal
    mixture fitted to ``NUM_FITS`` tempered SMC runs of ``num_samples // FIT_FRACTION``
    particles (at least ``MIN_FIT_PARTICLES``); see the module docstring.

    :raises ValueError: for a model SMC cannot move, naming the site.
    :warns UserWarning: when k-hat fails for many sequences, the bias term exceeds the
        standard error, or an estimate is not finite."""
    layout, S = problem.layout, options.num_samples
    check_smc_model(layout, problem.trace, "smc_importance")
    P = max(MIN_FIT_PARTICLES, S // FIT_FRACTION)
    budget = resolve_max_elements(options.max_elements, layout.device)
    pm = ParticleModel(problem.model, problem.args, problem.kwargs, layout)
    with torch.no_grad():
        q, steps = _proposal(pm, P, budget, options.progress)
        lw = _log_weights(pm, q, S, budget)
    ess = effective_sample_size(lw, 0)
    se = ((S / ess - 1).clamp(min=0) / max(S - 1, 1)).sqrt()
    per_seq = torch.logsumexp(lw, 0) - math.log(S) + torch.nan_to_num(se**2 / 2)
    khat = torch.as_tensor(pareto_khat(lw, 0), dtype=lw.dtype, device=lw.device)
    messages.append(
        f"smc_importance: {NUM_FITS} tempered SMC runs of {P} particles per sequence "
        f"({steps} tempering steps), each fitted by "
        f"a Student-t (df {DF:g}, scale x {INFLATE:g}) on the unconstrained latents; {S} "
        "importance "
        "draws from it; log p(x_n) = logmeanexp_s log w_s + se_n^2/2, delta-method "
        "standard errors"
    )
    threshold = khat_threshold(S)
    bad = (khat > threshold) & torch.isfinite(per_seq)
    trustworthy, scale = True, layout.scale
    total_se = float(((scale * se) ** 2).sum().sqrt())
    if float(bad.float().mean()) > MAX_BAD_FRACTION or float((scale * se**2).sum()) / 2 > total_se:
        trustworthy = flag_unreliable(
            messages,
            f"the fitted proposal failed for {int(bad.sum())} of {bad.numel()} sequences "
            f"(Pareto k-hat up to {float(khat.max()):.2f}, threshold {threshold:.2f}; ESS "
            f"down to {float(ess.min()):.1f}): use method='smc' or more particles",
        )
    trustworthy = flag_nonfinite(per_seq, messages) and trustworthy
    return LMLEstimate(
        total=(scale * per_seq).sum(),
        per_sequence=per_seq,
        stderr=total_se,
        per_sequence_stderr=se,
        method="smc_importance",
        num_samples=S,
        ess=ess,
        khat=khat,
        khat_threshold=threshold,
        trustworthy=trustworthy,
        messages=messages,
        device=layout.device,
        sequence_trustworthy=~bad & torch.isfinite(per_seq),
    )
