r"""The pieces of a sequential Monte Carlo sweep that do not depend on the order: the model
evaluated at given particle values, systematic resampling and Metropolis-Hastings moves.

:class:`ParticleModel` keeps each continuous latent in the unconstrained space of its support
(:math:`u = T^{-1}(z)`, ``T = biject_to(support)``), as ``(B, P, N, E)`` tensors: ``B``
independent sweeps, ``P`` particles, ``N`` sequences, ``E`` unconstrained elements. One run
of the model in a particle plate of ``B P`` elements gives, for every particle and sequence,
the log prior density of :math:`u`

.. math:: \log p_U(u) = \log p(T(u)) + \log \lvert \det \partial T(u) / \partial u \rvert

and the token table :math:`l_{t} = \log p(x_{n,t} \mid T(u))` (tokens independent given the
latents). The random-walk move targets
:math:`\pi_O(u) \propto p_U(u) \prod_{t \in O} p(x_t \mid T(u))`, the posterior given the
revealed tokens :math:`O`, separately for every (sweep, particle, sequence).

References: N. Chopin, "A sequential particle filter method for static models",
Biometrika 89(3), 2002; P. Del Moral, A. Doucet, A. Jasra, "Sequential Monte Carlo samplers", JRSS B 68(3),
2006.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to

from ..tokens import PARTICLE_PLATE
from .kernels import FactorizedKernel
from .particles import flatten_particles, latent_log_prob
from .sites import build_kernels

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = [
    "ParticleModel",
    "check_smc_model",
    "fit_gaussian",
    "random_walk_move",
    "split_latents",
    "systematic_resample",
]


def check_smc_model(layout: TokenLayout, trace, backend: str = "smc") -> None:
    """Raises ``ValueError`` naming the site when the model has no continuous latent to move,
    an enumerated or discrete latent, or an observed site whose tokens are not independent
    given the latents (a multivariate normal)."""
    if not layout.latents:
        raise ValueError(
            f"{backend!r} needs a continuous latent site to move; this model has none: use "
            "conditionals='gaussian' / method='exact'"
        )
    for name in layout.latents:
        fn = trace.nodes[name]["fn"]
        if name in layout.enumerated or fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} ({type(fn).__name__}) is discrete; {backend!r} moves "
                "continuous latents only: use 'enumerate' / 'importance' for this model"
            )
    for site in layout.sites:
        if site.kind != "factorized":
            raise ValueError(
                f"observed site {site.name!r} is a {site.kind} Gaussian whose tokens are not "
                f"independent given the latents; {backend!r} needs per-token likelihoods: use "
                "'importance' (or write the site as Normal(...).to_event(1))"
            )


class _Pin(pyro.poutine.messenger.Messenger):
    """Sets the named latent sites to given values of their full particle shape."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


class ParticleModel:
    """The model run with ``B * P`` particles of its latents (see the module docstring).

    :param model: the Pyro model; ``args``, ``kwargs`` its arguments.
    :param layout: its :class:`~pyro_mpt.tokens.TokenLayout` (factorized tokens).
    """

    def __init__(self, model, args: tuple, kwargs: dict, layout: TokenLayout):
        self.model, self.args, self.kwargs, self.layout = model, args, kwargs, layout
        self.shapes: dict = {}  # site -> unconstrained native shape (B P, *plates, *event)
        self.transforms: dict = {}

    def _trace(self, S: int, values: dict | None = None):
        P = self.layout.max_plate_nesting

        def particle_model(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, S, dim=-P - 1):
                if values is None:
                    return self.model(*args, **kwargs)
                with _Pin(values):
                    return self.model(*args, **kwargs)

        # the model's arguments were validated on its first trace; data outside a
        # likelihood's support must score -inf here, not raise
        with pyro.validation_enabled(False):
            return poutine.trace(particle_model).get_trace(*self.args, **self.kwargs)

    def draw(self, B: int, P: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``B * P`` prior draws: ``(u, log_prior, table)`` with ``u`` a dict of ``(B, P, N,
        E)`` tensors, ``log_prior`` ``(B, P, N)`` and ``table`` ``(B, P, N, T)``."""
        return self.unconstrain(self._trace(B * P), B, P)

    def draw_weighted(self, B: int, P: int) -> tuple:
        """:meth:`draw` and the draws' log-weights ``(B, P, N)`` under the prior: ``None``
        for prior draws (all equal); a proposal's draws weigh :math:`p(z)/q(z)`
        (:class:`~pyro_mpt.conditionals.proposal.ProposalParticleModel`)."""
        return (*self.draw(B, P), None)

    def unconstrain(self, tr, B: int, P: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``(u, log_prior, table)`` of the latents' values in the trace ``tr`` of ``B * P``
        particles, as :meth:`draw` returns them."""
        u = {}
        for name in self.layout.latents:
            site = tr.nodes[name]
            transform = biject_to(site["fn"].support)
            raw = transform.inv(site["value"])
            self.transforms[name], self.shapes[name] = transform, tuple(raw.shape)
            u[name] = self._flat(raw, B, P)
        log_prior, table = self._read(tr, u, B, P)
        return u, log_prior, table

    def evaluate(self, u: dict, B: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, table)`` at the unconstrained particles ``u`` (from :meth:`draw`)."""
        values = {
            name: self.transforms[name](x.reshape(self.shapes[name])) for name, x in u.items()
        }
        return self._read(self._trace(B * P, values), u, B, P)

    def _flat(self, raw: torch.Tensor, B: int, P: int) -> torch.Tensor:
        N = self.layout.num_sequences
        mid = raw.shape[1 : 1 + self.layout.max_plate_nesting]
        if math.prod(mid) != N:
            raise ValueError(
                f"a latent site has plate shape {tuple(mid)}, not one value per sequence of "
                f"{tuple(self.layout.seq_shape)}: 'smc' moves per-sequence latents only"
            )
        return raw.reshape(B, P, N, -1)

    def _read(self, tr, u: dict, B: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout, S = self.layout, B * P
        kernels, lead = build_kernels(tr, layout)
        if not all(isinstance(k, FactorizedKernel) for _, k in kernels):
            raise ValueError("'smc' needs observed sites with per-token likelihoods")
        kernels = sorted(kernels, key=lambda item: item[0].start)
        tables = [k.table.expand(S, *k.table.shape[1:]) for _, k in kernels]
        table = torch.cat(tables, -1).reshape(B, P, layout.num_sequences, -1)
        if table.shape[-1] != layout.num_tokens:
            raise ValueError(
                f"the observed sites give {table.shape[-1]} token log-densities per sequence "
                f"but their distributions have {layout.num_tokens} tokens: a distribution "
                "whose event shape is smaller than its value's broadcasts (e.g. "
                "Normal(z.unsqueeze(-1), s).to_event(1) against T columns); expand its "
                "parameters to the data's shape"
            )
        lead = (S,)
        log_prior = sum(
            flatten_particles(lp, layout, lead, 0)
            for lp in latent_log_prob(tr, layout.latents, layout)
        )
        for name in layout.latents:
            raw = u[name].reshape(self.shapes[name])
            value = tr.nodes[name]["value"]
            ladj = self.transforms[name].log_abs_det_jacobian(raw, value)
            ladj = ladj.reshape(S, layout.num_sequences, -1).sum(-1) if ladj.dim() else ladj
            log_prior = log_prior + ladj
        return log_prior.reshape(B, P, -1), table


def systematic_resample(log_w: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    r"""Ancestor indices ``(B, P, N)`` by systematic resampling of the particles (dim 1) of
    every (sweep, sequence) where ``need`` (``(B, N)``) holds; the identity elsewhere.

    One uniform :math:`U` per (sweep, sequence); particle ``p`` takes the ancestor whose
    cumulative normalised weight first exceeds :math:`(p + U) / P`: unbiased (each particle
    expects :math:`P W_s` offspring) with less variance than multinomial resampling.
    """
    B, P, N = log_w.shape
    cdf = torch.softmax(log_w, 1).permute(0, 2, 1).cumsum(-1)  # (B, N, P)
    cdf = cdf / cdf[..., -1:]  # rounding must not leave the last bin short of 1
    offset = torch.rand(B, N, 1, dtype=log_w.dtype, device=log_w.device)
    points = (torch.arange(P, dtype=log_w.dtype, device=log_w.device) + offset) / P
    ancestors = torch.searchsorted(cdf.contiguous(), points.contiguous()).clamp(max=P - 1)
    keep = torch.arange(P, device=log_w.device).expand(B, N, P)
    return torch.where(need.unsqueeze(-1), ancestors, keep).permute(0, 2, 1)


def fit_gaussian(x: torch.Tensor, W: torch.Tensor):
    """The weighted mean ``(B, 1, N, d)`` and Cholesky factor ``(B, N, d, d)`` of the
    particle cloud ``x`` (``(B, P, N, d)``), with a jitter so that a collapsed cloud (one
    distinct particle) still moves."""
    mean = (W * x).sum(1, keepdim=True)
    r = (x - mean).permute(0, 2, 1, 3)  # (B, N, P, d)
    cov = (r * W.permute(0, 2, 1, 3)).mT @ r
    d = x.shape[-1]
    jitter = 1e-6 * (1 + cov.diagonal(dim1=-2, dim2=-1).mean(-1)).reshape(*cov.shape[:2], 1, 1)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return mean, torch.linalg.cholesky_ex(cov + jitter * eye)[0]


def split_latents(x: torch.Tensor, like: dict) -> dict:
    """``x`` (``(..., d)``, the latents concatenated) split into ``like``'s sites."""
    out, start = {}, 0
    for name, v in like.items():
        out[name] = x[..., start : start + v.shape[-1]]
        start += v.shape[-1]
    return out


def random_walk_move(
    pm: ParticleModel,
    state: dict,
    revealed: torch.Tensor,
    log_w: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    r"""``num_steps * max(1, d - 1)`` Metropolis-Hastings steps on every particle (``d``: the
    unconstrained latent elements per sequence; a random walk's progress per step falls as
    ``1/d``; too few steps left a 6-dimensional Kalman chain's evidence biased), each leaving
    :math:`\pi_O` invariant (``revealed``: ``(B, N, T)``, the power of each token's
    likelihood in the target, 0 to 1, so tempered targets too); updates ``state``
    (``u``, ``log_prior``, ``table``) in place and returns the acceptance rate ``(B, N)``.

    Each step proposes :math:`u' = u + \frac{2.38}{\sqrt d} L \varepsilon`, with :math:`L`
    the Cholesky factor of the weighted covariance of the particle cloud (per sweep and
    sequence; Roberts and Rosenthal's scale), fixed before the steps, so each step is a
    symmetric Metropolis kernel for :math:`\pi_O`. (An independence proposal fitted to the
    cloud mixes faster but, as the cloud includes the particle it moves, it biased the
    evidence upwards by a few hundredths of a nat in our tests: the random walk's
    dependence on the cloud, through its scale only, showed none.)
    """
    B, P = log_w.shape[:2]
    x = torch.cat(list(state["u"].values()), -1)  # (B, P, N, d)
    # the latents keep their prior's dtype, which may differ from the data's (float32
    # priors with float64 observations): the proposal is built in the latents' dtype
    W = torch.softmax(log_w, 1).unsqueeze(-1).to(x.dtype)  # (B, P, N, 1)
    _, chol = fit_gaussian(x, W)
    rev = revealed.unsqueeze(1).to(log_w.dtype)  # (B, 1, N, T)
    target = state["log_prior"] + (state["table"] * rev).sum(-1)
    accepted = torch.zeros_like(target)
    num_steps = num_steps * max(1, x.shape[-1] - 1)
    for _ in range(num_steps):
        eps = (chol.unsqueeze(1) @ torch.randn_like(x).unsqueeze(-1)).squeeze(-1)
        proposal = x + 2.38 / math.sqrt(x.shape[-1]) * eps
        log_prior, table = pm.evaluate(split_latents(proposal, state["u"]), B, P)
        new_target = log_prior + (table * rev).sum(-1)
        ratio = torch.nan_to_num(new_target - target, nan=-math.inf)
        accept = torch.rand_like(target).log() < ratio
        x = torch.where(accept.unsqueeze(-1), proposal, x)
        state["log_prior"] = torch.where(accept, log_prior, state["log_prior"])
        state["table"] = torch.where(accept.unsqueeze(-1), table, state["table"])
        target = torch.where(accept, new_target, target)
        accepted = accepted + accept.to(accepted.dtype)
    state["u"].update(split_latents(x, state["u"]))
    return (W.squeeze(-1) * accepted).sum(1) / max(1, num_steps)
