"""Reference models: the Pyro models every test, tutorial and benchmark of pyro_mpt uses,
with their closed-form log marginal likelihoods and data generators.

Each model is a plain Pyro model ``model(data, ...)``. Parameters passed as tensors are held
fixed; parameters left as ``None`` become ``pyro.param`` sites (learned by SVI) with the names
given in each docstring. Data of shape ``(N, T)`` are ``N`` sequences of ``T`` tokens.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

__all__ = [
    "bayesian_linear_regression_collapsed",
    "bayesian_linear_regression_latent",
    "bayesian_linear_regression_log_marginal",
    "bernoulli_latent_linear",
    "gaussian_mixture",
    "gaussian_mixture_log_marginal",
    "hmm",
    "hmm_log_marginal",
    "multivariate_normal",
    "ppca_collapsed",
    "ppca_latent",
    "ppca_log_marginal",
    "ppca_maximum_likelihood",
    "sample_hmm",
    "sample_ppca",
]


def _param(name, value, init):
    """A fixed tensor if one is given, else a ``pyro.param`` initialised lazily by ``init``."""
    if value is not None:
        return value
    return pyro.param(name, init)


def _positive_param(name, value, init):
    if value is not None:
        return value
    return pyro.param(name, init, constraint=dist.constraints.positive)


# ----------------------------------------------------------------------------------------
# Probabilistic PCA (Tipping & Bishop 1999)
# ----------------------------------------------------------------------------------------


def sample_ppca(
    num_data,
    num_tokens,
    latent_dim,
    noise_scale=0.5,
    *,
    generator=None,
    dtype=torch.float64,
    device=None,
):
    r"""Draws PPCA data :math:`x_n = W z_n + \mu + \sigma \epsilon_n`, :math:`z_n, \epsilon_n`
    standard normal.

    :param int num_data: N, the number of sequences.
    :param int num_tokens: T, the observed dimension.
    :param int latent_dim: K.
    :param float noise_scale: :math:`\sigma` (the paper uses precision 5, i.e. 0.447).
    :param torch.Generator generator: optional random generator.
    :returns: ``(X, truth)``: data of shape ``(N, T)`` and a dict with the true
        ``W`` (T, K), ``loc`` (T,) and ``noise_scale`` (scalar tensor).

    Example::

        X, truth = sample_ppca(500, 10, 2, generator=torch.Generator().manual_seed(0))
        X.shape, truth["W"].shape                   # (500, 10), (10, 2)

    Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
    JRSS B 61(3), 1999.
    """
    kw = dict(dtype=dtype, device=device, generator=generator)
    W = torch.randn(num_tokens, latent_dim, **kw)
    loc = torch.randn(num_tokens, **kw) * 0.5
    z = torch.randn(num_data, latent_dim, **kw)
    eps = torch.randn(num_data, num_tokens, **kw)
    X = z @ W.T + loc + noise_scale * eps
    noise = torch.tensor(noise_scale, dtype=dtype, device=device)
    return X, {"W": W, "loc": loc, "noise_scale": noise}


def ppca_collapsed(data, latent_dim, W=None, loc=None, noise_scale=None):
    r"""PPCA with the latent integrated out:
    :math:`x_n \sim \mathcal{N}(\mu, W W^\top + \sigma^2 I)`, a
    :class:`~pyro.distributions.LowRankMultivariateNormal` over the ``T`` tokens of each row.

    Learnable parameters (when not given): ``"W"`` (T, K), ``"loc"`` (T,),
    ``"noise_scale"`` (positive scalar).

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K`.

    Example::

        svi = SVI(lambda X: ppca_collapsed(X, 2), None, Adam({"lr": 0.05}), loss=MaskedELBO())
        svi.step(X)                                 # X: (N, T)
        mpt_curve(ppca_collapsed, X, 2).area        # ~ ppca_log_marginal(X, **params)

    Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
    JRSS B 61(3), 1999.
    """
    N, T = data.shape
    W = _param(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    loc = _param("loc", loc, lambda: torch.zeros(T, dtype=data.dtype, device=data.device))
    sigma = _positive_param(
        "noise_scale", noise_scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    cov_diag = (sigma**2).expand(T)
    with pyro.plate("data", N):
        pyro.sample("x", dist.LowRankMultivariateNormal(loc, W, cov_diag), obs=data)


def ppca_latent(data, latent_dim, W=None, loc=None, noise_scale=None):
    r"""PPCA with an explicit local latent: :math:`z_n \sim \mathcal{N}(0, I_K)`,
    :math:`x_{n,t} \mid z_n \sim \mathcal{N}(W_t^\top z_n + \mu_t, \sigma^2)`.

    Same parameters and the same marginal as :func:`ppca_collapsed`.

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K`.

    Example::

        ref = log_marginal_likelihood(ppca_latent, X, 2, **truth)   # X, truth from sample_ppca
        ref.total, ppca_log_marginal(X, **truth)                    # agree up to MC error

    Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
    JRSS B 61(3), 1999.
    """
    N, T = data.shape
    W = _param(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    loc = _param("loc", loc, lambda: torch.zeros(T, dtype=data.dtype, device=data.device))
    sigma = _positive_param(
        "noise_scale", noise_scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    zero = torch.zeros(latent_dim, dtype=data.dtype, device=data.device)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
        mean = z @ W.T + loc
        pyro.sample("x", dist.Normal(mean, sigma).to_event(1), obs=data)


def ppca_log_marginal(data, W, loc, noise_scale):
    r"""Exact :math:`\sum_n \log \mathcal{N}(x_n; \mu, W W^\top + \sigma^2 I)`.

    :param torch.Tensor data: ``(N, T)``.
    :param W: ``(T, K)``.
    :param loc: ``(T,)``.
    :param noise_scale: :math:`\sigma`, a scalar.
    :returns: a scalar tensor.

    Example::

        X, truth = sample_ppca(500, 10, 2)
        ppca_log_marginal(X, **truth)

    Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
    JRSS B 61(3), 1999.
    """
    T = data.shape[-1]
    cov_diag = (torch.as_tensor(noise_scale, dtype=data.dtype, device=data.device) ** 2).expand(T)
    return dist.LowRankMultivariateNormal(loc, W, cov_diag).log_prob(data).sum()


def ppca_maximum_likelihood(data, latent_dim):
    r"""The closed-form maximum-likelihood PPCA fit (Tipping & Bishop 1999, eqs. 7-8):
    :math:`\mu = \bar x`, :math:`\sigma^2 = \frac{1}{T-K}\sum_{k>K}\lambda_k`,
    :math:`W = U_K (\Lambda_K - \sigma^2 I)^{1/2}`, with :math:`\lambda, U` the eigenpairs of
    the sample covariance.

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K < T`.
    :returns: dict with ``W`` (T, K), ``loc`` (T,), ``noise_scale`` (scalar).

    Example::

        fit = ppca_maximum_likelihood(X, 2)        # X: (N, T)
        ppca_log_marginal(X, **fit)                 # the maximum of log p(X) over W, loc, sigma

    Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
    JRSS B 61(3), 1999.
    """
    N, T = data.shape
    loc = data.mean(0)
    centred = data - loc
    cov = centred.T @ centred / N
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[latent_dim:].mean()
    W = evecs[:, :latent_dim] * (evals[:latent_dim] - sigma2).clamp(min=0).sqrt()
    return {"W": W, "loc": loc, "noise_scale": sigma2.sqrt()}


# ----------------------------------------------------------------------------------------
# Full multivariate normal
# ----------------------------------------------------------------------------------------


def multivariate_normal(data, loc, covariance):
    r""":math:`x_n \sim \mathcal{N}(\mu, \Sigma)` with a dense covariance (no latents).

    :param torch.Tensor data: ``(N, T)``.
    :param loc: :math:`\mu`, ``(T,)``.
    :param covariance: :math:`\Sigma`, ``(T, T)`` positive definite.

    Example::

        curve = mpt_curve(multivariate_normal, X, loc, cov)    # exact "gaussian" conditionals
        curve.area                  # ~ dist.MultivariateNormal(loc, cov).log_prob(X).sum()

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=data)


# ----------------------------------------------------------------------------------------
# Bernoulli latent linear model (the paper's binary experiment)
# ----------------------------------------------------------------------------------------


def bernoulli_latent_linear(data, latent_dim=2, W=None, bias=None):
    r"""Binary tokens with a local Gaussian latent and a logistic link:
    :math:`z_n \sim \mathcal{N}(0, I_K)`,
    :math:`x_{n,t} \mid z_n \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(W_t^\top z_n + b_t))`.

    Learnable parameters: ``"W"`` (T, K), ``"bias"`` (T,).

    :param torch.Tensor data: ``(N, T)`` zeros and ones.
    :param int latent_dim: :math:`K`.

    Example::

        X, truth = synthetic_binary(num_data=200)   # from pyro_mpt.experiments
        log_marginal_likelihood(bernoulli_latent_linear, X, 2, **truth, method="quadrature")

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N, T = data.shape
    W = _param(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    bias = _param("bias", bias, lambda: torch.zeros(T, dtype=data.dtype, device=data.device))
    zero = torch.zeros(latent_dim, dtype=data.dtype, device=data.device)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ W.T + bias).to_event(1), obs=data)


# ----------------------------------------------------------------------------------------
# Gaussian mixture with an enumerated assignment
# ----------------------------------------------------------------------------------------


def gaussian_mixture(data, num_components=3, weights=None, locs=None, scale=None):
    r"""A mixture of isotropic Gaussians with a local enumerated assignment:
    :math:`c_n \sim \mathrm{Categorical}(\pi)`,
    :math:`x_{n,t} \mid c_n \sim \mathcal{N}(\mu_{c_n, t}, \sigma^2)`.

    ``c`` is marked ``infer={"enumerate": "parallel"}``. Learnable parameters: ``"weights"``
    (C,, simplex), ``"locs"`` (C, T), ``"scale"`` (positive scalar).

    :param torch.Tensor data: ``(N, T)``.
    :param int num_components: :math:`C`.

    Example::

        est = MaskedELBO(num_masks=4).estimate(gaussian_mixture, None, X, 3)   # X: (N, T)
        est.total                                   # "enumerate" conditionals

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N, T = data.shape
    C = num_components
    if weights is None:
        weights = pyro.param(
            "weights",
            lambda: torch.full((C,), 1.0 / C, dtype=data.dtype, device=data.device),
            constraint=dist.constraints.simplex,
        )
    locs = _param("locs", locs, lambda: torch.randn(C, T, dtype=data.dtype, device=data.device))
    scale = _positive_param(
        "scale", scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    with pyro.plate("data", N):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[c], scale).to_event(1), obs=data)


def gaussian_mixture_log_marginal(data, weights, locs, scale):
    r"""Exact :math:`\sum_n \log \sum_c \pi_c \prod_t \mathcal{N}(x_{n,t}; \mu_{c,t}, \sigma^2)`.

    :param torch.Tensor data: ``(N, T)``.
    :param weights: :math:`\pi`, ``(C,)``.
    :param locs: :math:`\mu`, ``(C, T)``.
    :param scale: :math:`\sigma`, a scalar.
    :returns: a scalar tensor.

    Example::

        gaussian_mixture_log_marginal(X, torch.ones(3) / 3, locs, 0.5)   # locs: (3, T)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    comp = dist.Normal(locs, scale).log_prob(data.unsqueeze(-2)).sum(-1)  # (N, C)
    return torch.logsumexp(comp + weights.log(), -1).sum()


# ----------------------------------------------------------------------------------------
# Bayesian linear regression
# ----------------------------------------------------------------------------------------


def bayesian_linear_regression_collapsed(y, features, prior_scale=1.0, noise_scale=0.5):
    r"""Bayesian linear regression with the weights integrated out: the ``N`` responses form
    one sequence of ``N`` tokens,
    :math:`y \sim \mathcal{N}(0, \alpha^2 \Phi \Phi^\top + \sigma^2 I)`.

    :param torch.Tensor y: ``(N,)`` responses.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``.
    :param float prior_scale: :math:`\alpha`.
    :param float noise_scale: :math:`\sigma`.

    Example::

        curve = mpt_curve(bayesian_linear_regression_collapsed, y, Phi)   # y: (N,), Phi: (N, D)
        curve.area, bayesian_linear_regression_log_marginal(y, Phi)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N = y.shape[-1]
    cov = prior_scale**2 * features @ features.T + noise_scale**2 * torch.eye(
        N, dtype=y.dtype, device=y.device
    )
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), cov), obs=y)


def bayesian_linear_regression_latent(y, features, prior_scale=1.0, noise_scale=0.5):
    r"""Bayesian linear regression with a global latent weight vector:
    :math:`w \sim \mathcal{N}(0, \alpha^2 I_D)`,
    :math:`y_i \mid w \sim \mathcal{N}(\phi_i^\top w, \sigma^2)` in plate ``"data"``.

    The global ``w`` couples the data points: score it with ``token_plate="data"``.

    :param torch.Tensor y: ``(N,)`` responses.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``, rows :math:`\phi_i`.
    :param float prior_scale: :math:`\alpha`.
    :param float noise_scale: :math:`\sigma`.

    Example::

        curve = mpt_curve(bayesian_linear_regression_latent, y, Phi, token_plate="data")
        curve.area, bayesian_linear_regression_log_marginal(y, Phi)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    D = features.shape[-1]
    zero = torch.zeros(D, dtype=y.dtype, device=y.device)
    w = pyro.sample("w", dist.Normal(zero, prior_scale).to_event(1))
    with pyro.plate("data", y.shape[-1]):
        # (features * w).sum(-1), not features @ w: under a particle plate w has shape
        # (S, 1, D) (the 1 is this plate) and must broadcast against features (N, D)
        pyro.sample("y", dist.Normal((features * w).sum(-1), noise_scale), obs=y)


def bayesian_linear_regression_log_marginal(y, features, prior_scale=1.0, noise_scale=0.5):
    r"""Exact :math:`\log \mathcal{N}(y; 0, \alpha^2 \Phi\Phi^\top + \sigma^2 I)`.

    :param torch.Tensor y: ``(N,)``.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``.
    :returns: a scalar tensor.

    Example::

        bayesian_linear_regression_log_marginal(y, Phi, prior_scale=1.0, noise_scale=0.5)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N = y.shape[-1]
    cov = prior_scale**2 * features @ features.T + noise_scale**2 * torch.eye(
        N, dtype=y.dtype, device=y.device
    )
    return dist.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)


# ----------------------------------------------------------------------------------------
# Discrete hidden Markov model
# ----------------------------------------------------------------------------------------


def hmm(data, initial, transition, emission):
    r"""A discrete HMM, one sequence per row of ``data`` (N, T) of integer symbols:
    :math:`z_1 \sim \pi`, :math:`z_t \mid z_{t-1} \sim A_{z_{t-1}}`,
    :math:`x_t \mid z_t \sim B_{z_t}`. The hidden chain is enumerated under
    :func:`pyro.markov`; the ``T`` observed sites ``x_0 .. x_{T-1}`` are the tokens.

    :param torch.Tensor data: long ``(N, T)`` symbols in ``0..V-1``.
    :param initial: (C,) initial state probabilities.
    :param transition: (C, C) row-stochastic transition matrix.
    :param emission: (C, V) row-stochastic emission matrix.

    Example::

        initial, transition, emission = random_hmm(3, 5)  # from pyro_mpt.mlm
        X = sample_hmm(100, 8, initial, transition, emission)      # (100, 8)
        mpt_curve(hmm, X, initial, transition, emission).area      # ~ hmm_log_marginal(X, ...)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = initial if z is None else Vindex(transition)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Categorical(Vindex(emission)[z]), obs=data[:, t])


def hmm_log_marginal(data, initial, transition, emission):
    r"""The forward algorithm: exact :math:`\sum_n \log p(x_n)` of :func:`hmm`, per sequence
    summed. ``data`` is (N, T) of integer symbols.

    :math:`\log p(x_n) = \log \sum_{z_T} \alpha_T(z_T)` with
    :math:`\alpha_1(z) = \pi_z B_{z, x_1}` and
    :math:`\alpha_t(z) = B_{z, x_t} \sum_{z'} \alpha_{t-1}(z') A_{z' z}`.

    :param initial: :math:`\pi`, ``(C,)``.
    :param transition: :math:`A`, ``(C, C)``.
    :param emission: :math:`B`, ``(C, V)``.
    :returns: a scalar tensor.

    Example::

        hmm_log_marginal(X, initial, transition, emission)         # X: long (N, T)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    log_A = transition.log()
    log_B = emission.log()
    alpha = initial.log() + log_B[:, data[:, 0]].T  # (N, C)
    for t in range(1, data.shape[1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_A, -2) + log_B[:, data[:, t]].T
    return torch.logsumexp(alpha, -1).sum()


def sample_hmm(num_data, num_tokens, initial, transition, emission, *, generator=None):
    """Draws ``num_data`` sequences of ``num_tokens`` symbols from :func:`hmm`.

    :param int num_data: :math:`N`.
    :param int num_tokens: :math:`T`.
    :param initial: ``(C,)``; ``transition``: ``(C, C)``; ``emission``: ``(C, V)``.
    :param torch.Generator generator: optional random generator.
    :returns: a long tensor of shape (N, T).

    Example::

        X = sample_hmm(100, 8, *random_hmm(3, 5))                 # long (100, 8), in 0..4

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    N, T = num_data, num_tokens
    z = torch.multinomial(initial.expand(N, -1), 1, generator=generator).squeeze(-1)
    xs = []
    for t in range(T):
        if t > 0:
            z = torch.multinomial(transition[z], 1, generator=generator).squeeze(-1)
        xs.append(torch.multinomial(emission[z], 1, generator=generator).squeeze(-1))
    return torch.stack(xs, -1)
