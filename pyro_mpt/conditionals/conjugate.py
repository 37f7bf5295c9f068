r"""The ``"conjugate"`` backend: exact conditionals of one conjugate latent and its tokens.

A continuous latent :math:`\theta` whose only children are the observed tokens, each with
:math:`\theta` itself as its parameter, is integrated in closed form for the pairs
Beta -> Bernoulli / Binomial (``probs``), Dirichlet -> Categorical (``probs``) and
Gamma -> Poisson / Exponential (``rate``). Each token :math:`t` has a sufficient statistic
:math:`s_t` and a base measure :math:`h_t`, the prior has parameters :math:`\alpha` and
log-normaliser :math:`Z`, and for any set :math:`O` of observed tokens

.. math::
    \log p(x_O) = \sum_{t\in O} h_t + Z\Big(\alpha + \sum_{t \in O} s_t\Big) - Z(\alpha),
    \qquad
    \log p(x_j \mid x_O) = h_j + Z(\alpha_O + s_j) - Z(\alpha_O),\quad
    \alpha_O = \alpha + \sum_{t\in O} s_t,

the posterior predictive given the observed tokens' counts. With
:math:`Z_{\mathrm{Dir}}(\alpha) = \sum_d \log\Gamma(\alpha_d) - \log\Gamma(\sum_d \alpha_d)`
(Beta: :math:`\alpha = (a, b)`, :math:`s_t = (x_t, n_t - x_t)`,
:math:`h_t = \log\binom{n_t}{x_t}`; Dirichlet: :math:`s_t` the one-hot symbol) and
:math:`Z_{\Gamma}(a, b) = \log\Gamma(a) - a \log b` (Poisson: :math:`s_t = (x_t, 1)`,
:math:`h_t = -\log x_t!`; Exponential: :math:`s_t = (1, x_t)`). The statistics of every
mask row's observed tokens are one matrix product of the mask rows with the token
statistics. Differentiable in the prior's parameters.

The model is checked, not trusted: it is run twice with the latent set to two random
values, and the token's parameter must equal the latent each time (no transformation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Dirichlet,
    Exponential,
    Gamma,
    Independent,
    Poisson,
)

from ..tokens.masks import is_deterministic
from .affine import _per_sequence, _same_scale
from .base import Conditionals
from .particles import ParticleScorer

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["ConjugateConditionals", "ConjugateKernel", "NotConjugate", "detect_conjugate"]

#: the priors and the token distributions each is conjugate to (parameter read off the token)
PAIRS = {
    Beta: {Bernoulli: "probs", Binomial: "probs"},
    Dirichlet: {Categorical: "probs"},
    Gamma: {Poisson: "rate", Exponential: "rate"},
}

#: seed of the two latent values the check runs the model at (a private generator: the
#: check neither consumes nor depends on torch's global random stream)
_CHECK_SEED = 20230602


class NotConjugate(ValueError):
    """The model has no conjugate route; the message says which site and why."""


def _base(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


def _log_normaliser(family: str, alpha: torch.Tensor) -> torch.Tensor:
    """:math:`Z(\\alpha)` over the last dim of ``alpha``."""
    if family == "gamma":
        return torch.lgamma(alpha[..., 0]) - alpha[..., 0] * alpha[..., 1].log()
    return torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.sum(-1))


class ConjugateKernel:
    r"""The token kernel of a conjugate pair (module docstring): ``log_marginal`` and
    ``log_cond`` of :class:`~pyro_mpt.conditionals.particles.ParticleScorer`, without
    particles (``S = 1``).

    :param str family: ``"dirichlet"`` (Beta included) or ``"gamma"``.
    :param alpha: ``(N, D)`` the prior's parameters per sequence.
    :param stats: ``(N, T, D)`` the tokens' sufficient statistics.
    :param base: ``(N, T)`` the tokens' log base measure.
    """

    def __init__(self, family: str, alpha: torch.Tensor, stats: torch.Tensor, base: torch.Tensor):
        self.family, self.alpha, self.stats, self.base = family, alpha, stats, base

    def row_cost(self, shared: bool = False) -> int:
        N, T, D = self.stats.shape
        return 3 * N * T * D

    def _posterior(self, observed: torch.Tensor) -> torch.Tensor:
        """``(R, N, D)``: :math:`\\alpha + \\sum_{t \\in O_r} s_t`, one matmul per row."""
        obs = observed.to(self.stats.dtype).expand(-1, self.stats.shape[0], -1)
        return self.alpha + torch.einsum("rnt,ntd->rnd", obs, self.stats)

    def __call__(
        self, observed: torch.Tensor, scored: torch.Tensor, need_marginal: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        post = self._posterior(observed)  # (R, N, D)
        z_post = _log_normaliser(self.family, post)
        marginal = None
        if need_marginal:
            obs = observed.to(self.base.dtype).expand(-1, self.base.shape[0], -1)
            h = (obs * self.base).sum(-1)
            marginal = (h + z_post - _log_normaliser(self.family, self.alpha)).unsqueeze(1)
        z_next = _log_normaliser(self.family, post.unsqueeze(-2) + self.stats)  # (R, N, T)
        cond = self.base + z_next - z_post.unsqueeze(-1)
        return marginal, cond.unsqueeze(1)


@dataclass
class _Pair:
    """The latent, the observed site and the kind of pair."""

    latent: str
    site: object  # ObservedSite
    family: str
    param: str


def _find_pair(trace, layout: TokenLayout) -> _Pair:
    """The structural checks: one continuous latent of a conjugate prior, one observed site
    of a distribution conjugate to it, no other sample site and no weighting."""
    if len(layout.latents) != 1 or layout.enumerated:
        raise NotConjugate(
            f"it has {len(layout.latents)} latent sites {layout.latents}, not one continuous latent"
        )
    if len(layout.sites) != 1:
        names = [s.name for s in layout.sites]
        raise NotConjugate(f"the latent has several observed children {names}")
    name, info = layout.latents[0], layout.sites[0]
    lat, obs = trace.nodes[name], trace.nodes[info.name]
    prior = _kind(_base(lat["fn"]), PAIRS)
    if prior is None:
        found = type(_base(lat["fn"])).__name__
        raise NotConjugate(f"latent site {name!r} is a {found}, not a {_names(PAIRS)}")
    child = _kind(_base(obs["fn"]), PAIRS[prior])
    if child is None:
        found = type(_base(obs["fn"])).__name__
        raise NotConjugate(
            f"observed site {info.name!r} is a {found}, not conjugate to the "
            f"{prior.__name__} latent {name!r} (conjugate: {_names(PAIRS[prior])})"
        )
    others = [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample"
        and n not in (name, info.name)
        and not site_is_subsample(s)
        and not is_deterministic(s)
    ]
    if others:
        raise NotConjugate(f"the sites {others} sit beside the latent {name!r} and its tokens")
    mask = lat["mask"]
    if mask is not None and mask is not True and not (torch.is_tensor(mask) and bool(mask.all())):
        raise NotConjugate(f"latent site {name!r} is masked (poutine.mask)")
    if not _same_scale(lat["scale"], obs["scale"]):
        raise NotConjugate(f"latent site {name!r} is scaled unlike its tokens")
    family = "gamma" if prior is Gamma else "dirichlet"
    return _Pair(name, info, family, PAIRS[prior][child])


def _kind(fn, table):
    """The class in ``table`` that ``fn`` is an instance of (Pyro's wrappers included)."""
    return next((cls for cls in table if isinstance(fn, cls)), None)


def _names(table) -> str:
    return " or ".join(cls.__name__ for cls in table)


def _param(fn, param: str, layout: TokenLayout) -> torch.Tensor:
    """``(N, T, K)``: the tokens' parameter (``K`` categories, or 1) per sequence."""
    base = _base(fn)
    value = getattr(base, param)
    extra = 1 if isinstance(base, Categorical) else 0
    value = value.expand(base.batch_shape + value.shape[value.dim() - extra :])
    flat = _per_sequence(value, fn.event_dim + extra, layout)
    return flat.reshape(flat.shape[0], layout.num_tokens, -1)


def _latent(site, layout: TokenLayout, value: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, K)``: the latent's ``value`` (default: its value in ``site``) per sequence.

    :raises NotConjugate: when the latent is not one value per sequence (inside the token
        plate, or batched within the sequence)."""
    fn = site["fn"]
    value = site["value"] if value is None else value
    flat = _per_sequence(value.expand(fn.shape()), fn.event_dim, layout)
    want = fn.event_shape[-1] if isinstance(_base(fn), Dirichlet) else 1
    if flat.shape[-1] != want:
        raise NotConjugate(
            f"latent site {site['name']!r} has {flat.shape[-1]} values per sequence, not one "
            "(a latent inside the token plate, or a batch of latents per sequence)"
        )
    return flat


def _draw(fn, generator: torch.Generator) -> torch.Tensor:
    """A random value inside the support of the prior ``fn``, of its shape."""
    u = torch.rand(fn.shape(), generator=generator, dtype=torch.float64)
    base = _base(fn)
    if isinstance(base, Gamma):
        u = 0.5 + 1.5 * u
    elif isinstance(base, Dirichlet):
        u = (0.5 + u) / (0.5 + u).sum(-1, keepdim=True)
    else:
        u = 0.2 + 0.6 * u
    like = base.concentration if isinstance(base, (Gamma, Dirichlet)) else base.concentration1
    return u.to(dtype=like.dtype, device=like.device)


def _check_parameter(model, args, kwargs, trace, layout: TokenLayout, pair: _Pair) -> None:
    """Runs the model twice with the latent at random values: the tokens' parameter must be
    that value each time (no transformation), and a Binomial's ``total_count`` fixed."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    lat, site = trace.nodes[pair.latent], pair.site.name
    for _ in range(2):
        value = _draw(lat["fn"], generator)
        with torch.no_grad(), poutine.block():
            conditioned = poutine.condition(model, data={pair.latent: value})
            rerun = poutine.trace(conditioned).get_trace(*args, **kwargs)
        if site not in rerun.nodes:
            raise NotConjugate(f"observed site {site!r} did not recur when the model was rerun")
        fn = rerun.nodes[site]["fn"]
        param = _param(fn, pair.param, layout)
        expected = _latent(lat, layout, value).unsqueeze(1).expand_as(param)
        if not torch.allclose(param.detach(), expected.to(param.dtype), rtol=1e-9, atol=1e-12):
            raise NotConjugate(
                f"the {pair.param} of observed site {site!r} is not the latent "
                f"{pair.latent!r} itself (a transformation of it, or another parent)"
            )
        if isinstance(_base(fn), Binomial):
            count = _base(fn).total_count
            if not torch.equal(
                *torch.broadcast_tensors(count, _base(trace.nodes[site]["fn"]).total_count)
            ):
                raise NotConjugate(f"the total_count of {site!r} depends on the latent")


def _statistics(fn, x: torch.Tensor, layout: TokenLayout, dtype) -> tuple:
    """``(stats (N, T, D), base (N, T))`` of the tokens ``x`` (``(N, T)``)."""
    base = _base(fn)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    if isinstance(base, Categorical):
        K = base.probs.shape[-1]
        return torch.nn.functional.one_hot(x.long(), K).to(dtype), zero.expand(x.shape)
    x = x.to(dtype)
    one = torch.ones_like(x)
    if isinstance(base, Bernoulli):
        return torch.stack([x, one - x], -1), zero.expand(x.shape)
    if isinstance(base, Binomial):
        n = base.total_count.expand(base.batch_shape)
        n = _per_sequence(n, fn.event_dim, layout).to(dtype)
        h = torch.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
        return torch.stack([x, n - x], -1), h
    if isinstance(base, Poisson):
        return torch.stack([x, one], -1), -torch.lgamma(x + 1)
    return torch.stack([one, x], -1), zero.expand(x.shape)  # Exponential


def _prior(fn, layout: TokenLayout) -> torch.Tensor:
    """``(N, D)``: the prior's parameters per sequence, differentiable."""
    base = _base(fn)
    if isinstance(base, Dirichlet):
        parts = [base.concentration]
    elif isinstance(base, Gamma):
        parts = [base.concentration, base.rate]
    else:
        parts = [base.concentration1, base.concentration0]
    event = base.event_shape
    parts = [p.expand(base.batch_shape + event) for p in parts]
    laid = [_per_sequence(p, fn.event_dim, layout) for p in parts]
    return laid[0] if len(laid) == 1 else torch.cat(laid, -1)


def compile_conjugate(model, args: tuple, kwargs: dict, layout: TokenLayout, trace):
    """The :class:`~pyro_mpt.conditionals.conjugate.ConjugateKernel` of a conjugate model
    (module docstring).

    :raises NotConjugate: naming the site and the reason when the model is not one
        conjugate latent whose tokens' parameter is the latent itself."""
    pair = _find_pair(trace, layout)
    lat, obs = trace.nodes[pair.latent], trace.nodes[pair.site.name]
    _latent(lat, layout)  # one value per sequence
    _check_parameter(model, args, kwargs, trace, layout, pair)
    fn = obs["fn"]
    x = _per_sequence(obs["value"].expand(fn.shape()), fn.event_dim, layout)
    present = layout.present_tokens()
    x = torch.where(present, x, torch.zeros_like(x))  # missing values (NaN) never read
    alpha = _prior(lat["fn"], layout)
    stats, base = _statistics(fn, x, layout, alpha.dtype)
    # absent tokens are never observed; zero their statistics so no NaN reaches a gradient
    stats = torch.where(present.unsqueeze(-1), stats, torch.zeros_like(stats))
    base = torch.where(present, base, torch.zeros_like(base))
    return ConjugateKernel(pair.family, alpha, stats, base)


def detect_conjugate(
    model, args: tuple, kwargs: dict, layout: TokenLayout, trace
) -> tuple[ConjugateKernel | None, str]:
    """Whether the model is one conjugate latent and its tokens: ``(kernel, why)``,
    ``kernel`` ``None`` when it is not, ``why`` the reason either way."""
    if not layout.latents:
        return None, "not conjugate: the model has no latent sites"
    try:
        kernel = compile_conjugate(model, args, kwargs, layout, trace)
    except NotConjugate as e:
        return None, f"not conjugate: {e}"
    prior = type(_base(trace.nodes[layout.latents[0]]["fn"])).__name__
    child = type(_base(trace.nodes[layout.sites[0].name]["fn"])).__name__
    return kernel, (
        f"the {prior} latent {layout.latents[0]!r} is conjugate to its {child} tokens "
        f"{layout.sites[0].name!r}, whose parameter it is: integrated in closed form"
    )


class ConjugateConditionals(Conditionals):
    r"""Exact conditionals of one conjugate latent (module docstring): the posterior
    predictive given the observed tokens' counts.

    :param compiled: ``(trace, kernel)`` already compiled, used once for that trace
        (``"auto"`` passes the one its detection made).

    Example::

        MaskedELBO(conditionals="conjugate", token_plate="data").estimate(model, None, x)
    """

    name = "conjugate"

    def __init__(self, compiled: tuple | None = None):
        self._compiled = compiled

    def compile(self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace):
        """The :class:`~pyro_mpt.conditionals.conjugate.ConjugateKernel` of the model.

        :raises ValueError: naming the site and the reason when it is not conjugate."""
        if self._compiled is not None and self._compiled[0] is trace:
            kernel, self._compiled = self._compiled[1], None
            return kernel
        try:
            return compile_conjugate(model, args, kwargs, layout, trace)
        except NotConjugate as e:
            raise ValueError(
                f"conditionals='conjugate' cannot score this model: {e}. Use "
                "conditionals='auto' (it falls back to another backend) or 'importance'"
            ) from None

    def scorer(
        self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace
    ) -> ParticleScorer:
        kernel = self.compile(model, args, kwargs, layout, trace)
        return ParticleScorer([(slice(0, layout.num_tokens), kernel)], layout, log_w0=None)
