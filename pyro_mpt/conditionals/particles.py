r"""Weighted particles: the model traced with latent draws (or an enumerated support, or a
grid), its tensors flattened to ``(S, N, ...)``, and the scorer that mixes token kernels
over the particles.

With weighted particles :math:`(z_s, \log w^0_s)` (prior draws, an enumerated support or a
quadrature grid) and tokens conditionally independent given :math:`z` (the theory page of
the docs, section 2):

.. math::
    a_s = \log w^0_s + \log p(x_O \mid z_s), \qquad
    \log p(x_j \mid x_O) \approx \operatorname{logsumexp}_s\big(a_s + \log p(x_j \mid x_O, z_s)\big)
    - \operatorname{logsumexp}_s a_s .

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch

from ..compat import enumerate_dim
from ..tokens import PARTICLE_PLATE
from .base import Scorer
from .kernels import FactorizedKernel
from .orders import factorized_suffix_scores, independent_sites_suffix_scores

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = [
    "ParticleScorer",
    "PerTokenLatent",
    "combine_log_weights",
    "enumerated_dims",
    "flatten_particles",
    "latent_log_prob",
    "particle_shape",
    "particle_trace",
]


class ParticleScorer(Scorer):
    r"""Mixes per-site token kernels over weighted particles (see the module docstring).
    Without particles (``log_w0 is None``) the kernels' conditionals are returned as they
    are: exact for a model without latents.

    With particles :math:`z_s` and log-weights :math:`\log w_s` (``log_w0``), each scored token
    gets the self-normalised mixture
    :math:`\log \sum_s \bar w_s\, p(x_j \mid x_O, z_s)`,
    :math:`\bar w_s \propto w_s\, p(x_O \mid z_s)`.

    :param kernels: ``(token slice, kernel)`` per observed site
        (:func:`~pyro_mpt.conditionals.sites.build_kernels`).
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param log_w0: ``(S, N)`` particle log-weights, or ``None`` without latents.

    The chain rule telescopes (:attr:`telescopes`): with :math:`a_k = \log w^0 + \log
    p(x_{O_k} \mid z)` for the first ``k`` tokens :math:`O_k` of any order, the token
    kernels give :math:`a_k + \log p(x_{\pi_k} \mid x_{O_k}, z) = a_{k+1}` per particle
    (the sites are independent given :math:`z`), so the row of step ``k`` is
    :math:`\operatorname{LSE}_s a_{k+1} - \operatorname{LSE}_s a_k` and the ``T`` steps sum
    to :math:`\operatorname{LSE}_s a_T - \operatorname{LSE}_s \log w^0`, whatever the order
    (with a quadrature grid the second term is not 0: its weights do not sum to exactly 1).

    Example::

        log_probs = scorer(batch.observed, batch.scored)   # (R, N, T)
    """

    telescopes = True

    def __init__(self, kernels: list, layout: TokenLayout, log_w0: torch.Tensor | None = None):
        self.kernels = kernels  # list of (slice, kernel)
        self.layout = layout
        self.log_w0 = log_w0  # (S, N) or None

    @property
    def num_particles(self) -> int:
        """``S``, the particles (or enumerated configurations, grid points) mixed over; 1
        without latents."""
        return 1 if self.log_w0 is None else self.log_w0.shape[0]

    @property
    def scores_orders(self) -> bool:
        """Whether :meth:`suffix_scores` applies: every kernel is a
        :class:`~pyro_mpt.conditionals.kernels.FactorizedKernel` (tokens independent given
        the particle), or there are no particles and every kernel scores orders itself
        (the exact Gaussian kernels, :mod:`pyro_mpt.conditionals.gaussian_orders`)."""
        if all(isinstance(k, FactorizedKernel) for _, k in self.kernels):
            return True
        return self.log_w0 is None and all(hasattr(k, "suffix_scores") for _, k in self.kernels)

    def suffix_scores(self, ranks: torch.Tensor, max_elements: int) -> torch.Tensor | None:
        r"""``(D, N, T)``: :math:`\sum_{j \ge k} \log p(x_{\pi_j} \mid x_{\pi_{<k}})` for
        the orders ``ranks`` (``(D, N|1, T)``, the position of each token), every prefix
        of every order at once: by one matrix product for factorized kernels
        (:func:`~pyro_mpt.conditionals.orders.factorized_suffix_scores`), by the sites'
        own order paths without particles
        (:func:`~pyro_mpt.conditionals.orders.independent_sites_suffix_scores`); ``None`` when :attr:`scores_orders` is false
        or a product underflows (then score rows)."""
        if not self.scores_orders:
            return None
        if not all(isinstance(k, FactorizedKernel) for _, k in self.kernels):
            sites = [
                (sl, partial(k.suffix_scores, max_elements=max_elements)) for sl, k in self.kernels
            ]
            return independent_sites_suffix_scores(sites, ranks)
        kernels = sorted(self.kernels, key=lambda item: item[0].start)
        tables = [k.table for _, k in kernels]
        S = max(t.shape[0] for t in tables)
        table = torch.cat([t.expand(S, *t.shape[1:]) for t in tables], -1)  # (S, N, T)
        log_w0 = table.new_zeros(1, table.shape[1]) if self.log_w0 is None else self.log_w0
        return factorized_suffix_scores(table, log_w0, ranks, max_elements)

    def row_cost(self, shared: bool = False) -> int:
        shared = shared and self.log_w0 is None
        return sum(k.row_cost(shared) for _, k in self.kernels) * 2

    def row_scores(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        if self.log_w0 is None and all(hasattr(k, "row_scores") for _, k in self.kernels):
            # Without particles the sites' tokens are independent across sites: add them up.
            return sum(k.row_scores(observed[..., sl], scored[..., sl]) for sl, k in self.kernels)
        return super().row_scores(observed, scored)

    def log_evidence(self, observed: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_O) \approx \operatorname{logsumexp}_s a_s` per row and sequence,
        ``(R, N)``."""
        none = torch.zeros_like(observed)
        a = 0.0 if self.log_w0 is None else self.log_w0
        for sl, kernel in self.kernels:
            marginal, _ = kernel(observed[..., sl], none[..., sl], True)
            a = a + marginal  # (R, S, N)
        if self.log_w0 is None:
            return a[:, 0]
        return torch.logsumexp(a, 1)

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        need_marginal = self.log_w0 is not None
        marginals, conds = [], []
        for sl, kernel in self.kernels:
            marginal, cond = kernel(observed[..., sl], scored[..., sl], need_marginal)
            marginals.append(marginal)
            conds.append(cond)
        R = observed.shape[0]
        if len(conds) > 1:  # sites differ in token count: broadcast all but the token dim
            lead = torch.broadcast_shapes(*(c.shape[:-1] for c in conds))
            cond = torch.cat([c.expand(*lead, c.shape[-1]) for c in conds], -1)
        else:
            cond = conds[0]  # (R|1, S, N, T)
        if need_marginal:
            a = self.log_w0 + sum(marginals)  # (R, S, N)
            log_num = torch.logsumexp(a.unsqueeze(-1) + cond, dim=1)
            out = log_num - torch.logsumexp(a, dim=1).unsqueeze(-1)
        else:
            out = cond[:, 0].expand(R, -1, -1)
        return torch.where(scored, out, out.new_zeros(()))


# ----------------------------------------------------------------------------------------
# From a trace with leading particle dims to (S, N, ...) tensors
# ----------------------------------------------------------------------------------------


def _lead_shape(t, P, extra):
    return tuple(t.shape[: max(0, t.dim() - P - extra)])


def _align(t, P, extra, lead_ndim):
    """Left-pads ``t`` with singleton dims to ``lead_ndim + P + extra`` dims."""
    want = lead_ndim + P + extra
    return t.reshape((1,) * (want - t.dim()) + tuple(t.shape)) if t.dim() < want else t


def particle_shape(tensors_with_extra, P: int) -> tuple:
    """The broadcast shape of the leading (particle and enumeration) dims.

    :param tensors_with_extra: ``(tensor, extra_ndim)`` pairs, each shaped
        ``(*lead, *P plate dims, *extra)``.
    :param P: the model's plate dims (without a token plate).
    """
    leads = [_lead_shape(t, P, extra) for t, extra in tensors_with_extra]
    return tuple(torch.broadcast_shapes(*leads)) if leads else ()


def flatten_particles(t: torch.Tensor, layout: TokenLayout, lead: tuple, extra: int):
    """Reshapes ``t`` of shape ``(*lead', *P dims, *extra)`` to ``(S, N, *extra)``, with
    :math:`S = \\prod` ``lead`` (``lead'`` broadcasts to ``lead``).

    With a token plate, ``extra`` counts the token dim that was moved to the end."""
    P = layout.max_plate_nesting - (1 if layout.token_plate is not None else 0)
    t = _align(t, P, extra, len(lead))
    extra_shape = tuple(t.shape[t.dim() - extra :]) if extra else ()
    t = t.expand(*lead, *layout.seq_shape, *extra_shape)
    return t.reshape(math.prod(lead), layout.num_sequences, *extra_shape)


def enumerated_dims(trace) -> dict:
    """The enumeration dim of every enumerated latent site: name -> dim."""
    return {
        name: enumerate_dim(site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and enumerate_dim(site) is not None
    }


def particle_trace(
    model,
    args: tuple,
    kwargs: dict,
    layout: TokenLayout,
    num_particles: int | None = None,
    values: dict | None = None,
):
    """Traces the model with ``num_particles`` prior draws in a particle plate left of the
    model's plates, enumerated sites enumerated left of that, and the latent sites in
    ``values`` (a dict of tensors shaped ``(S, *event)``) set to those values.

    :returns: the :class:`pyro.poutine.Trace`."""
    P = layout.max_plate_nesting
    first_enum_dim = -P - 1 - (1 if num_particles else 0)

    def particle_model(*args, **kwargs):
        if not num_particles:
            return model(*args, **kwargs)
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-P - 1):
            if values is None:
                return model(*args, **kwargs)
            with _SetValues(values, P):
                return model(*args, **kwargs)

    enum_model = poutine.enum(particle_model, first_available_dim=first_enum_dim)
    return poutine.trace(enum_model).get_trace(*args, **kwargs)


class _SetValues(pyro.poutine.messenger.Messenger):
    """Sets latent sites to given particle values (the quadrature grid), like replay does."""

    def __init__(self, values, max_plate_nesting):
        super().__init__()
        self.values = values
        self.P = max_plate_nesting

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.values or msg["is_observed"]:
            return
        v = self.values[name]  # (S, *event)
        # The particle plate is outside the model's plates, so it has not yet broadcast
        # ``fn`` here: put the particle dim left of the model's P plate dims.
        batch = tuple(msg["fn"].batch_shape)[-self.P :] if self.P else ()
        batch = (1,) * (self.P - len(batch)) + batch
        S, event = v.shape[0], tuple(v.shape[1:])
        v = v.reshape((S,) + (1,) * self.P + event).expand((S,) + batch + event)
        msg["value"] = v
        msg["done"] = True


class PerTokenLatent(ValueError):
    """A latent site varies along the token plate, so its particles are not per sequence.

    :ivar str site: the latent site's name."""

    def __init__(self, name: str, plate: str):
        super().__init__(
            f"latent site {name!r} sits inside token_plate {plate!r}: one latent per token "
            "cannot be a per-sequence particle here; use conditionals='importance' or "
            "'enumerate', or move it out of the token plate"
        )
        self.site = name


def latent_log_prob(trace, names, layout: TokenLayout) -> list:
    """The log-densities of the named latent sites, each of shape ``(*lead, *seq dims)``
    (broadcast against each other by the caller). With a token plate its (singleton) dim is
    dropped; a latent that varies along it raises :class:`PerTokenLatent`."""
    out = []
    for name in names:
        site = trace.nodes[name]
        lp = site["fn"].log_prob(site["value"])
        if layout.token_plate is not None:
            P = layout.max_plate_nesting
            lp = lp.reshape((1,) * max(0, P - lp.dim()) + tuple(lp.shape))
            if lp.shape[layout.token_dim] != 1:
                raise PerTokenLatent(name, layout.token_plate)
            lp = lp.squeeze(layout.token_dim)
        out.append(lp)
    return out


def combine_log_weights(parts, layout: TokenLayout, lead: tuple, base: float = 0.0):
    r"""``(S, N)``: :math:`\log w^0 = \text{base} + \sum_k \ell_k`, the ``(tensor, 0)``
    log-weight pieces :math:`\ell_k` broadcast and flattened."""
    S = math.prod(lead)
    total = torch.zeros(S, layout.num_sequences, dtype=layout.dtype, device=layout.device)
    for t, _ in parts:
        total = total + flatten_particles(t, layout, lead, 0)
    return total + base
