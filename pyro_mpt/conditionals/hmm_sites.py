r"""Whole-sequence observed sites: a :class:`pyro.distributions.DiscreteHMM` whose time steps
are the tokens.

For a hidden chain :math:`z_{-1} \sim \pi`, :math:`z_t \mid z_{t-1} \sim A_t`,
:math:`x_t \mid z_t \sim p(x_t \mid z_t)` (Pyro's ``DiscreteHMM`` convention: the initial
state precedes the first transition), an observed-token mask :math:`O` sets the emission
log-likelihood :math:`e_t(c) = \log p(x_t \mid z_t = c)` of every unobserved step to 0, which
marginalises that step exactly (:math:`\sum_{x_t} p(x_t \mid z_t) = 1`). With the masked
forward and backward messages

.. math::
    \tilde\alpha_t(c) = \log \sum_{c'} e^{\alpha_{t-1}(c')} A_t(c', c), \quad
    \alpha_t = \tilde\alpha_t + o_t e_t, \quad
    \beta_{t-1}(c') = \log \sum_{c} A_t(c', c)\, e^{o_t e_t(c) + \beta_t(c)},

the evidence is :math:`\log p(x_O) = \operatorname{logsumexp}_c \alpha_{T-1}(c)` and, for a
token :math:`j \notin O`,

.. math::
    \log p(x_j \mid x_O) = \operatorname{logsumexp}_c(\tilde\alpha_j + \beta_j + e_j)
    - \operatorname{logsumexp}_c(\tilde\alpha_j + \beta_j),

the forward-backward marginal of :math:`z_j` given the other observed steps, mixed over
its emission. The recursion is a scan over time steps, batched over masks, particles and
sequences.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.ops.gaussian import Gaussian

from ..compat import gaussian_hmm_factors

__all__ = ["DiscreteHMMKernel", "gaussian_hmm_joint", "hmm_factors", "is_whole_sequence"]


def is_whole_sequence(fn) -> bool:
    """Whether ``fn`` is a whole-sequence distribution whose time steps are tokens."""
    return isinstance(fn, (dist.DiscreteHMM, dist.GaussianHMM))


def hmm_factors(fn: dist.DiscreteHMM, value: torch.Tensor) -> list:
    r"""The log-factors of a ``DiscreteHMM`` site, each with its extra (non-batch) dims:
    ``[(initial (..., C), 1), (transition (..., T, C, C), 3), (emission (..., T, C), 2)]``,
    with :math:`e_t(c) = \log p(x_t \mid z_t = c)` computed as
    :meth:`pyro.distributions.DiscreteHMM.log_prob` computes it.

    :param fn: the site's distribution.
    :param value: its observed value, ``(..., T, *obs event)``.
    """
    obs = fn.observation_dist
    emission = obs.log_prob(value.unsqueeze(-1 - obs.event_dim))  # (..., T, C)
    T, C = value.shape[value.dim() - fn.event_dim], fn.initial_logits.shape[-1]
    trans = fn.transition_logits
    if trans.dim() < 3:  # one matrix for every step
        trans = trans.unsqueeze(-3)
    trans = trans.expand(*trans.shape[:-3], T, C, C)
    return [(fn.initial_logits, 1), (trans, 3), (emission, 2)]


class DiscreteHMMKernel:
    r"""Masked forward-backward conditionals of a ``DiscreteHMM`` site (module docstring).

    :param init: ``(S, N, C)`` normalised initial log-probabilities.
    :param trans: ``(S, N, T, C, C)`` normalised transition log-probabilities.
    :param emission: ``(S, N, T, C)`` emission log-likelihoods :math:`e_t(c)`.
    """

    def __init__(self, init: torch.Tensor, trans: torch.Tensor, emission: torch.Tensor):
        self.init, self.trans, self.emission = init, trans, emission

    def row_cost(self, shared: bool = False) -> int:
        S, N, T, C = self.emission.shape
        return 4 * S * N * T * C * C

    def __call__(
        self, observed: torch.Tensor, scored: torch.Tensor, need_marginal: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(log p(x_O | z) (R, S, N) or None, log p(x_t | x_O, z) (R, S, N, T))``."""
        e = self.emission.unsqueeze(0)  # (1, S, N, T, C)
        o = observed.unsqueeze(1).unsqueeze(-1)  # (R, 1, N, T, 1)
        # torch.where, not a product: an impossible emission (-inf) times 0 would be NaN
        eo = torch.where(o, e, e.new_zeros(()))  # (R, S, N, T, C)
        trans = self.trans.unsqueeze(0)  # (1, S, N, T, C, C)
        T = e.shape[-2]
        alpha, prior = self.init.unsqueeze(0), []
        for t in range(T):  # a scan over time; masks, particles, sequences are batched
            pred = torch.logsumexp(alpha.unsqueeze(-1) + trans[..., t, :, :], -2)
            prior.append(pred)
            alpha = pred + eo[..., t, :]
        beta, after = torch.zeros_like(alpha), [None] * T
        for t in range(T - 1, -1, -1):
            after[t] = beta
            if t > 0:
                beta = torch.logsumexp(
                    trans[..., t, :, :] + (eo[..., t, :] + beta).unsqueeze(-2), -1
                )
        prior = torch.stack(torch.broadcast_tensors(*prior), -2)  # the first lacks the mask dim
        post = prior + torch.stack(torch.broadcast_tensors(*after), -2)  # (R, S, N, T, C)
        log_cond = torch.logsumexp(post + e, -1) - torch.logsumexp(post, -1)
        marginal = torch.logsumexp(alpha, -1) if need_marginal else None
        return marginal, log_cond


def gaussian_hmm_joint(fn: dist.GaussianHMM, num_steps: int) -> dist.MultivariateNormal:
    r"""The joint Gaussian of the ``T x obs_dim`` observations of a ``GaussianHMM``,
    flattened time-major, so that its elements are scored as a dense Gaussian site.

    The initial, transition and observation factors (information form, from
    :func:`~pyro_mpt.compat.gaussian_hmm_factors`) are placed into one precision matrix over
    :math:`(z_{-1}, z_0, \dots, z_{T-1}, x_0, \dots, x_{T-1})` and the states are
    marginalised out by a Schur complement:

    .. math::
        \Lambda_x = \Lambda_{xx} - \Lambda_{xz}\Lambda_{zz}^{-1}\Lambda_{zx}, \quad
        \eta_x = \eta_x - \Lambda_{xz}\Lambda_{zz}^{-1}\eta_z, \quad
        x \sim \mathcal N(\Lambda_x^{-1}\eta_x, \Lambda_x^{-1}).

    Dense in :math:`T \cdot d_x` (fine for moderate ``T``); the loop over the ``T`` steps
    only places blocks.

    :param fn: the site's distribution.
    :param int num_steps: ``T``, the length of the observed sequence.
    """
    # an Independent Normal observation noise comes as a lazy AffineNormal: make it dense
    init, trans, obs = (
        g.to_gaussian() if hasattr(g, "to_gaussian") else g for g in gaussian_hmm_factors(fn)
    )
    H, O, T = fn.hidden_dim, fn.obs_dim, num_steps
    Z = H * (T + 1)
    batch = tuple(fn.batch_shape)
    init = init.expand(batch)
    trans, obs = trans.expand(batch + (T,)), obs.expand(batch + (T,))
    ref = init.precision
    prec = ref.new_zeros(*batch, Z + T * O, Z + T * O)
    info = ref.new_zeros(*batch, Z + T * O)

    def place(gauss, idx):
        ix = torch.as_tensor(idx, device=ref.device)
        prec[..., ix.unsqueeze(-1), ix] += gauss.precision
        info[..., ix] += gauss.info_vec

    place(init, list(range(H)))
    for t in range(T):  # only places each step's blocks
        step = trans.precision[..., t, :, :], trans.info_vec[..., t, :]
        place(_Block(*step), list(range(H * t, H * (t + 2))))
        zt, xt = range(H * (t + 1), H * (t + 2)), range(Z + O * t, Z + O * (t + 1))
        place(_Block(obs.precision[..., t, :, :], obs.info_vec[..., t, :]), [*zt, *xt])
    joint = Gaussian(ref.new_zeros(batch), info, prec)
    marginal = joint.marginalize(left=Z)
    cov = torch.cholesky_inverse(torch.linalg.cholesky(marginal.precision))
    loc = (cov @ marginal.info_vec.unsqueeze(-1)).squeeze(-1)
    return dist.MultivariateNormal(loc, covariance_matrix=cov)


class _Block:
    """A precision block and its information vector (one time step of a factor)."""

    def __init__(self, precision, info_vec):
        self.precision, self.info_vec = precision, info_vec
