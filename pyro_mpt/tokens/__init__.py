r"""Reading a Pyro model's trace into a token layout.

A *sequence* is the unit whose tokens are masked; sequences are independent given the
parameters, so :math:`\log p(X) = \sum_n \log p(x_n)`. By default the tokens of a sequence are
the event elements of its observed sites (the ``T`` pixels of an image, the ``T`` features of
a row) and the sequences are the elements of the plates those sites sit in. Several observed
sites in the same plates pool their tokens (the ``T`` emission sites of an HMM).

With ``token_plate="data"`` the elements of that plate are the tokens instead, and the
remaining plates (often none) index the sequences: use it when a global latent couples the
data points (Bayesian linear regression with a latent weight vector).
"""

from dataclasses import dataclass, field

import torch
from pyro.distributions import DiscreteHMM, GaussianHMM
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal

from ..progress import logger
from .checks import check_enumerable, check_observed_value, check_sizes, site_dtype
from .masks import imputed_sites, is_deterministic, site_token_mask

__all__ = ["ObservedSite", "TokenLayout", "read_layout"]

#: Name of the plate pyro_mpt adds around a model to draw particles.
PARTICLE_PLATE = "_mpt_particles"


@dataclass
class ObservedSite:
    """One observed sample site and where its tokens sit in the pooled token axis.

    :ivar str name: the site name.
    :ivar int offset: index of its first token in the pooled token axis.
    :ivar int num_tokens: its number of tokens per sequence.
    :ivar str kind: ``"factorized"`` (per-token log-probabilities exist given the latents),
        ``"lowrank"`` or ``"dense"`` (Gaussian, conditioned in closed form; a
        ``GaussianHMM``'s ``T x obs_dim`` observations, time-major), ``"hmm"`` (a
        ``DiscreteHMM``: its time steps are the tokens, conditioned by forward-backward).
    """

    name: str
    offset: int
    num_tokens: int
    kind: str
    event_shape: tuple
    frames: frozenset


@dataclass
class TokenLayout:
    """Where the sequences and tokens of a model are.

    :ivar list sites: the :class:`ObservedSite` s, in trace order.
    :ivar list latents: names of the latent sample sites.
    :ivar tuple seq_shape: the batch shape (``max_plate_nesting`` dims, token plate removed)
        indexing sequences; ``num_sequences`` is its product.
    :ivar int num_tokens: ``T``, tokens per sequence, pooled over sites.
    :ivar int max_plate_nesting: the number of plate dims the model uses.
    :ivar token_dim: the batch dim of ``token_plate`` (negative), or ``None``.
    :ivar torch.Tensor scale: ``(N,)`` the subsampling scale of each sequence.
    :ivar list fixed: observed sites outside the sequence plates of the data (latents fixed
        by ``poutine.condition``): fixed values, neither tokens nor scored.
    :ivar torch.Tensor present: ``(N, T)`` bool, the tokens Pyro's masks keep
        (:mod:`pyro_mpt.tokens.masks`), or ``None`` when every token is present.
    """

    sites: list
    latents: list
    seq_shape: tuple
    num_tokens: int
    max_plate_nesting: int
    token_plate: str = None
    token_dim: int = None
    scale: torch.Tensor = None
    dtype: torch.dtype = torch.float64
    device: torch.device = None
    enumerated: list = field(default_factory=list)
    present: torch.Tensor = None
    fixed: list = field(default_factory=list)

    def present_tokens(self) -> torch.Tensor:
        """``(N, T)`` bool: the present tokens (all of them without masks)."""
        if self.present is not None:
            return self.present
        shape = (self.num_sequences, self.num_tokens)
        return torch.ones(shape, dtype=torch.bool, device=self.device)

    @property
    def num_sequences(self):
        n = 1
        for s in self.seq_shape:
            n *= s
        return n

    def site_slice(self, site):
        return slice(site.offset, site.offset + site.num_tokens)


def _plate_frames(site):
    return frozenset(
        f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE
    )


def _gaussian_kind(fn):
    if isinstance(fn, DiscreteHMM):  # a whole sequence: its time steps are the tokens
        return "hmm"
    if isinstance(fn, GaussianHMM):  # its observations are jointly Gaussian
        return "dense"
    if isinstance(fn, LowRankMultivariateNormal):
        return "lowrank"
    if isinstance(fn, MultivariateNormal):
        return "dense"
    return None


def _token_event_shape(fn, site_name):
    """The shape of the token grid inside one event of ``fn`` (default tokens)."""
    if fn.event_dim == 0:
        return ()
    kind = _gaussian_kind(fn)
    if kind is not None:
        return tuple(fn.event_shape)
    if isinstance(fn, Independent):
        r = fn.reinterpreted_batch_ndims
        base_event = len(fn.base_dist.event_shape)
        if base_event == 0 or _gaussian_kind(fn.base_dist) is None:
            return tuple(fn.event_shape[: len(fn.event_shape) - base_event][:r])
    raise ValueError(
        f"observed site {site_name!r} has a {type(fn).__name__} whose event of shape "
        f"{tuple(fn.event_shape)} is not a product of tokens; pyro_mpt masks the elements of "
        "Independent (.to_event) events, of MultivariateNormal and of "
        "LowRankMultivariateNormal events. Mask along a plate instead with token_plate=..."
    )


def _max_plate_nesting(trace):
    dims = [
        -f.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=0)


def _check_finite(name, value, present, fn, batch, token_axis):
    """Non-finite data are refused where they are present (masked-out values, such as the
    NaNs of missing data under ``obs_mask``, are never read)."""
    if not (torch.is_tensor(value) and value.is_floating_point()):
        return
    bad = ~torch.isfinite(value)
    if present is not None:
        bad = bad.expand(batch + tuple(value.shape[value.dim() - fn.event_dim :]))
        if token_axis is not None:
            bad = bad.reshape(*batch, -1).any(-1).movedim(token_axis, -1)
        else:
            bad = bad.reshape(*batch, present.shape[-1], -1).any(-1)
        bad = bad & present.to(bad.device)
    if bad.any():
        raise ValueError(
            f"observed site {name!r} holds {int(bad.sum())} NaN or infinite value(s); "
            "remove or impute them, or mark them missing with obs_mask= or poutine.mask"
        )


def _token_plate_dim(observed, token_plate):
    """The batch dim of ``token_plate`` around the observed sites (``None`` without one)."""
    if token_plate is None:
        return None
    plates = {f.name: f for s in observed for f in _plate_frames(s)}
    if token_plate not in plates:
        raise ValueError(
            f"token_plate {token_plate!r} not found around any observed site; the observed "
            f"sites sit in the plates {sorted(plates) or '(none)'}"
        )
    frame = plates[token_plate]
    if frame.full_size is not None and frame.full_size != frame.size:
        raise ValueError(
            f"token_plate {token_plate!r} is subsampled ({frame.size} of {frame.full_size}); "
            "the masked identity needs every token of a sequence: do not subsample it"
        )
    return frame.dim


def _read_site(s, offset, P, token_plate, token_dim):
    """One observed site: its :class:`ObservedSite` and its sequence batch shape."""
    name, fn, value = s["name"], s["fn"], s["value"]
    check_observed_value(name, fn, value)
    batch = torch.broadcast_shapes(
        tuple(fn.batch_shape), tuple(value.shape[: value.dim() - fn.event_dim])
    )
    batch = (1,) * (P - len(batch)) + tuple(batch)
    if len(batch) > P:
        raise ValueError(
            f"observed site {name!r} has batch shape {batch} with more dims than the "
            f"{P} plates around it: declare the batch dims with pyro.plate"
        )
    if token_plate is None:
        token_shape = _token_event_shape(fn, name)
        if isinstance(fn, (DiscreteHMM, GaussianHMM)):  # event_shape says 1 step if any fits
            token_shape = tuple(value.shape[value.dim() - fn.event_dim :])
            token_shape = token_shape[:1] if isinstance(fn, DiscreteHMM) else token_shape
        elif token_shape and _gaussian_kind(fn) is None:
            # Pyro broadcasts the data against the event (Normal(loc[..., None], s)
            # .to_event(1) with loc per sequence): the tokens are the data's elements
            event = tuple(value.shape[value.dim() - fn.event_dim :])[: len(token_shape)]
            token_shape = tuple(torch.broadcast_shapes(token_shape, event))
        num = 1
        for d in token_shape:
            num *= d
        kind = _gaussian_kind(fn) or "factorized"
        present = site_token_mask(s, batch, token_shape, None)
        _check_finite(name, value, present, fn, batch, None)
    else:
        if token_plate not in {f.name for f in _plate_frames(s)}:
            raise ValueError(f"observed site {name!r} is not inside token_plate {token_plate!r}")
        i = P + token_dim
        num = batch[i]
        present = site_token_mask(s, batch, (), i)
        _check_finite(name, value, present, fn, batch, i)
        batch = batch[:i] + batch[i + 1 :]
        token_shape = (num,)
        kind = "factorized"
    site = ObservedSite(name, offset, num, kind, token_shape, _plate_frames(s))
    return site, batch, present


def _check_latents(latents, sites, token_plate):
    """Every latent must sit in the plates that index the sequences."""
    seq_frames = frozenset(
        f for s in sites for f in s.frames if f.name != token_plate and f.size > 1
    )
    for lat in latents:
        frames = _plate_frames(lat)
        missing = [f.name for f in seq_frames if f not in frames]
        if missing:
            hint = (
                f"mask along a plate with token_plate={sorted(missing)[0]!r} (the data points "
                "become the tokens of one sequence)"
                if token_plate is None
                else "move the latent inside those plates or choose another token_plate"
            )
            raise ValueError(
                f"latent site {lat['name']!r} is shared by the sequences of plate(s) "
                f"{sorted(missing)}, so they are not independent given the parameters: {hint}"
            )


def _sequence_scale(scales, seq_shape, dtype, device):
    """``(N,)`` the subsampling scale of each sequence (one scale shared by the sites)."""
    for s in scales[1:]:
        if torch.is_tensor(s) or torch.is_tensor(scales[0]):
            continue
        if s != scales[0]:
            raise ValueError(
                "observed sites have different subsampling scales; pooled tokens must share one"
            )
    N = 1
    for d in seq_shape:
        N *= d
    scale = scales[0]
    if torch.is_tensor(scale):
        return scale.expand(seq_shape).reshape(N)
    return torch.full((N,), float(scale), dtype=dtype, device=device)


def _fixed_values(observed, token_plate):
    """The observed sites whose plates (of size > 1, ``token_plate`` included) are a strict
    subset of another observed site's: values fixed by ``poutine.condition`` (a global such
    as a noise scale or a transition matrix) outside the data's plates, not data of every
    sequence. (Sites in unrelated plates stay, and are refused as before.)"""
    plates = [{f.name for f in _plate_frames(s) if f.size > 1} for s in observed]
    fixed = [s["name"] for s, p in zip(observed, plates) if any(p < q for q in plates)]
    if fixed:
        logger.info("pyro_mpt: %s outside the data's plates: fixed values, not tokens", fixed)
    return fixed


def _present_tokens(masks, sites, seq_shape, device):
    """``(N, T)`` bool, the sites' present tokens side by side; ``None`` without masks."""
    if all(m is None for m in masks):
        return None
    parts = []
    for m, site in zip(masks, sites):
        if m is None:
            m = torch.ones(site.num_tokens, dtype=torch.bool)
        m = m.to(device).expand(*seq_shape, site.num_tokens)
        parts.append(m.reshape(-1, site.num_tokens))
    return torch.cat(parts, -1)


def read_layout(trace, *, token_plate=None, max_plate_nesting=None) -> TokenLayout:
    """Reads the token layout off a trace of the model (run once, without particles).

    :param trace: a :class:`pyro.poutine.Trace` of the model.
    :param str token_plate: mask along this plate instead of along event elements.
    :param int max_plate_nesting: the model's plate depth; found from the trace if ``None``.
    :raises ValueError: for a model without observed sites, non-finite observations, no
        sequence or no token, an unknown ``token_plate``, observed sites in different
        plates, latents that couple sequences without a ``token_plate``, or an enumerated
        latent without a finite support.
    :raises TypeError: for data that are not a tensor of a dtype the site can score
        (:func:`pyro_mpt.tokens.checks.check_observed_value`).
    """
    observed = [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample"
        and s["is_observed"]
        and not s["infer"].get("is_auxiliary")
        and not is_deterministic(s)
    ]
    imputed = imputed_sites(trace)
    latents = [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not site_is_subsample(s)
        and s["name"] not in imputed
    ]
    if not observed:
        raise ValueError(
            "the model has no observed sample site: pass data with pyro.sample(..., obs=data)"
        )
    fixed = _fixed_values(observed, token_plate)
    observed = [s for s in observed if s["name"] not in fixed]
    P = _max_plate_nesting(trace)
    if max_plate_nesting is not None and max_plate_nesting != float("inf"):
        P = max(P, int(max_plate_nesting))
    token_dim = _token_plate_dim(observed, token_plate)

    sites, offset, batch_shapes, scales, masks = [], 0, [], [], []
    dtype, device = None, None
    for s in observed:
        site, batch, mask = _read_site(s, offset, P, token_plate, token_dim)
        masks.append(mask)
        value = s["value"]
        if dtype is None:
            # the dtype its log-densities come out in: integer data (an HMM's symbols) or
            # float32 data with float64 parameters give the parameters' dtype
            dtype, device = site_dtype(s["fn"], value), value.device
        sites.append(site)
        offset += site.num_tokens
        batch_shapes.append(batch)
        scales.append(s["scale"])

    try:
        seq_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError:
        raise ValueError(
            "observed sites "
            + ", ".join(f"{s.name!r} (batch {b})" for s, b in zip(sites, batch_shapes))
            + " sit in different plates; their tokens can only be pooled within one sequence"
            " batch"
        ) from None
    _check_latents(latents, sites, token_plate)
    check_sizes(sites, seq_shape, offset)
    check_enumerable(latents)
    return TokenLayout(
        sites=sites,
        latents=[s["name"] for s in latents],
        seq_shape=tuple(seq_shape),
        num_tokens=offset,
        max_plate_nesting=P,
        token_plate=token_plate,
        token_dim=token_dim,
        scale=_sequence_scale(scales, seq_shape, dtype, device),
        dtype=dtype,
        device=device,
        enumerated=[s["name"] for s in latents if s["infer"].get("enumerate") == "parallel"],
        present=_present_tokens(masks, sites, seq_shape, device),
        fixed=fixed,
    )
