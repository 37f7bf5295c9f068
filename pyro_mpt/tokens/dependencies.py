r"""Observed tokens that are parents of other tokens (AR observations, autoregressive HMMs).

The conditional backends score a token :math:`x_j` by its density given the latents, and
that density is evaluated at the data's values of its observed parents, masked or not. With
an observed parent :math:`x_{j-1}` in the mask, the score is
:math:`\log p(x_j \mid x_O, x_{j-1})` instead of :math:`\log p(x_j \mid x_O)`: the masked
averages :math:`S(m)` (the curve) and a fixed mask rate's estimate are then not those of the
model. The conditionals are still ratios of one set function
:math:`E(O) = \log \sum_z p(z) \prod_{t \in O} p(x_t \mid z, x_{\mathrm{pa}(t)})` with
:math:`E(\emptyset) = 0` and :math:`E(\text{all}) = \log p(x)`, so the chain rule, and the
stratified and uniform estimators (averages of chains over random orders), stay exact or
unbiased for :math:`\log p(x)`; only the curve and the fixed rate are refused.

Found by tracing the model once with Pyro's provenance tracking
(:class:`pyro.infer.inspect.TrackProvenance`, as :func:`pyro.infer.inspect.get_dependencies`
does, but keeping observed sites as parents): a token site depends on an observed site when
that site's name is in the provenance of its log-density. A dependence inside one site's
own value (``obs=x`` feeding its own parameters) is not seen.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.inspect import TrackProvenance
from pyro.ops.provenance import detach_provenance, get_provenance

__all__ = ["check_no_observed_parents", "observed_parents"]


def observed_parents(model, args: tuple, kwargs: dict, layout) -> dict:
    """``{token site: sorted observed token sites it depends on}`` (empty without any).

    :param model: the Pyro model (subsample replayed, see
        :func:`~pyro_mpt.tokens.subsample.replay_subsample`).
    :param layout: its :class:`~pyro_mpt.tokens.TokenLayout`.
    """
    names = [s.name for s in layout.sites]
    if len(names) < 2:
        return {}
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with TrackProvenance():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    out = {}
    for name in names:
        site = trace.nodes[name]
        own = detach_provenance(site["value"])
        parents = get_provenance(site["fn"].log_prob(own)) & (set(names) - {name})
        if parents:
            out[name] = sorted(parents)
    return out


def check_no_observed_parents(model, args: tuple, kwargs: dict, layout, what: str) -> None:
    """Refuses ``what`` (the curve, a fixed mask rate) for a model whose observed tokens
    are parents of other tokens.

    :raises ValueError: naming a child site, its observed parents and what still works.
    """
    parents = observed_parents(model, args, kwargs, layout)
    if not parents:
        return
    child, pa = next(iter(parents.items()))
    raise ValueError(
        f"{what} is not available for this model: observed site {child!r} depends on the "
        f"observed site(s) {pa} ({len(parents)} token site(s) have observed parents), so a "
        "masked token's value still enters its children's densities and the masked "
        "averages S(m) are not the model's. log_marginal_likelihood and MaskedELBO with "
        "estimator='chain', 'stratified' or 'uniform' remain exact or unbiased for "
        "log p(x); for the curve, write the dependence through a latent state"
    )
