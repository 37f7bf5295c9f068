r"""Which tokens are present: Pyro's masks read off a trace.

Pyro zeroes the log-density of a masked-out event (``poutine.mask``, ``fn.mask(m)``, the
``obs_mask=`` of :func:`pyro.sample`), so a masked-out token is neither data nor scored.
pyro_mpt honours that by dropping it: a sequence :math:`n` keeps its :math:`T_n \le T`
present tokens (the sequences become ragged) and masks are drawn uniformly over those, so

.. math:: \log p(x_{n,\mathrm{present}}) = \sum_{m=1}^{T_n} S_n(m).

**When the mask is read.** Pyro reads a site's mask when it computes the log-density, after
the model has returned, so a mask tensor mutated in place after the sample statement (the
``seen |= ...`` idiom of Pyro's capture-recapture example) counts with its final value.
pyro_mpt reads it at the same moment: from the finished trace of its first run.

``obs_mask`` splits a site ``x`` into an observed ``x_observed`` (masked by ``obs_mask``),
an imputed latent ``x_unobserved`` (masked by ``~obs_mask``) and a deterministic ``x``; the
first gives the tokens, the others are not data and the imputed values are marginalised (a
leaf latent integrates to one).
"""

from __future__ import annotations

import torch
from pyro.distributions import MaskedDistribution
from torch.distributions import Independent

from ..compat import distribution_mask

__all__ = ["imputed_sites", "is_deterministic", "site_token_mask"]


def is_deterministic(site) -> bool:
    """Whether ``site`` is a :func:`pyro.deterministic` record (not data)."""
    return bool(site["infer"].get("_deterministic"))


def imputed_sites(trace) -> set:
    """Names of the ``x_unobserved`` latents that ``obs_mask`` adds next to an observed
    ``x_observed``: imputations of missing data, not latents of the model."""
    observed = {n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]}
    return {
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and n.endswith("_unobserved")
        and n[: -len("_unobserved")] + "_observed" in observed
    }


def _as_mask(mask, name):
    if mask is None or isinstance(mask, bool):
        return mask
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise TypeError(
            f"observed site {name!r} has a mask of type {type(mask).__name__} "
            f"({getattr(mask, 'dtype', '')}); Pyro masks are bool tensors: pass mask.bool()"
        )
    return mask


def _fn_masks(fn, name):
    """``(batch mask, element mask)`` carried by the distribution itself: ``fn.mask(m)``
    around it (over its batch) or inside ``.to_event`` (over the token elements)."""
    batch_mask = element_mask = None
    if isinstance(fn, MaskedDistribution):
        batch_mask, fn = _as_mask(distribution_mask(fn), name), fn.base_dist
    if isinstance(fn, Independent) and isinstance(fn.base_dist, MaskedDistribution):
        element_mask = _as_mask(distribution_mask(fn.base_dist), name)
    return batch_mask, element_mask


def site_token_mask(site, batch: tuple, token_shape: tuple, token_axis) -> torch.Tensor | None:
    """The present tokens of one observed site, ``(*batch, T_site)`` bool, or ``None``
    when every token is present.

    :param site: the site of the finished trace (its mask read now, as Pyro reads it).
    :param tuple batch: the site's batch shape padded to the model's plate depth.
    :param tuple token_shape: the shape of the token grid inside one event (default tokens).
    :param token_axis: the index in ``batch`` of the token plate, or ``None``.
    :returns: with a token plate, ``batch`` without that axis and the plate's size last.
    """
    name = site["name"]
    batch_mask, element_mask = _fn_masks(site["fn"], name)
    masks = [m for m in (_as_mask(site["mask"], name), batch_mask) if m is not None]
    if not masks and element_mask is None:
        return None
    tail = (1,) * len(token_shape)
    full = torch.ones(batch + tuple(token_shape), dtype=torch.bool)
    try:
        for m in masks:
            if isinstance(m, bool):
                full = full & m
            else:
                full = full.to(m.device) & m.reshape(tuple(m.shape) + tail)
        if element_mask is not None:
            full = full.to(getattr(element_mask, "device", full.device)) & element_mask
    except RuntimeError:
        raise ValueError(
            f"observed site {name!r}: its mask does not broadcast to the site's batch shape "
            f"{batch} (tokens {tuple(token_shape)}); shape the mask like the plates around "
            "the site"
        ) from None
    if token_axis is not None:
        return full.movedim(token_axis, -1)
    return full.reshape(*batch, -1)
