"""Benchmark: does a ``torch.compile`` variant of MaskedELBO pay? One step (loss + backward)
of ``MaskedELBO().differentiable_loss`` eager against the same function wrapped in
``torch.compile``, in one process, for the default (stratified) and the chain estimator, with
the compile time of the first call.

Model: collapsed PPCA (``pyro_mpt.models.ppca_collapsed``), N = 256 sequences of T tokens,
K = 5, float64, one thread. Median of ``--repeats`` steps after two warm-up steps.

Run:  python benchmarks/bench_compile.py [--tokens 50] [--repeats 5]
"""

import argparse
import time
import warnings

import pyro
import torch
from timing import median_seconds

from pyro_mpt import MaskedELBO
from pyro_mpt.models import ppca_collapsed, sample_ppca


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--num-data", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)
    X, _ = sample_ppca(args.num_data, args.tokens, 5, 0.5, generator=gen)
    print(f"N={args.num_data} T={args.tokens} K=5, one thread, float64")
    for estimator in ("stratified", "chain"):
        pyro.clear_param_store()
        loss_fn = MaskedELBO(estimator=estimator).differentiable_loss
        compiled = torch.compile(loss_fn)

        def eager_step(fn=loss_fn):
            fn(ppca_collapsed, None, X, 5).backward()

        def compiled_step(fn=compiled):
            fn(ppca_collapsed, None, X, 5).backward()

        eager = median_seconds(eager_step, args.repeats, warmup=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            compiled_step()
            first = time.perf_counter() - start
            comp = median_seconds(compiled_step, args.repeats, warmup=2)
        print(
            f"{estimator:12s} eager {eager * 1e3:8.1f} ms  compiled {comp * 1e3:8.1f} ms  "
            f"ratio {comp / eager:5.2f}  first compiled call {first:5.1f} s  "
            f"(pays after {first / max(eager - comp, 1e-9):,.0f} steps)"
            if comp < eager
            else f"{estimator:12s} eager {eager * 1e3:8.1f} ms  compiled {comp * 1e3:8.1f} ms  "
            f"ratio {comp / eager:5.2f}  first compiled call {first:5.1f} s  (never pays)"
        )


if __name__ == "__main__":
    main()
