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
from pyro.poutine.util import site_is_subsample

from .masks import imputed_sites, is_deterministic

__all__ = [
    "check_fixed_values",
    "check_semantics",
    "check_imputed_leaves",
    "check_no_observed_parents",
    "observed_parents",
]


def _provenance_trace(model, args, kwargs):
    """A trace whose sample values carry their site's name as provenance (RNG restored)."""
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with TrackProvenance():
            return poutine.trace(model).get_trace(*args, **kwargs)


def check_imputed_leaves(model, args: tuple, kwargs: dict, trace) -> None:
    """The values that ``obs_mask`` imputes (``x_unobserved``) must feed no other site:
    pyro_mpt integrates them out as leaves (their density integrates to one).

    :param trace: a plain trace of the model.
    :raises ValueError: naming the obs_mask site and the site it feeds.
    """
    imputed = imputed_sites(trace)
    if not imputed:
        return
    tracked = _provenance_trace(model, args, kwargs)
    for name, site in tracked.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name in imputed:
            continue
        if is_deterministic(site):
            continue
        fed = get_provenance(site["fn"].log_prob(detach_provenance(site["value"]))) & imputed
        if fed:
            source = sorted(fed)[0][: -len("_unobserved")]
            raise ValueError(
                f"the values obs_mask imputes for the missing data of site {source!r} feed "
                f"site {name!r}: pyro_mpt integrates imputed values out only when nothing "
                "depends on them; write the dependence through a latent state (or impute "
                "the missing values before calling the model)"
            )


def check_fixed_values(model, args: tuple, kwargs: dict, layout) -> None:
    r"""The fixed values (``layout.fixed``: observed sites outside the data's plates, such as
    globals fixed by ``poutine.condition``) must not depend on latents: their density is
    then a constant left out of the estimate, :math:`\log p(x \mid \text{fixed})`.

    :raises ValueError: naming the fixed site and its latent parents.
    """
    if not layout.fixed:
        return
    tracked = _provenance_trace(model, args, kwargs)
    latents = set(layout.latents)
    for name in layout.fixed:
        site = tracked.nodes[name]
        parents = get_provenance(site["fn"].log_prob(detach_provenance(site["value"])))
        if parents & latents:
            raise ValueError(
                f"observed site {name!r} sits outside the plates of the data, so pyro_mpt "
                "takes it for a fixed value (a global fixed by poutine.condition), but it "
                f"depends on the latent site(s) {sorted(parents & latents)}: its evidence "
                "would be ignored. Move it into the data's plates (it is then a token) or "
                "fix its latent parents too"
            )


def observed_parents(model, args: tuple, kwargs: dict, layout) -> dict:
    """``{token site: sorted observed token sites it depends on}`` (empty without any).

    :param model: the Pyro model (subsample replayed, see
        :func:`~pyro_mpt.tokens.subsample.replay_subsample`).
    :param layout: its :class:`~pyro_mpt.tokens.TokenLayout`.
    """
    names = [s.name for s in layout.sites]
    if len(names) < 2:
        return {}
    trace = _provenance_trace(model, args, kwargs)
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


def check_semantics(model, args: tuple, kwargs: dict, trace, layout, refuse=None) -> None:
    """The checks a call runs after reading the layout: imputed values are leaves
    (:func:`check_imputed_leaves`), fixed values have no latent parents
    (:func:`check_fixed_values`) and, when ``refuse`` names what needs the masked averages
    themselves (``"mpt_curve"``, ``"estimator='fixed'"``), no token has observed parents
    (:func:`check_no_observed_parents`).

    :param trace: a plain trace of the model; ``layout`` its token layout.
    """
    check_imputed_leaves(model, args, kwargs, trace)
    check_fixed_values(model, args, kwargs, layout)
    if refuse is not None:
        check_no_observed_parents(model, args, kwargs, layout, refuse)
