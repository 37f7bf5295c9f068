r"""MaskedELBO on several processes (PyTorch DDP, PyTorch Lightning): the pieces that are
not Pyro's own.

Pyro's pattern (its ``svi_lightning`` example) carries over unchanged: ``MaskedELBO()(model,
None)`` is an :class:`~pyro.infer.elbo.ELBOModule`, an ``nn.Module`` whose forward pass is
the loss, so Lightning (or ``torch.nn.parallel.DistributedDataParallel``) drives it, and
DDP averages the gradients over the ranks. Two things are the user's:

- **The loss scale.** Each rank sees a shard of :math:`N/R` of the :math:`N` sequences. With
  the model's data plate declared at the full size, ``pyro.plate("data", N,
  subsample_size=len(batch))`` (Pyro's subsampling), each rank's loss is scaled by
  :math:`N / |\text{shard}|`, so the average of the ranks' gradients is the full-data
  gradient, on the same scale as one process on all the data:

  .. math:: \frac1R \sum_{r=1}^R \frac{N}{N/R} \nabla \widehat{\log p}(X_r)
            = \sum_r \nabla \widehat{\log p}(X_r) = \nabla \widehat{\log p}(X).

- **The mask streams.** Masks are drawn from torch's global generator. Seeded identically,
  every rank would draw the same masks for its shard (still unbiased, but the ranks' errors
  correlated); :func:`seed_per_rank` seeds rank :math:`r` with ``seed + r``, so the streams
  are independent across ranks and reproducible for a given seed and number of ranks.
"""

from __future__ import annotations

import pyro
import torch

__all__ = ["rank_and_world_size", "seed_per_rank"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the default ``torch.distributed`` group;
    ``(0, 1)`` when it is not initialised (a single process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_per_rank(seed: int, rank: int | None = None) -> int:
    """Seeds Pyro's (and torch's) random streams with ``seed + rank`` and returns that
    seed, so each rank draws its own reproducible masks.

    Call it once per process after the process group exists (in Lightning: the
    ``setup`` or ``on_fit_start`` hook).

    :param int seed: the run's seed, the same on every rank.
    :param int rank: this process's rank; ``None`` reads it from ``torch.distributed``
        (0 without a process group).
    :returns: the seed used on this rank.
    :raises TypeError: ``seed`` or ``rank`` is not an int >= 0.
    """
    if rank is None:
        rank = rank_and_world_size()[0]
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(
                f"seed_per_rank: {name} must be an int >= 0, got {value!r}; pass e.g. {name}=0"
            )
    pyro.set_rng_seed(seed + rank)
    return seed + rank
