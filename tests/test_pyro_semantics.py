"""Pyro's semantics honoured (issue 12): ``poutine.mask`` and ``obs_mask`` (masked-out tokens
are neither data nor scored; sequences become ragged). Exact values are computed here without
pyro_mpt: by hand (the present tokens only) and with ``TraceEnum_ELBO`` and an empty guide."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

from pyro_mpt import MaskedELBO
from pyro_mpt.engine import score_masks
from pyro_mpt.estimators import get_estimator
from pyro_mpt.ragged import ragged_batches
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close

N, T, K = 5, 6, 3
MU = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
PI = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, generator=g) * 2.0
    present = torch.rand(N, T, generator=g) < 0.6
    present[0] = True  # one full sequence, one with a single token, one empty
    present[1] = False
    present[1, 2] = True
    present[2] = False
    return x, present


def _mixture_log_p(x, present):
    """By hand: log sum_k pi_k prod_{t present} N(x_t; mu_k, 1), summed over sequences."""
    lp = dist.Normal(MU, 1.0).log_prob(x.unsqueeze(-1))  # (N, T, K)
    lp = (lp * present.unsqueeze(-1)).sum(1) + PI.log()
    return torch.logsumexp(lp, -1).sum()


@config_enumerate
def mixture_poutine_mask(x, present):
    """A per-sequence mixture, tokens in a plate, missing tokens masked by poutine.mask."""
    with pyro.plate("seq", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Categorical(PI))
        with pyro.plate("tokens", x.shape[1], dim=-1), poutine.mask(mask=present):
            pyro.sample("x", dist.Normal(MU[z], 1.0), obs=x)


@config_enumerate
def mixture_obs_mask(x, present):
    """The same with ``obs_mask``, as Pyro users write it (any valid value where missing)."""
    with pyro.plate("seq", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Categorical(PI))
        with pyro.plate("tokens", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(MU[z], 1.0), obs=x, obs_mask=present)


@config_enumerate
def mixture_event_mask(x, present):
    """Tokens as event elements, the missing ones masked inside ``.to_event``."""
    with pyro.plate("seq", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(PI))
        pyro.sample("x", dist.Normal(MU[z].unsqueeze(-1), 1.0).mask(present).to_event(1), obs=x)


def _trace_enum_log_p(model, *args):
    """log p(x) by TraceEnum_ELBO with an empty guide (every latent enumerated)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    return -elbo.loss(model, lambda *a: None, *args)


CASES = [
    (mixture_poutine_mask, {"token_plate": "tokens"}),
    (mixture_obs_mask, {"token_plate": "tokens"}),
    (mixture_event_mask, {}),
]


@pytest.mark.parametrize("model, options", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_masked_tokens_exact_reference_and_chain(model, options):
    x, present = _data()
    exact = _mixture_log_p(x, present)  # the values at missing tokens are never read
    assert_close(_trace_enum_log_p(mixture_poutine_mask, x, present), exact, atol=1e-9)
    ref = log_marginal_likelihood(model, x, present, method="exact", **options)
    assert_close(ref.total, exact, atol=1e-9)
    chain = MaskedELBO(estimator="chain", num_masks=2, **options)
    assert_close(-chain.loss(model, None, x, present), exact, atol=1e-9)


@pytest.mark.parametrize("estimator", ["stratified", "uniform", "exhaustive", "nested"])
def test_masked_tokens_unbiased(estimator):
    """Enumerated (exact) conditionals: the masked estimators' mean is log p(x_present),
    within 4 standard errors (exhaustive: exact)."""
    x, present = _data()
    exact = _mixture_log_p(x, present)
    kwargs = {"masks": "nested"} if estimator == "nested" else {"estimator": estimator}
    elbo = MaskedELBO(
        num_masks=1 if estimator == "exhaustive" else 64, token_plate="tokens", **kwargs
    )
    est = elbo.estimate(mixture_poutine_mask, None, x, present)
    if estimator == "exhaustive":
        assert_close(est.total, exact, atol=1e-9)
    else:
        assert abs(float(est.total) - float(exact)) < 4 * est.stderr
        assert est.stderr > 0
    # the empty sequence contributes nothing, the one-token sequence its own exact value
    assert est.draws[:, 2].abs().max() == 0
    lp1 = torch.logsumexp(dist.Normal(MU, 1.0).log_prob(x[1, 2]) + PI.log(), -1)
    assert_close(est.draws[:, 1], lp1.expand(est.draws.shape[0]), atol=1e-9)


def test_whole_model_masked_out_gives_zero_like_trace_elbo():
    """poutine.mask(mask=False): Trace_ELBO's loss is 0, and so is MaskedELBO's."""
    x = torch.randn(4, 7)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.zeros(7), 1.0).to_event(1), obs=x)

    masked = poutine.mask(model, mask=False)
    assert Trace_ELBO().loss(masked, lambda x: None, x) == 0
    for estimator in ("stratified", "chain", "uniform", "fixed"):
        assert float(MaskedELBO(estimator=estimator).loss(masked, None, x)) == 0.0
    assert float(log_marginal_likelihood(masked, x).total) == 0.0


def test_dense_gaussian_sequences_masked_out():
    """A MultivariateNormal sequence masked out (obs_mask over sequences) is dropped."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 4, generator=g)
    cov = A @ A.T + torch.eye(4)
    x = torch.randn(6, 4, generator=g)
    keep = torch.tensor([True, False, True, True, False, True])

    def model(x, keep):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(4), cov), obs=x, obs_mask=keep)

    exact = dist.MultivariateNormal(torch.zeros(4), cov).log_prob(x)[keep].sum()
    assert_close(log_marginal_likelihood(model, x, keep).total, exact, atol=1e-9)
    est = MaskedELBO(num_masks=4).estimate(model, None, x, keep)
    assert abs(float(est.total) - float(exact)) < 4 * est.stderr
    assert_close(est.draws[:, ~keep], torch.zeros(4, 2), atol=0)


def test_ragged_masks_stay_on_present_tokens_with_uniform_sizes():
    """Every ragged mask lies on present tokens; stratified row m has size m (weight 1/m)
    for m <= T_n and weight 0 beyond; chain orders cover each present token once."""
    _, present = _data()
    Tn = present.sum(-1)
    for name in ("stratified", "chain", "uniform", "fixed", "exhaustive"):
        for b in ragged_batches(get_estimator(name), present, 3, dtype=torch.float64, max_rows=7):
            assert not (b.scored & ~present).any() and not (b.observed & ~present).any()
            assert not (b.scored & b.observed).any()
            if name == "stratified":
                live = b.weight > 0
                assert torch.equal(b.scored.sum(-1)[live], b.size[live])
                assert (b.size[live] <= Tn.expand_as(b.size)[live]).all()
    with pytest.raises(ValueError, match="masks='affine' needs every token present"):
        list(
            ragged_batches(
                get_estimator("stratified").__class__(masks="affine"),
                present,
                1,
                dtype=torch.float64,
                max_rows=4,
            )
        )


def test_ragged_stratified_matches_brute_force_expectation():
    """With a scorer whose row score is known, E[draw] over the masks equals the exact
    sum over sizes (seeded; 4 standard errors)."""
    _, present = _data()
    w = torch.linspace(0.5, 2.0, T)

    class Additive:  # row score: sum of w over scored, times 1 + |observed| / T
        telescopes = False

        def row_cost(self, shared=False):
            return N * T

        def row_scores(self, observed, scored):
            return (scored * w).sum(-1) * (1 + observed.sum(-1) / T)

    draws, _ = score_masks(
        Additive(),
        get_estimator("stratified"),
        4000,
        num_sequences=N,
        num_tokens=T,
        dtype=torch.float64,
        device="cpu",
        present=present,
    )
    Tn = present.sum(-1).double()
    wsum = (present * w).sum(-1)
    # E[(1/m) sum_{j in M} w_j (1 + (Tn - m)/T)] = wsum/Tn (1 + (Tn - m)/T), summed over m
    expect = torch.stack(
        [
            sum(wsum[n] / Tn[n] * (1 + (Tn[n] - m) / T) for m in range(1, int(Tn[n]) + 1))
            if Tn[n] > 0
            else torch.tensor(0.0)
            for n in range(N)
        ]
    )
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - expect).abs() <= 4 * se + 1e-12).all()


def test_imputed_values_that_feed_other_sites_are_refused():
    """obs_mask's imputed values are integrated out as leaves; when the model feeds them to
    another site (an AR series with gaps), that is refused before running, naming both."""

    def ar_with_gaps(x, present):
        with pyro.plate("seq", x.shape[0]):
            prev = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                prev = pyro.sample(
                    f"x_{t}", dist.Normal(0.5 * prev, 1.0), obs=x[:, t], obs_mask=present[:, t]
                )

    x, present = _data()
    match = r"imputes for the missing data of site 'x_0' feed site 'x_1_observed'"
    with pytest.raises(ValueError, match=match):
        MaskedELBO().loss(ar_with_gaps, None, x, present)
    with pytest.raises(ValueError, match=match):
        log_marginal_likelihood(ar_with_gaps, x, present)


def test_curve_of_ragged_sequences():
    """The curve's area is log p(x_present) (exhaustive: exact); one mask size per fixed
    rate does not apply to ragged sequences, so fixed_rate_estimate says so."""
    from pyro_mpt import mpt_curve

    x, present = _data()
    curve = mpt_curve(mixture_poutine_mask, x, present, exhaustive=True, token_plate="tokens")
    assert_close(curve.area, _mixture_log_p(x, present), atol=1e-9)
    assert curve.ragged
    with pytest.raises(ValueError, match="different numbers of present tokens"):
        curve.fixed_rate_bias(0.15)


@config_enumerate
def mixture_subsampled(x, present, batch_size, seen):
    """obs_mask inside a subsampled plate, on the data's device."""
    mu, pi = MU.to(x.device), PI.to(x.device)
    with pyro.plate("seq", x.shape[0], subsample_size=batch_size, dim=-2, device=x.device) as i:
        seen.append(i)
        z = pyro.sample("z", dist.Categorical(pi))
        with pyro.plate("tokens", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x[i], obs_mask=present[i])


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_masks_and_subsample_on_the_data_device(device):
    """Ragged masks and a replayed subsample on the data's device: the exact reference and
    the chain give N / B times the subsample's log p(x_present); stratified within 4 SE."""
    x, present = _data()
    x, present = x.to(device), present.to(device)
    for run in ("reference", "chain", "stratified"):
        seen = []
        args = (x, present, 3, seen)
        if run == "reference":
            total = log_marginal_likelihood(mixture_subsampled, *args, token_plate="tokens").total
        else:
            elbo = MaskedELBO(estimator=run, num_masks=16, token_plate="tokens")
            est = elbo.estimate(mixture_subsampled, None, *args)
            total = est.total
        i = seen[0].cpu()
        exact = N / 3 * _mixture_log_p(x.cpu()[i], present.cpu()[i])
        assert total.device.type == torch.device(device).type
        if run == "stratified":
            assert abs(float(total) - float(exact)) < 4 * est.stderr + 1e-9
        else:
            assert_close(total.cpu(), exact, atol=1e-9)


def test_ragged_fixed_rate_masks_round_rate_times_each_length():
    """estimator='fixed' on ragged sequences estimates sum_n T_n S_n(m_n), m_n = max(1,
    round(r T_n)), with S_n(m) exact from the exhaustive curve (4 standard errors)."""
    from pyro_mpt import mpt_curve

    x, present = _data()
    curve = mpt_curve(mixture_poutine_mask, x, present, exhaustive=True, token_plate="tokens")
    Tn = present.sum(-1)
    m = (0.4 * Tn.double()).round().long().clamp(min=1)
    picked = curve.per_sequence.gather(-1, (m - 1).unsqueeze(-1)).squeeze(-1)
    expected = (Tn.double() * picked)[Tn > 0].sum()
    est = MaskedELBO(estimator="fixed", mask_rate=0.4, num_masks=400, token_plate="tokens")
    draw = est.estimate(mixture_poutine_mask, None, x, present)
    assert abs(float(draw.total) - float(expected)) < 4 * draw.stderr
