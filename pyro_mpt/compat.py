"""The few places where pyro_mpt leans on another library's private or noisy API, each
wrapped once with the reason, so that a change upstream breaks one function, not many.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "enumerate_dim",
    "enumerate_symbol",
    "gaussian_hmm_factors",
    "gaussian_parts",
    "generalized_pareto_fit",
    "import_arviz",
    "packed_dims",
]


def import_arviz() -> ModuleType:
    """ArviZ, imported on first use (it is slow to import); its notice about its coming 1.0
    refactor (a ``FutureWarning`` on import) says nothing about the caller's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
        )
        import arviz
    return arviz


def generalized_pareto_fit(
    exceedances: np.ndarray, *args: Any, **kwargs: Any
) -> tuple[float, float]:
    """ArviZ's generalized Pareto fit (Zhang & Stephens 2009, as ``psislw`` uses it).

    Private in ArviZ (``arviz.stats.stats._gpdfit``): it is the exact fit behind ArviZ's own
    k-hat, and using it keeps our k-hat equal to ArviZ's (tested). Only here."""
    return import_arviz().stats.stats._gpdfit(exceedances, *args, **kwargs)


def gaussian_parts(
    fn: torch.distributions.Distribution,
) -> tuple[str, torch.Tensor, torch.Tensor] | tuple[str, torch.Tensor]:
    """The un-expanded parameters of a torch Gaussian: ``("lowrank", W, D)`` for
    ``LowRankMultivariateNormal`` or ``("dense", scale_tril)`` for ``MultivariateNormal``.

    torch keeps them as private ``_unbroadcasted_*`` attributes; the public ``cov_factor``,
    ``scale_tril`` ... are expanded to the full batch shape (copies per particle and
    sequence), which the Gaussian kernels avoid. Only here."""
    if hasattr(fn, "_unbroadcasted_cov_factor"):
        return "lowrank", fn._unbroadcasted_cov_factor, fn._unbroadcasted_cov_diag
    return "dense", fn._unbroadcasted_scale_tril


def enumerate_dim(site: dict[str, Any]) -> int | None:
    """The tensor dim Pyro's ``poutine.enum`` gave an enumerated site (``None`` if it has
    none). Pyro keeps it under the private key ``_enumerate_dim`` of ``site["infer"]``; the
    elimination code needs it to name the dims it sums. Only here."""
    return site["infer"].get("_enumerate_dim")


def enumerate_symbol(site: dict[str, Any]) -> str | None:
    """The einsum symbol Pyro's ``poutine.enum`` gave an enumerated site (private key
    ``_enumerate_symbol`` of ``site["infer"]``; ``None`` if it has none). Only here."""
    return site["infer"].get("_enumerate_symbol")


def packed_dims(tensor: torch.Tensor) -> str:
    """The dim symbols of a tensor packed by ``Trace.pack_tensors()`` (Pyro stores them as the
    private attribute ``_pyro_dims``). Only here."""
    return tensor._pyro_dims


def distribution_mask(fn: Any) -> Any:
    """The mask a :class:`pyro.distributions.MaskedDistribution` (``fn.mask(m)``) applies
    (a bool tensor or bool). Pyro keeps it in the private attribute ``_mask``."""
    return fn._mask


def gaussian_hmm_factors(fn) -> tuple:
    """The factors of a :class:`pyro.distributions.GaussianHMM` as
    :class:`pyro.ops.gaussian.Gaussian` s: ``(initial over z_{-1}, transition over
    (z_{t-1}, z_t), observation over (z_t, x_t))``, batched over time for the last two.
    Pyro keeps them only in the private attributes ``_init``, ``_trans``, ``_obs`` (the
    distributions it was built from are not stored). Only here."""
    return fn._init, fn._trans, fn._obs
