"""Coverage of the importance reference's interval with the prior as proposal, against the
exact log-likelihood of latent PPCA (the dense Gaussian of the collapsed model, computed
without pyro_mpt): per seed, the error, the reported s.e., z = error / s.e. and the
trust verdict; then how many runs lie beyond 1.96 and 2.5 s.e., and how many of those
were reported trustworthy (silent misses).

Default regime: N=50 sequences, T=8 tokens, two latents, noise 0.5, 2048 draws (that of
``bench_smc.py``, where the posterior is far narrower than the prior).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_importance_bias.py [--seeds 20]
"""

import argparse
import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt.models import ppca_latent, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=50)
    parser.add_argument("--num-tokens", type=int, default=8)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    N, T, K = args.num_data, args.num_tokens, args.latent_dim
    zs, trusted = [], []
    for seed in range(args.seeds):
        X, truth = sample_ppca(N, T, K, args.noise, generator=torch.Generator().manual_seed(seed))
        noise_var = truth["noise_scale"] ** 2 * torch.ones(T)
        exact = float(
            dist.LowRankMultivariateNormal(truth["loc"], truth["W"], noise_var).log_prob(X).sum()
        )
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref = log_marginal_likelihood(
                ppca_latent, X, K, **truth, method="importance", num_samples=args.num_samples
            )
        err = float(ref.total) - exact
        zs.append(err / ref.stderr)
        trusted.append(ref.trustworthy)
        print(
            f"seed {seed}: error {err:+.2f}  s.e. {ref.stderr:.2f}  z {zs[-1]:+.2f}  "
            f"trustworthy {ref.trustworthy}",
            flush=True,
        )
    for bound in (1.96, 2.5):
        beyond = [abs(z) > bound for z in zs]
        silent = sum(b and t for b, t in zip(beyond, trusted))
        print(f"beyond {bound} s.e.: {sum(beyond)} of {len(zs)} ({silent} reported trustworthy)")


if __name__ == "__main__":
    main()
