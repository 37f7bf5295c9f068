"""Linear-Gaussian models of the zoo, written as Pyro's tutorials write them, each with its
exact log-likelihood computed without pyro_mpt (a Kalman filter, a collapsed low-rank
Gaussian, a dense Gaussian in closed form)."""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

# ----------------------------------------------------------------------------------------
# Kalman filter (a 2-D random-walk-with-velocity state, scalar observations) with pyro.markov
# ----------------------------------------------------------------------------------------


def transition():
    """``(F, q)``: position += 0.5 velocity, velocity decays; the state noise's scale_tril
    (built when called, in the default dtype)."""
    return torch.tensor([[1.0, 0.5], [0.0, 0.9]]), torch.tensor([[0.3, 0.0], [0.1, 0.2]])


def kalman_params():
    """The trainable parameters: observation weights ``H``, offset ``b``, noise ``r``."""
    H = pyro.param("H", torch.tensor([1.0, 0.3]))
    b = pyro.param("b", torch.tensor(0.2))
    r = pyro.param("r", torch.tensor(0.4), constraint=constraints.positive)
    return H, b, r


def kalman(y):
    """``N`` independent sequences of ``T`` scalar observations of a 2-D linear state."""
    H, b, r = kalman_params()
    N, T = y.shape
    F, q = transition()
    with pyro.plate("sequences", N, dim=-1):
        z = pyro.sample("z_0", dist.MultivariateNormal(torch.zeros(2), scale_tril=torch.eye(2)))
        for t in pyro.markov(range(T)):
            if t > 0:
                z = pyro.sample(f"z_{t}", dist.MultivariateNormal(z @ F.T, scale_tril=q))
            pyro.sample(f"y_{t}", dist.Normal(z @ H + b, r), obs=y[:, t])


def kalman_log_likelihood(y, H, b, r):
    """``(N,)`` log p(y_n) by the Kalman filter's prediction-error decomposition."""
    F, q = transition()
    Q = q @ q.T
    N, T = y.shape
    m, P = torch.zeros(N, 2), torch.eye(2)
    total = torch.zeros(N)
    for t in range(T):
        if t > 0:
            m, P = m @ F.T, F @ P @ F.T + Q
        S = H @ P @ H + r**2  # innovation variance
        e = y[:, t] - (m @ H + b)
        total = total - 0.5 * (math.log(2 * math.pi) + S.log() + e**2 / S)
        gain = P @ H / S
        m = m + e[:, None] * gain
        P = P - torch.outer(gain, H @ P)
    return total


def kalman_data(N=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, generator=g).cumsum(-1) * 0.5


# ----------------------------------------------------------------------------------------
# PPCA with an explicit latent z per row
# ----------------------------------------------------------------------------------------


def ppca(X, K=2):
    """Probabilistic PCA: ``z_n ~ N(0, I_K)``, ``x_n ~ N(W z_n + mu, sigma^2 I)``."""
    N, T = X.shape
    W = pyro.param("W", torch.linspace(-1.0, 1.0, T * K).reshape(T, K))
    mu = pyro.param("mu", torch.zeros(T))
    sigma = pyro.param("sigma", torch.tensor(0.7), constraint=constraints.positive)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=X)


def ppca_log_likelihood(X, W, mu, sigma):
    """``(N,)`` the collapsed PPCA density ``N(mu, W W^T + sigma^2 I)``."""
    T = X.shape[-1]
    return dist.LowRankMultivariateNormal(mu, W, (sigma**2).expand(T)).log_prob(X)


def ppca_data(N=6, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 2, generator=g) @ torch.randn(2, T, generator=g) + 0.3 * torch.randn(
        N, T, generator=g
    )


# ----------------------------------------------------------------------------------------
# Bayesian linear regression: a global weight vector couples the data points
# ----------------------------------------------------------------------------------------


def blr(X, y, prior_scale=1.5, noise=0.5):
    """``w ~ N(0, s^2 I)``, ``y_i ~ N(x_i^T w, sigma^2)``; mask with token_plate="data"."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, noise), obs=y)


def blr_log_likelihood(X, y, prior_scale=1.5, noise=0.5):
    """log N(y; 0, s^2 X X^T + sigma^2 I)."""
    cov = prior_scale**2 * X @ X.T + noise**2 * torch.eye(X.shape[0])
    return dist.MultivariateNormal(torch.zeros(X.shape[0]), cov).log_prob(y)


def blr_data(n=12, D=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(n, generator=g)
    return X, y


# ----------------------------------------------------------------------------------------
# Eight schools with a fixed between-school scale tau
# ----------------------------------------------------------------------------------------

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y, tau=5.0):
    """``mu ~ N(0, 5^2)``, ``theta_j ~ N(mu, tau^2)``, ``y_j ~ N(theta_j, sigma_j^2)``;
    mask with token_plate="schools"."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_log_likelihood(sigma, y, tau=5.0):
    """log N(y; 0, 5^2 1 1^T + diag(tau^2 + sigma^2))."""
    J = len(sigma)
    cov = 25.0 * torch.ones(J, J) + torch.diag(tau**2 + sigma**2)
    return dist.MultivariateNormal(torch.zeros(J), cov).log_prob(y)


# ----------------------------------------------------------------------------------------
# Models that are NOT linear-Gaussian
# ----------------------------------------------------------------------------------------


def eight_schools_random_tau(sigma, y):
    """The same with a latent scale tau ~ HalfCauchy(5): not linear-Gaussian."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def gamma_scale(X):
    """Normal observations whose precision is a Gamma latent."""
    with pyro.plate("data", X.shape[0]):
        prec = pyro.sample("prec", dist.Gamma(2.0, 2.0))
        pyro.sample("x", dist.Normal(0.0, prec.rsqrt().unsqueeze(-1)).to_event(1), obs=X)


def nonlinear_mean(X):
    """All Normal, but the observations' mean is tanh of the latent."""
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(torch.tanh(z).unsqueeze(-1), 0.5).to_event(1), obs=X)


def latent_scale(X):
    """All Normal, but the latent u's scale depends on the latent z."""
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        u = pyro.sample("u", dist.Normal(z, z.exp()))
        pyro.sample("x", dist.Normal(u.unsqueeze(-1), 0.5).to_event(1), obs=X)


def ar_observations(y):
    """AR(1) observations around a latent level: y_t's mean depends on observed y_{t-1}."""
    N, T = y.shape
    with pyro.plate("sequences", N):
        level = pyro.sample("level", dist.Normal(0.0, 1.0))
        prev = torch.zeros(N)
        for t in pyro.markov(range(T)):
            prev = pyro.sample(f"y_{t}", dist.Normal(level + 0.5 * prev, 1.0), obs=y[:, t])


def masked_ppca(X, present):
    """PPCA whose missing rows are masked out with poutine.mask: not served by this route
    (yet), so it must be refused rather than scored as if observed."""
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.poutine.mask(mask=present):
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 0.5).to_event(1), obs=X)


def scaled_prior(X):
    """A latent prior tempered with poutine.scale: not a plain Gaussian joint."""
    with pyro.plate("data", X.shape[0]):
        with pyro.poutine.scale(scale=0.5):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), 0.5).to_event(1), obs=X)


def ppca_subsampled(X, offsets, batch_size=3):
    """PPCA with a known per-row offset, on a random minibatch of rows, as Pyro's SVI
    tutorials subsample."""
    N, T = X.shape
    W = pyro.param("W", torch.linspace(-1.0, 1.0, T * 2).reshape(T, 2))
    with pyro.plate("data", N, subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + offsets[idx], 0.7).to_event(1), obs=X[idx])


def ppca_row_noise(X, K=2):
    """PPCA with one noise scale per row, all initialised alike (equal values, distinct
    parameters: one shared kernel would average their gradients)."""
    N, T = X.shape
    W = pyro.param("W", torch.linspace(-1.0, 1.0, T * K).reshape(T, K))
    sigma = pyro.param("sigma", torch.full((N,), 0.7), constraint=constraints.positive)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, sigma.unsqueeze(-1)).to_event(1), obs=X)


def noise_tril(T):
    """A fixed correlated observation-noise scale_tril (built in the default dtype)."""
    return 0.5 * torch.eye(T) + 0.2 * torch.tril(torch.ones(T, T), -1)


def factor_model_mvn(X, K=2):
    """A factor model with correlated noise: ``z_n ~ N(0, I)``,
    ``x_n ~ MultivariateNormal(W z_n + mu, L L^T)``."""
    N, T = X.shape
    W = pyro.param("W", torch.linspace(-1.0, 1.0, T * K).reshape(T, K))
    mu = pyro.param("mu", torch.zeros(T))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(K), torch.eye(K)))
        pyro.sample("x", dist.MultivariateNormal(z @ W.T + mu, scale_tril=noise_tril(T)), obs=X)


def factor_model_mvn_log_likelihood(X, W, mu):
    L = noise_tril(X.shape[-1])
    return dist.MultivariateNormal(mu, W @ W.T + L @ L.T).log_prob(X)
