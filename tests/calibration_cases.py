r"""The settings of issue 14's calibration table, each a function ``seed -> (estimate, exact)``
where ``estimate`` has ``total`` (or ``area``), ``stderr`` and ``ci(level)``.

The data of a setting are fixed (its own seed 0); the seed varies only the estimator's
randomness (masks, particles), so coverage is that of the reported interval around the
exact :math:`\log p(X)` of these data. Exact values come from dense Gaussians
(:class:`torch.distributions.MultivariateNormal`), not from pyro_mpt.

Models are written as Pyro users write them: a ``pyro.plate`` over the data, and for the
one-sequence setting a global latent with the data points as tokens (``token_plate``).
"""

from __future__ import annotations

import time
import warnings
from itertools import combinations

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve

N, T, LATENT = 20, 6, 2


def _ppca_data(N=N, T=T, K=LATENT, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(T, K, generator=g, dtype=torch.float64)
    loc = 0.5 * torch.randn(T, generator=g, dtype=torch.float64)
    z = torch.randn(N, K, generator=g, dtype=torch.float64)
    X = z @ W.T + loc + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    cov = W @ W.T + noise**2 * torch.eye(T, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(loc, cov).log_prob(X).sum()
    return X, dict(W=W, loc=loc, noise=noise), float(exact)


def ppca_collapsed(X, W, loc, noise):
    """PPCA with the latent integrated out (exact Gaussian conditionals)."""
    cov_diag = torch.full((X.shape[-1],), noise**2, dtype=X.dtype)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("x", dist.LowRankMultivariateNormal(loc, W, cov_diag), obs=X)


def ppca_latent(X, W, loc, noise):
    """PPCA with a local latent ``z_n`` (importance conditionals draw it)."""
    zero = torch.zeros(W.shape[-1], dtype=X.dtype)
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + loc, noise).to_event(1), obs=X)


def regression(y, features):
    """Bayesian linear regression: one sequence whose tokens are the data points."""
    D = features.shape[-1]
    w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=y.dtype), 1.0).to_event(1))
    with pyro.plate("data", y.shape[-1]):
        pyro.sample("y", dist.Normal((features * w).sum(-1), 0.5), obs=y)


def _regression_data(n=8, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = features @ torch.randn(D, generator=g, dtype=torch.float64)
    y = y + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    cov = features @ features.T + 0.25 * torch.eye(n, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=y.dtype), cov)
    return y, features, float(exact.log_prob(y))


def _masked(model, args, exact, **options):
    def run(seed):
        pyro.set_rng_seed(seed)
        return MaskedELBO(**options).estimate(model, None, *args), exact

    return run


def _reference(seed_data=0):
    X, params, exact = _ppca_data(N=10, T=4, K=1, noise=1.0, seed=seed_data)

    def run(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            ppca_latent, X, **params, method="importance", num_samples=2000, progress=False
        )
        return ref, exact

    return run


def settings(masks=None):
    """name -> ``seed -> (estimate, exact)``, the rows of the issue's table; ``masks``: the
    stratified rows' masks (``None``: the default, ``"auto"``)."""
    X, params, exact = _ppca_data()
    # importance conditionals: a posterior close enough to the prior for S = 512 draws
    Xi, params_i, exact_i = _ppca_data(N=10, T=4, K=1, noise=1.0)
    y, features, exact_r = _regression_data()
    out = {
        "per-sequence masks, K=4": _masked(
            ppca_collapsed, (X, *params.values()), exact, num_masks=4, masks=masks
        ),
        "one sequence, K=2": _masked(
            regression,
            (y, features),
            exact_r,
            num_masks=2,
            masks=masks,
            token_plate="data",
            conditionals="quadrature",  # 80^2 points: 1e-6 from exact, no particle error
            quadrature_points=80,
        ),
        "importance conditionals, chain": _masked(
            ppca_latent,
            (Xi, *params_i.values()),
            exact_i,
            estimator="chain",
            num_masks=2,
            conditionals="importance",
            num_samples=512,
        ),
        "importance conditionals, stratified, K=8": _masked(
            ppca_latent,
            (Xi, *params_i.values()),
            exact_i,
            num_masks=8,
            masks=masks,
            conditionals="importance",
            num_samples=512,
        ),
        "importance reference, S=2000": _reference(),
    }
    for K in (2, 4, 8):
        out[f"shared masks, K={K}"] = _masked(
            ppca_collapsed,
            (X, *params.values()),
            exact,
            num_masks=K,
            share_masks=True,
            masks=masks,
        )
    return out


def coverage(run, seeds, level=0.95):
    """``(coverage, sd of z, seconds)`` of ``run``'s reported ``level`` interval over
    ``seeds``; ``z = (estimate - exact) / stderr``."""
    start, hits, zs = time.perf_counter(), 0, []
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the diagnostics' warnings
            est, exact = run(seed)
        low, high = est.ci(level)
        hits += low <= exact <= high
        curve = not hasattr(est, "total")
        value = float(est.area if curve else est.total)
        zs.append((value - exact) / (est.area_stderr if curve else est.stderr))
    z = torch.tensor(zs, dtype=torch.float64)
    return hits / len(seeds), float(z.std()), time.perf_counter() - start


def trust_rates(N_seq, noise, S, seeds):
    """Over ``seeds``: ``(accurate, flagged, flagged_any, flagged_accurate)``: the fraction of
    importance references on PPCA data (``N_seq`` sequences, ``T = 6``, two latents)
    within 1.96 s.e. of the exact value; flagged by the data-level verdict
    (``trustworthy=False``); with some sequence failing its own verdict (the old,
    any-sequence rule); and flagged among the accurate ones (the false-alarm rate)."""
    X, params, exact = _ppca_data(N=N_seq, T=6, K=2, noise=noise)
    accurate = flagged = flagged_any = false_alarms = 0
    for seed in seeds:
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref = log_marginal_likelihood(
                ppca_latent, X, **params, method="importance", num_samples=S, progress=False
            )
        ok = abs(float(ref.total) - exact) <= 1.96 * ref.stderr
        accurate += ok
        flagged += not ref.trustworthy
        flagged_any += not bool(ref.sequence_trustworthy.all())
        false_alarms += ok and not ref.trustworthy
    n = len(seeds)
    return accurate / n, flagged / n, flagged_any / n, false_alarms / max(accurate, 1)


def hard_settings(masks=None):
    """name -> ``seed -> (estimate, exact)``: importance conditionals where the posterior is
    far from the prior (PPCA N=20, T=6, two latents, noise 0.3, S=256; the ESS warning
    fires), the regime of the particles' jackknife bias correction; ``masks``: the stratified
    row's masks (``None``: the default)."""
    X, params, exact = _ppca_data(noise=0.3)
    args = (X, *params.values())
    common = dict(conditionals="importance", num_samples=256)
    return {
        "hard, stratified, K=8": _masked(
            ppca_latent, args, exact, num_masks=8, masks=masks, **common
        ),
        "hard, chain": _masked(ppca_latent, args, exact, estimator="chain", num_masks=2, **common),
    }


def smc_setting(num_samples):
    """``seed -> (reference, exact)``: the SMC reference on eight schools with a latent tau
    (``tests/test_smc.py``'s model; exact value by a fine grid over tau)."""
    from tests.test_smc import SIGMA, Y, eight_schools, eight_schools_latent_exact

    exact = eight_schools_latent_exact()

    def run(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            eight_schools,
            Y,
            SIGMA,
            method="smc",
            num_samples=num_samples,
            token_plate="schools",
            progress=False,
        )
        return ref, exact

    return run


def hard_curve_setting(num_masks=8, masks="auto"):
    """``seed -> (curve, exact)``: :func:`~pyro_mpt.mpt_curve` in the hard regime of
    :func:`hard_settings` (its area corrected for the particles' bias as a whole)."""
    X, params, exact = _ppca_data(noise=0.3)

    def run(seed):
        pyro.set_rng_seed(seed)
        curve = mpt_curve(
            ppca_latent,
            X,
            *params.values(),
            num_masks=num_masks,
            masks=masks,
            conditionals="importance",
            num_samples=256,
        )
        return curve, exact

    return run


def mpt_trust_rates(run, seeds, level=0.95):
    """Over ``seeds`` of a masked-estimate setting ``run``: ``(accurate, flagged,
    false_alarms)``, the fraction whose ``level`` interval covers the exact value, the
    fraction with ``reliable=False``, and the fraction flagged among the accurate ones (the
    flag's false-alarm rate)."""
    accurate = flagged = false_alarms = 0
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est, exact = run(seed)
        low, high = est.ci(level)
        ok = low <= exact <= high
        accurate += ok
        flagged += not est.reliable
        false_alarms += ok and not est.reliable
    n = len(seeds)
    return accurate / n, flagged / n, false_alarms / max(accurate, 1)


def subset_scores(X, loc, cov):
    r"""``{M: (N,) s(M)}`` for every non-empty subset ``M`` of the ``T`` tokens of ``X``
    ``(N, T)`` under :math:`\mathcal N(\mathrm{loc}, \mathrm{cov})`:
    :math:`s(M) = \frac1m\sum_{j\in M}\log p(x_j \mid x_{-M})` from the dense Gaussian's
    conditionals (no pyro_mpt)."""
    T = X.shape[-1]
    out = {}
    for m in range(1, T + 1):
        for M in combinations(range(T), m):
            O = [t for t in range(T) if t not in M]
            total = torch.zeros(X.shape[0], dtype=X.dtype)
            for j in M:
                k = cov[j, O] @ torch.linalg.inv(cov[O][:, O]) if O else cov.new_zeros(0)
                mean = loc[j] + (X[:, O] - loc[O]) @ k
                var = cov[j, j] - k @ cov[O, j]
                total += torch.distributions.Normal(mean, var.sqrt()).log_prob(X[:, j])
            out[M] = total / m
    return out


def independent_draw_values(X, loc, cov):
    r"""``(D, N)``: the :math:`D = \prod_m \binom{T}{m}` equally likely values of one
    stratified draw :math:`\sum_m s(M_m)` with independent uniform masks (small ``T``;
    :func:`subset_scores`), every sequence's exact law."""
    s = subset_scores(X, loc, cov)
    values = torch.zeros(1, X.shape[0], dtype=X.dtype)
    for m in range(1, X.shape[-1] + 1):
        size = torch.stack([v for M, v in s.items() if len(M) == m])  # (C(T, m), N)
        values = (values.unsqueeze(1) + size.unsqueeze(0)).reshape(-1, X.shape[0])
    return values


def simulated_coverage(values, exact, K, reps=100_000, seed=0, level=0.95):
    r"""``(coverage, corr(|error|, se), mean z)`` of the package's interval for the total
    of ``K`` draws per sequence (mean of the draws, variance
    :math:`\sum_n \widehat{\mathrm{Var}}(d_n)/K`, Student-t on Welch-Satterthwaite's dof),
    simulated ``reps`` times from the exact law ``values`` ``(D, N)``
    (:func:`independent_draw_values`) around ``exact`` :math:`\log p(X)`."""
    from scipy.stats import t

    g = torch.Generator().manual_seed(seed)
    errs, ses, hits = [], [], 0
    for start in range(0, reps, 20_000):  # chunks bound the (reps, K, N) draws
        R = min(20_000, reps - start)
        idx = torch.randint(values.shape[0], (R, K, values.shape[1]), generator=g)
        draws = values[idx, torch.arange(values.shape[1])]
        v = draws.var(1) / K
        se = v.sum(-1).sqrt()
        dof = v.sum(-1) ** 2 / (v**2 / (K - 1)).sum(-1)
        q = torch.as_tensor(t.ppf(0.5 * (1 + level), dof.numpy()), dtype=se.dtype)
        err = draws.mean(1).sum(-1) - exact
        hits += int((err.abs() <= q * se).sum())
        errs.append(err)
        ses.append(se)
    err, se = torch.cat(errs), torch.cat(ses)
    corr = float(torch.corrcoef(torch.stack([err.abs(), se]))[0, 1])
    return hits / reps, corr, float((err / se).mean())


def ladder_settings(method, num_samples=2048):
    """``{name: seed -> (reference, exact)}``: the reference ``method`` (the upper rungs of
    the "auto" ladder, ``"smc_importance"`` and ``"smc"``) on eight schools with a latent
    tau (exact by a grid) and on latent PPCA far from its prior (N=50, T=8, two latents,
    noise 0.5, ``benchmarks/bench_smc.py``'s regime; exact by the dense Gaussian)."""
    from pyro_mpt.models import ppca_latent as ppca_z
    from pyro_mpt.models import sample_ppca
    from tests.test_smc import SIGMA, Y, eight_schools, eight_schools_latent_exact

    schools_exact = eight_schools_latent_exact()
    g = torch.Generator().manual_seed(0)
    X, truth = sample_ppca(50, 8, 2, 0.5, generator=g)
    X, truth = X.double(), {k: v.double() for k, v in truth.items()}
    noise_var = truth["noise_scale"] ** 2 * torch.ones(8, dtype=torch.float64)
    ppca_exact = float(
        dist.LowRankMultivariateNormal(truth["loc"], truth["W"], noise_var).log_prob(X).sum()
    )

    def schools(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            eight_schools,
            Y,
            SIGMA,
            method=method,
            num_samples=num_samples,
            token_plate="schools",
            progress=False,
        )
        return ref, schools_exact

    def ppca(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            lambda X: ppca_z(X, 2, **truth),
            X,
            method=method,
            num_samples=num_samples,
            progress=False,
        )
        return ref, ppca_exact

    return {"eight schools, latent tau": schools, "latent PPCA, noise 0.5": ppca}


def ladder_settings_linear(method, num_samples=2048):
    """``{name: seed -> (reference, exact)}``: the reference ``method`` on two linear-Gaussian
    models of issue 13 treated as if they were not Gaussian: the Kalman chain of
    ``tests/test_smc.py`` (10 sequences of 6 steps, one latent site per step under
    ``pyro.markov``) and its Bayesian linear regression with a global latent (30 data
    points, 3 weights); exact values by the dense Gaussian."""
    from tests.test_smc import kalman, kalman_exact, regression

    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    kalman_value = kalman_exact(x)
    model, args, kwargs, plate, regression_value = regression()

    def kalman_run(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            kalman, x, method=method, num_samples=num_samples, progress=False
        )
        return ref, kalman_value

    def regression_run(seed):
        pyro.set_rng_seed(seed)
        ref = log_marginal_likelihood(
            model,
            *args,
            method=method,
            num_samples=num_samples,
            token_plate=plate,
            progress=False,
            **kwargs,
        )
        return ref, regression_value

    return {"Kalman chain": kalman_run, "Bayesian linear regression": regression_run}


def smc_conditionals_settings(estimator, num_samples=128, num_masks=6):
    """``{name: seed -> (estimate, exact)}``: ``MaskedELBO`` with ``conditionals="smc"``
    (``estimator`` ``"chain"`` or ``"stratified"``, nested masks for the latter) on the
    Kalman chain and the Bayesian regression of ``tests/test_smc.py``, treated as if they
    were not Gaussian; and (``"stratified"`` only) hard PPCA with the default masks."""
    from tests.test_smc import kalman, kalman_exact, regression

    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    model, args, kwargs, plate, regression_value = regression()
    nested = {"masks": "nested"} if estimator == "stratified" else {}

    def runner(fn, fn_args, fn_kwargs, exact, **options):
        elbo = MaskedELBO(
            estimator=estimator,
            conditionals="smc",
            num_samples=num_samples,
            num_masks=num_masks,
            **options,
        )

        def run(seed):
            pyro.set_rng_seed(seed)
            return elbo.estimate(fn, None, *fn_args, **fn_kwargs), exact

        return run

    out = {
        "Kalman chain": runner(kalman, (x,), {}, kalman_exact(x), **nested),
        "Bayesian linear regression": runner(
            model, args, kwargs, regression_value, token_plate=plate, **nested
        ),
    }
    if estimator == "stratified":
        X, params, exact = _ppca_data()
        out["PPCA hard, default masks"] = runner(ppca_latent, (X,), params, exact)
    return out
