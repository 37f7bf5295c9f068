"""Subsampled plates (issue 12): the indices are drawn once per call and replayed in every
internal trace; the estimate is that of the subsample, scaled by full size / subsample size
as Pyro scales it. Exact values by the forward algorithm, written here without pyro_mpt."""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close, random_hmm_params

C, V, NUM_SEQ, BATCH, MAX_LEN, TONES = 3, 2, 20, 6, 5, 2


def _hmm_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    init, trans, _ = random_hmm_params(C, V, seed)
    probs_y = torch.rand(C, TONES, generator=g) * 0.8 + 0.1
    lengths = torch.randint(1, MAX_LEN + 1, (NUM_SEQ,), generator=g)
    y = (torch.rand(NUM_SEQ, MAX_LEN, TONES, generator=g) < 0.5).double()
    return init, trans, probs_y, lengths, y


def hmm_model_1(sequences, lengths, params, batch_size, seen):
    """examples/hmm.py's model_1 with fixed parameters: a Categorical HMM over Bernoulli
    tones, sequences of different lengths masked by poutine.mask, minibatched."""
    init, trans, probs_y = params
    tones_plate = pyro.plate("tones", TONES, dim=-1)
    with pyro.plate("sequences", len(sequences), batch_size, dim=-2) as batch:
        seen.append(batch)
        lengths = lengths[batch]
        x = None
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                probs = init if x is None else trans[x]
                x = pyro.sample(f"x_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t]
                    )


def _forward(init, trans, probs_y, y, length):
    """log p(y_{0..length-1}) of one sequence by the forward algorithm."""
    emit = dist.Bernoulli(probs_y).log_prob(y[:length].unsqueeze(1)).sum(-1)  # (L, C)
    alpha = init.log() + emit[0]
    for t in range(1, length):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + trans.log(), 0) + emit[t]
    return torch.logsumexp(alpha, 0)


def _subsample_exact(batch, data):
    init, trans, probs_y, lengths, y = data
    per = torch.stack([_forward(init, trans, probs_y, y[n], int(lengths[n])) for n in batch])
    return NUM_SEQ / BATCH * per.sum()


def test_subsample_replayed_and_scaled_reference():
    """Three calls: three subsamples, each exact for its own subsample x scale, said so."""
    data = _hmm_data()
    init, trans, probs_y, lengths, y = data
    totals = []
    for _ in range(3):
        seen = []
        ref = log_marginal_likelihood(
            hmm_model_1, y, lengths, (init, trans, probs_y), BATCH, seen, token_plate="tones"
        )
        assert all(torch.equal(s, seen[0]) for s in seen) and len(seen) >= 2
        assert_close(ref.total, _subsample_exact(seen[0], data), atol=1e-9)
        assert any("subsample" in m for m in ref.messages)
        totals.append(float(ref.total))
    assert len(set(totals)) > 1  # each call its own subsample


def test_subsample_masked_elbo_and_curve():
    """MaskedELBO's chain (exact conditionals) equals the scaled subsample value; the curve's
    area too; no KeyError although each subsample has its own longest sequence."""
    data = _hmm_data(1)
    init, trans, probs_y, lengths, y = data
    for estimator in ("chain", "stratified"):
        seen = []
        est = MaskedELBO(estimator=estimator, num_masks=8, token_plate="tones").estimate(
            hmm_model_1, None, y, lengths, (init, trans, probs_y), BATCH, seen
        )
        assert all(torch.equal(s, seen[0]) for s in seen)
        exact = _subsample_exact(seen[0], data)
        if estimator == "chain":
            assert_close(est.total, exact, atol=1e-9)
        else:
            assert abs(float(est.total) - float(exact)) < 4 * est.stderr
    seen = []
    curve = mpt_curve(
        hmm_model_1,
        y,
        lengths,
        (init, trans, probs_y),
        BATCH,
        seen,
        exhaustive=False,
        num_masks=8,
        token_plate="tones",
    )
    exact = _subsample_exact(seen[0], data)
    assert abs(curve.area - float(exact)) < 4 * curve.area_stderr


def test_guide_takes_the_model_subsample():
    """Importance with a guide that has the same subsampled plate: the guide's indices are
    the model's (replayed), and the estimate is the scaled subsample value (closed form
    x_n ~ N(0, I + 1 1^T), within 4 standard errors)."""
    D, FULL, B = 3, 40, 8
    x = torch.randn(FULL, D, generator=torch.Generator().manual_seed(4)) + 1.0

    def model(x, seen):
        with pyro.plate("data", FULL, subsample_size=B) as idx:
            seen.append(("model", idx))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x[idx])

    def guide(x, seen):
        with pyro.plate("data", FULL, subsample_size=B) as idx:
            seen.append(("guide", idx))
            pyro.sample("z", dist.Normal(x[idx].mean(-1) * D / (D + 1), 0.6))

    seen = []
    ref = log_marginal_likelihood(model, x, seen, guide=guide, num_samples=2000)
    indices = [i for _, i in seen]
    assert {w for w, _ in seen} == {"model", "guide"}
    assert all(torch.equal(i, indices[0]) for i in indices)
    cov = torch.eye(D) + torch.ones(D, D)
    exact = FULL / B * dist.MultivariateNormal(torch.zeros(D), cov).log_prob(x[indices[0]]).sum()
    assert abs(float(ref.total) - float(exact)) < 4 * ref.stderr + 1e-6
