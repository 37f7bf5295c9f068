"""Benchmark: masks drawn per sequence (the DEFAULT) against masks shared by the sequences of
a step (``share_masks=True``), as variance x time of the loss and of its gradient.

Shared masks let the low-rank Gaussian backend score a mask for every sequence by matrix
products, so a step is much faster; but every sequence of a step then sees the same masks,
their errors are correlated, and the variance of the summed loss (and of its gradient)
grows. What a user pays for a given standard error is variance x seconds (smaller is
better), printed for both. The gradient is that of the loss with respect to the model's
parameters (``W``, ``loc``, the noise scale), its variance summed over their entries.

Model: collapsed PPCA (``pyro_mpt.models.ppca_collapsed``), K = 5, float64, one thread,
parameters perturbed from the truth (so that the gradient is not near zero); the default
stratified estimator. ``--draws`` steps (loss + gradient) per setting after one warm-up.

Run:  python benchmarks/bench_share_masks.py [--sizes 64x50 256x200] [--draws 20]
"""

import argparse
import time

import pyro
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.models import ppca_collapsed, sample_ppca


def measure(elbo, model, X, params, draws):
    """``(variance of the loss, summed variance of the gradient, seconds per step)``."""
    elbo.differentiable_loss(model, None, X)  # warm-up
    losses, grads = [], []
    start = time.perf_counter()
    for _ in range(draws):
        loss = elbo.differentiable_loss(model, None, X)
        grad = torch.autograd.grad(loss, params)
        losses.append(loss.detach())
        grads.append(torch.cat([g.reshape(-1) for g in grad]))
    seconds = (time.perf_counter() - start) / draws
    return float(torch.stack(losses).var()), float(torch.stack(grads).var(0).sum()), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["64x50", "256x200"], help="NxT")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    K = 5
    print(f"collapsed PPCA, K={K}, float64, {args.threads} thread(s), {args.draws} draws")
    print(
        f"{'N':>5} {'T':>5} {'masks':<14} {'ms/step':>9} {'var(loss)':>11} "
        f"{'var(loss) x s':>14} {'var(grad)':>11} {'var(grad) x s':>14}"
    )
    for size in args.sizes:
        N, T = (int(v) for v in size.split("x"))
        pyro.set_rng_seed(0)
        X, truth = sample_ppca(num_data=N, num_tokens=T, latent_dim=K, noise_scale=0.5)
        W = (truth["W"] + 0.3 * torch.randn_like(truth["W"])).requires_grad_()
        loc = truth["loc"].clone().requires_grad_()
        scale = truth["noise_scale"].clone().requires_grad_()

        def model(data, W=W, loc=loc, scale=scale):
            ppca_collapsed(data, K, W, loc, scale)

        for label, share in (("per sequence", False), ("shared", True)):  # the default first
            pyro.set_rng_seed(1)
            v_loss, v_grad, sec = measure(
                MaskedELBO(share_masks=share), model, X, [W, loc, scale], args.draws
            )
            print(
                f"{N:>5} {T:>5} {label:<14} {sec * 1e3:9.1f} {v_loss:11.3e} "
                f"{v_loss * sec:14.3e} {v_grad:11.3e} {v_grad * sec:14.3e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
