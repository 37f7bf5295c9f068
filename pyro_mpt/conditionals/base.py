r"""The interface between mask estimators and conditional backends.

A backend answers one batched question: given the conditioning tokens :math:`O` of every
mask row, what is :math:`\log p(x_j \mid x_O)` for the scored tokens :math:`j`? It does so
through a :class:`Scorer` built once per step from the model's trace, so that all masks of a
step reuse one particle table.

With weighted particles :math:`(z_s, \log w^0_s)` (prior draws, an enumerated support or a
quadrature grid) and tokens conditionally independent given :math:`z` (THEORY.md, 2):

.. math::
    a_s = \log w^0_s + \log p(x_O \mid z_s), \qquad
    \log p(x_j \mid x_O) \approx \operatorname{logsumexp}_s\big(a_s + \log p(x_j \mid x_O, z_s)\big)
    - \operatorname{logsumexp}_s a_s .
"""

import pyro
import pyro.poutine as poutine
import torch

from ..tokens import PARTICLE_PLATE
from .kernels import DenseGaussianKernel, FactorizedKernel, LowRankGaussianKernel

__all__ = ["Conditionals", "Scorer", "ParticleScorer"]

#: Default memory budget on the CPU: tensor elements one chunk of mask rows may use (small
#: chunks stay in cache).
DEFAULT_MAX_ELEMENTS = 2**24

#: Default memory budget on a GPU: 2**28 elements (1 GB in float32, the chunk's largest
#: tensors together), safe on a 16 GB card. Small chunks leave a GPU launch-bound.
DEFAULT_CUDA_MAX_ELEMENTS = 2**28


def resolve_max_elements(max_elements, device):
    """``max_elements`` if given, else the default budget of ``device``'s type
    (:data:`DEFAULT_MAX_ELEMENTS` on the CPU, :data:`DEFAULT_CUDA_MAX_ELEMENTS` on CUDA)."""
    if max_elements is not None:
        return int(max_elements)
    if torch.device(device).type == "cuda":
        return DEFAULT_CUDA_MAX_ELEMENTS
    return DEFAULT_MAX_ELEMENTS


class Scorer:
    r"""Scores mask rows for one step. Subclasses implement :meth:`__call__`.

    ``scorer(observed, scored)`` takes bool ``(R, N, T)`` masks and returns ``(R, N, T)``
    :math:`\log p(x_{n,j} \mid x_{n,O_r})` where ``scored``, 0 elsewhere.

    Example::

        log_probs = scorer(batch.observed, batch.scored)   # batch: a MaskBatch, -> (R, N, T)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    def row_cost(self, shared=False):
        """Tensor elements one mask row needs (for chunking under a memory budget);
        ``shared``: the row's mask is shared by all sequences."""
        raise NotImplementedError

    def __call__(self, observed, scored):
        """:param observed: bool ``(R, N, T)``; :param scored: bool ``(R, N, T)``.
        :returns: ``(R, N, T)`` with :math:`\\log p(x_{n,t} \\mid x_{n,O_r})` where
            ``scored`` and 0 elsewhere."""
        raise NotImplementedError

    def log_evidence(self, observed):
        """``(R, N)``: :math:`\\log p(x_{n,O_r})`, the evidence of each row's observed
        tokens (the others marginalised). The reference's exact method calls it with every
        token observed. Backends that can give it override this."""
        raise NotImplementedError(f"{type(self).__name__} gives no evidence of the observed part")

    def row_scores(self, observed, scored):
        """``(R, N)``: the sum over scored tokens of each row's conditionals. Masks may be
        shared by all sequences (``(R, 1, T)``); backends override this where the sum is
        cheaper than the per-token conditionals."""
        R, _, T = observed.shape
        N = self.layout.num_sequences
        return self(observed.expand(R, N, T), scored.expand(R, N, T)).sum(-1)


class Conditionals:
    r"""A conditional backend, looked up by :attr:`name` in
    :data:`pyro_mpt.conditionals.CONDITIONALS`.

    :meth:`scorer` runs the model as the backend needs (with particles, enumerated, on a
    grid) and returns a :class:`Scorer`.

    A backend computes :math:`\log p(x_j \mid x_O)` for the scored tokens :math:`j` of each mask
    row, the quantity whose masked averages :math:`S(m)` sum to :math:`\log p(x)`.

    Example::

        MaskedELBO(conditionals=QuadratureConditionals(num_points=40))   # an instance
        MaskedELBO(conditionals="quadrature")                             # or its name

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    name = None

    def check(self, layout, trace):
        """Raises ``ValueError`` naming the site if this backend cannot score the model."""

    def scorer(self, model, args, kwargs, layout, trace):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class ParticleScorer(Scorer):
    r"""Mixes per-site token kernels over weighted particles (see the module docstring).
    Without particles (``log_w0 is None``) the kernels' conditionals are returned as they
    are: exact for a model without latents.

    With particles :math:`z_s` and log-weights :math:`\log w_s` (``log_w0``), each scored token
    gets the self-normalised mixture
    :math:`\log \sum_s \bar w_s\, p(x_j \mid z_s)`, :math:`\bar w_s \propto w_s\, p(x_O \mid z_s)`.
    Called as ``scorer(observed, scored)`` with bool ``(R, N, T)`` masks; returns ``(R, N, T)``.

    Example::

        log_probs = scorer(batch.observed, batch.scored)   # (R, N, T)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    def __init__(self, kernels, layout, log_w0=None):
        self.kernels = kernels  # list of (slice, kernel)
        self.layout = layout
        self.log_w0 = log_w0  # (S, N) or None

    @property
    def num_particles(self):
        """``S``, the particles (or enumerated configurations, grid points) mixed over; 1
        without latents."""
        return 1 if self.log_w0 is None else self.log_w0.shape[0]

    def row_cost(self, shared=False):
        shared = shared and self.log_w0 is None
        return sum(k.row_cost(shared) for _, k in self.kernels) * 2

    def row_scores(self, observed, scored):
        if self.log_w0 is None and all(hasattr(k, "row_scores") for _, k in self.kernels):
            # Without particles the sites' tokens are independent across sites: add them up.
            return sum(k.row_scores(observed[..., sl], scored[..., sl]) for sl, k in self.kernels)
        return super().row_scores(observed, scored)

    def log_evidence(self, observed):
        none = torch.zeros_like(observed)
        a = 0.0 if self.log_w0 is None else self.log_w0
        for sl, kernel in self.kernels:
            marginal, _ = kernel(observed[..., sl], none[..., sl], True)
            a = a + marginal  # (R, S, N)
        if self.log_w0 is None:
            return a[:, 0]
        return torch.logsumexp(a, 1)

    def __call__(self, observed, scored):
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


def particle_shape(tensors_with_extra, P):
    """The broadcast shape of the leading (particle and enumeration) dims."""
    leads = [_lead_shape(t, P, extra) for t, extra in tensors_with_extra]
    return tuple(torch.broadcast_shapes(*leads)) if leads else ()


def flatten_particles(t, layout, lead, extra):
    """Reshapes ``t`` of shape ``(*lead', *P dims, *extra)`` to ``(S, N, *extra)``.

    With a token plate, ``extra`` counts the token dim that was moved to the end."""
    P = layout.max_plate_nesting - (1 if layout.token_plate is not None else 0)
    t = _align(t, P, extra, len(lead))
    extra_shape = tuple(t.shape[t.dim() - extra :]) if extra else ()
    t = t.expand(*lead, *layout.seq_shape, *extra_shape)
    S = 1
    for d in lead:
        S *= d
    return t.reshape(S, layout.num_sequences, *extra_shape)


def site_token_log_probs(site, layout):
    """Per-token log-probabilities of a factorized observed site, with the token axis last:
    ``(*lead, *seq dims, T_site)``."""
    fn, value = site["fn"], site["value"]
    if layout.token_plate is not None:
        lp = fn.log_prob(value)
        P = layout.max_plate_nesting
        lp = lp.reshape((1,) * max(0, P - lp.dim()) + tuple(lp.shape))
        return lp.movedim(layout.token_dim, -1)
    if fn.event_dim == 0:
        return fn.log_prob(value).unsqueeze(-1)
    base = fn.base_dist
    lp = base.log_prob(value)
    n_tok = len(fn.event_shape) - len(base.event_shape)
    return lp.reshape(*lp.shape[: lp.dim() - n_tok], -1)


def _unbroadcast(t, core_ndim):
    """Drops leading batch dims that are pure expansions (stride 0) of a parameter."""
    while t.dim() > core_ndim and (t.shape[0] == 1 or t.stride(0) == 0):
        t = t[0]
    return t


def build_kernels(trace, layout, extra_tensors=()):
    """Token kernels for every observed site of ``trace``, flattened to ``(S, N, ...)``.

    :param extra_tensors: ``(tensor, extra_ndim)`` pairs (latent log-weights) whose leading
        dims take part in the particle shape.
    :returns: ``(kernels, lead)``: a list of ``(token slice, kernel)`` and the particle shape.
    """
    P = layout.max_plate_nesting
    P_seq = P - (1 if layout.token_plate is not None else 0)
    per_site = []
    for site_info in layout.sites:
        site = trace.nodes[site_info.name]
        if site_info.kind == "factorized":
            lp = site_token_log_probs(site, layout)
            per_site.append((site_info, "factorized", lp))
        else:
            per_site.append((site_info, site_info.kind, site["fn"]))
    shapes = [(obj if kind == "factorized" else obj.loc, 1) for _, kind, obj in per_site]
    shapes.extend(extra_tensors)
    lead = particle_shape(shapes, P_seq)

    kernels = []
    for info, kind, obj in per_site:
        sl = layout.site_slice(info)
        if kind == "factorized":
            kernels.append((sl, FactorizedKernel(flatten_particles(obj, layout, lead, 1))))
            continue
        fn = obj
        value = trace.nodes[info.name]["value"]
        x = flatten_particles(value, layout, (), 1)[0]  # observations: (N, T)
        loc = flatten_particles(fn.loc, layout, lead, 1)
        if kind == "lowrank":
            W = _unbroadcast(fn._unbroadcasted_cov_factor, 2)
            D = _unbroadcast(fn._unbroadcasted_cov_diag, 1)
            if W.dim() > 2 or D.dim() > 1:
                W = flatten_particles(fn.cov_factor, layout, lead, 2)
                D = flatten_particles(fn.cov_diag, layout, lead, 1)
            kernels.append((sl, LowRankGaussianKernel(x, loc, W, D)))
        else:
            tril = _unbroadcast(fn._unbroadcasted_scale_tril, 2)
            if tril.dim() > 2:
                tril = flatten_particles(fn.scale_tril, layout, lead, 2)
            tril = tril.tril()  # MVN reads only the lower triangle of its scale_tril
            kernels.append((sl, DenseGaussianKernel(x, loc, tril @ tril.mT)))
    return kernels, lead


def enumerated_dims(trace):
    """The enumeration dim of every enumerated latent site."""
    return {
        name: site["infer"]["_enumerate_dim"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and "_enumerate_dim" in site["infer"]
    }


def particle_trace(model, args, kwargs, layout, num_particles=None, values=None):
    """Traces the model with ``num_particles`` prior draws in a particle plate left of the
    model's plates, enumerated sites enumerated left of that, and the latent sites in
    ``values`` (a dict of tensors shaped ``(S, *event)``) set to those values."""
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
    """A latent site varies along the token plate, so its particles are not per sequence."""

    def __init__(self, name, plate):
        super().__init__(
            f"latent site {name!r} sits inside token_plate {plate!r}: one latent per token "
            "cannot be a per-sequence particle here; use conditionals='importance' or "
            "'enumerate', or move it out of the token plate"
        )
        self.site = name


def latent_log_prob(trace, names, layout):
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


def combine_log_weights(parts, layout, lead, base=0.0):
    """Sums ``(tensor, 0)`` log-weight pieces, broadcast and flattened to ``(S, N)``."""
    S = 1
    for d in lead:
        S *= d
    total = torch.zeros(S, layout.num_sequences, dtype=layout.dtype, device=layout.device)
    for t, _ in parts:
        total = total + flatten_particles(t, layout, lead, 0)
    return total + base
