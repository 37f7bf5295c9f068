r"""Partial evidence for variable elimination: the messengers that mask (or probe) each
evaluation item's observed tokens, and the contraction of an enumerated trace to
:math:`\log p(x_E)` per item and sequence.

The model runs inside an extra plate (:data:`MASK_PLATE`, left of the model's plates) whose
index :math:`b` enumerates *evaluation items*, each with its own evidence set :math:`E_b`.
:class:`EvidenceMessenger` applies each item's evidence mask to every observed site
(``msg["mask"]`` like :func:`pyro.poutine.mask` when a token is a whole batch element; an
elementwise mask of the base distribution of a ``.to_event`` site when a token is an event
element). A masked token's factor is 1, which marginalises it exactly:
:math:`\sum_{x_t} p(x_t \mid z) = 1`, so

.. math:: \log p(x_E) = \log \sum_z p(z) \prod_{t \in E} p(x_t \mid z).

:class:`ProbeMessenger` instead gives every unobserved token the factor
:math:`1 + t\,p(x_t \mid z)/c` (:class:`Probe`), whose derivative at :math:`t = 0` yields all
the conditionals of one conditioning set from one elimination.

:func:`contract_evidence` gathers the log-factors by plate ordinal and eliminates the
enumerated dims with :func:`pyro.ops.contract.contract_to_tensor`, exactly as
:class:`~pyro.infer.TraceEnum_ELBO` does. Everything is differentiable in the model's
parameters.

Reference: F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush, N. Goodman,
"Tensor Variable Elimination for Plated Factor Graphs", ICML 2019 (Pyro's
``TraceEnum_ELBO``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import broadcast_shape
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, constraints

from ..compat import enumerate_dim, enumerate_symbol, packed_dims

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["MASK_PLATE", "EvidenceMessenger", "Probe", "ProbeMessenger", "contract_evidence"]

#: Name of the plate whose index enumerates the evaluation items (evidence sets).
MASK_PLATE = "_mpt_masks"


def _mask_elements(fn, mask):
    """Masks the event elements of a (possibly nested) ``Independent`` distribution: the
    innermost base distribution is masked elementwise (its batch shape ends in the token
    dims, which ``mask`` also ends in), then the ``Independent`` wrappers are restored."""
    if isinstance(fn, Independent):
        inner = _mask_elements(fn.base_dist, mask)
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    return dist.MaskedDistribution(fn, mask)


class EvidenceMessenger(Messenger):
    """Applies each evaluation item's evidence mask to the observed sites.

    :param dict masks: site name -> ``(mode, mask)``; ``mode`` is ``"batch"`` (the mask is
        combined into ``msg["mask"]``, as :class:`~pyro.poutine.mask_messenger.MaskMessenger`
        does) or ``"event"`` (the distribution's event elements are masked).

    It sits outside the model's plates, so it sees ``fn`` already broadcast over them; the
    item plate, outside it, broadcasts afterwards.
    """

    def __init__(self, masks: dict):
        super().__init__()
        self.masks = masks

    def _pyro_sample(self, msg):
        entry = self.masks.get(msg["name"])
        if entry is None or not msg["is_observed"]:
            return
        mode, mask = entry
        if mode == "batch":
            # The evidence replaces the site's own mask: that mask is already in the layout's
            # present tokens (read, as Pyro reads it, after the run) and an evidence mask never
            # observes an absent token; ``msg["mask"] & mask`` here would freeze a mask that
            # the model mutates after the statement (capture-recapture's ``seen |= ...``).
            msg["mask"] = mask
        else:
            msg["fn"] = _mask_elements(msg["fn"], mask)


class Probe(TorchDistribution):
    r"""Evidence of one item for an elementwise distribution: observed elements keep their
    log-density :math:`\ell`; every other element becomes the factor
    :math:`1 + t\,e^{\ell - \log c}` with :math:`t = 0`, i.e. no evidence (it is
    marginalised), but with :math:`\partial \log Z / \partial t = p(x_j \mid x_O) / c`.
    :math:`\log c` is the largest :math:`\ell` over the enumerated values (a constant in
    them, for range), stored in ``store[key]``."""

    arg_constraints = {}

    def __init__(
        self,
        base_dist: TorchDistribution,
        observed: torch.Tensor,
        probe: torch.Tensor,
        store: dict,
        key: str,
    ):
        batch_shape = broadcast_shape(observed.shape, base_dist.batch_shape)
        if base_dist.batch_shape != batch_shape:
            base_dist = base_dist.expand(batch_shape)
        self.base_dist = base_dist
        self._observed, self._probe, self._store, self._key = observed, probe, store, key
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        base_dist = self.base_dist.expand(torch.Size(batch_shape))
        return Probe(base_dist, self._observed, self._probe, self._store, self._key)

    @constraints.dependent_property
    def support(self):
        return self.base_dist.support

    def sample(self, sample_shape=()):
        return self.base_dist.sample(torch.Size(sample_shape))

    def log_prob(self, value):
        lp = self.base_dist.log_prob(value)
        lead = lp.dim() - self._observed.dim()  # enumeration dims, left of the item plate
        logc = lp.detach().amax(tuple(range(lead))) if lead > 0 else lp.detach()
        logc = torch.where(torch.isfinite(logc), logc, torch.zeros_like(logc))
        self._store[self._key] = logc
        probe = torch.log1p(self._probe * torch.exp(lp - logc))
        return torch.where(self._observed, lp, probe)


def _probe_elements(fn, observed, probe, store, key):
    """:class:`Probe` on the innermost base distribution of ``Independent`` wrappers."""
    if isinstance(fn, Independent):
        inner = _probe_elements(fn.base_dist, observed, probe, store, key)
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    return Probe(fn, observed, probe, store, key)


class ProbeMessenger(Messenger):
    """Replaces each observed site's distribution by its :class:`Probe` for the items."""

    def __init__(self, entries: dict, store: dict):
        super().__init__()
        self.entries, self.store = entries, store

    def _pyro_sample(self, msg):
        entry = self.entries.get(msg["name"])
        if entry is None or not msg["is_observed"]:
            return
        mode, observed, probe = entry
        if mode == "batch":
            msg["fn"] = Probe(msg["fn"], observed, probe, self.store, msg["name"])
        else:
            msg["fn"] = _probe_elements(msg["fn"], observed, probe, self.store, msg["name"])


def contract_evidence(
    trace, layout: TokenLayout, keep_plate: str, size: int, latents=()
) -> torch.Tensor:
    r"""``(size, N)``: :math:`\log \sum_c \prod_f f` over an enumerated trace, keeping the
    plate ``keep_plate`` (of ``size``, left of the model's plates) and the sequence plates.

    The factors are gathered by ordinal as :class:`~pyro.infer.TraceEnum_ELBO` does: the
    enumerated sites' log-probabilities unscaled (their dims :math:`c` are summed out), the
    observed sites' (and the named ``latents``') unscaled with their masks applied inside the
    log-sum-exp, so masked evidence is marginalised. Subsampling scales are the caller's.
    """
    names, fixed = set(latents), set(layout.fixed)

    def relevant(name, site):  # values fixed by poutine.condition are not evidence
        return (
            not site_is_subsample(site)
            and name not in fixed
            and (site["is_observed"] or enumerate_dim(site) is not None or name in names)
        )

    trace.compute_log_prob(relevant)
    trace.pack_tensors()
    tree, sum_dims, dim_to_size = OrderedDict(), set(), {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not relevant(name, site):
            continue
        ordinal = frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        pk = site["packed"]
        if enumerate_dim(site) is not None:
            term = pk["unscaled_log_prob"]
            sum_dims.add(enumerate_symbol(site))
        else:
            term = packed.scale_and_mask(pk["unscaled_log_prob"], mask=pk["mask"])
        dim_to_size.update(zip(packed_dims(term), term.shape))
        for f in site["cond_indep_stack"]:  # plates of size 1 are not packed
            if f.vectorized:
                dim_to_size.setdefault(trace.plate_to_symbol[f.name], f.size)
        tree.setdefault(ordinal, []).append(term)

    seq_plates = {f.name for s in layout.sites for f in s.frames} - {layout.token_plate}
    target = frozenset(
        trace.plate_to_symbol[name]
        for name in seq_plates | {keep_plate}
        if name in trace.plate_to_symbol
    )
    logz = contract_to_tensor(
        tree, sum_dims, target_ordinal=target, ring=LogRing(dim_to_size=dim_to_size)
    )
    logz = packed.unpack(logz, trace.symbol_to_dim)  # dims -P-1 (kept) .. -1 (plates)
    P = layout.max_plate_nesting
    logz = logz.reshape((1,) * (P + 1 - logz.dim()) + tuple(logz.shape))
    if layout.token_plate is not None:
        logz = logz.squeeze(1 + P + layout.token_dim)  # product-contracted: size 1
    return logz.expand(size, *layout.seq_shape).reshape(size, layout.num_sequences)
