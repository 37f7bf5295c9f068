"""CUDA in, CUDA throughout: every backend scores CUDA data on the GPU and agrees with the
same computation on the CPU.

Each check below is a function of the device under test. It builds its inputs on the CPU
from fixed seeds, moves them to the device, and compares what it gets there with the same
computation on the CPU (:func:`compare_on_devices`). Masks are drawn on the CPU from a
seeded generator and moved to the device (:class:`MasksFromCPU`), so both runs score the
same masks; the chunking budget ``max_elements`` is fixed, because its default differs by
device. Where a random stream cannot be shared (importance particles are drawn on the
device), the check compares both devices with the exact value instead.

The GPU tests run every check with ``device="cuda"`` (skipped without CUDA). The same checks
also run with ``device="cpu"`` (CPU against CPU) in the ordinary suite, so that their inputs,
shapes and comparison logic are tested on any machine; :func:`compare_on_devices` itself is
tested to fail on a mismatch and on a result left on the wrong device.
"""

from functools import partial

import pyro
import pytest
import torch

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve
from pyro_mpt.estimators import MaskBatch, MaskEstimator, get_estimator
from pyro_mpt.models import (
    bernoulli_latent_linear,
    gaussian_mixture,
    gaussian_mixture_log_marginal,
    hmm,
    hmm_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_hmm,
    sample_ppca,
)
from tests.conftest import assert_close, requires_cuda

#: A fixed chunking budget: the default one differs between the CPU and CUDA.
MAX_ELEMENTS = 2**22

#: Relative tolerance of a CUDA result against the CPU's, per dtype: the two differ by the
#: rounding of different kernels (and summation orders) only.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def to_device(tree, device):
    """``tree`` (tensors in dicts, lists and tuples) with every tensor moved to ``device``."""
    if torch.is_tensor(tree):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def compare_on_devices(compute, device, *, rtol, atol=None, reference_device="cpu"):
    """Runs ``compute(device)`` and ``compute(reference_device)``, each a dict name -> tensor,
    and asserts that every tensor of the first lives on ``device`` and agrees with the second:
    :math:`|a - b| \\le \\mathrm{atol} + \\mathrm{rtol}\\,|b|` elementwise (in float64 on the
    CPU), with ``atol`` (default ``rtol * max|b|``, a tolerance relative to the output's
    scale, for entries near 0 such as gradients). Returns ``(result, reference)``."""
    device, reference_device = torch.device(device), torch.device(reference_device)
    got = compute(device)
    want = compute(reference_device)
    assert got.keys() == want.keys()
    for name, b in want.items():
        a = got[name]
        assert a.device.type == device.type, f"{name} is on {a.device}, expected {device}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        b = b.detach().cpu().double()
        tol = rtol * float(b.abs().max()) if atol is None else atol
        assert_close(
            a.detach().cpu(),
            b,
            atol=tol,
            rtol=rtol,
            msg=f"{name}: {device} differs from {reference_device}",
        )
    return got, want


class MasksFromCPU(MaskEstimator):
    """``name``'s masks drawn on the CPU from a generator seeded with ``seed`` at every call,
    then moved to the device the engine asks for: the same masks on every device."""

    def __init__(self, name, seed=0, mask_rate=0.15):
        self.inner = get_estimator(name, mask_rate)
        self.name, self.unbiased, self.seed = self.inner.name, self.inner.unbiased, seed

    def rows_per_draw(self, T):
        return self.inner.rows_per_draw(T)

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        g = torch.Generator().manual_seed(self.seed)
        cpu = self.inner.batches(
            N, T, num_draws, device="cpu", dtype=dtype, max_rows=max_rows, generator=g
        )
        for b in cpu:
            fields = (b.observed, b.scored, b.weight, b.size, b.draw)
            yield MaskBatch(*(t.to(device) for t in fields))


#: The PPCA models with K = 2, their parameters given by keyword.
PPCA_COLLAPSED = partial(ppca_collapsed, latent_dim=2)
PPCA_LATENT = partial(ppca_latent, latent_dim=2)


def _ppca(dtype=torch.float64):
    """``(X (6, 5), {"W", "loc", "noise_scale"})`` on the CPU, seed 0."""
    X, truth = sample_ppca(6, 5, 2, 0.5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return X, truth


def _exact_ppca(X, truth):
    """The exact LML of PPCA on the CPU and its gradient in ``W``."""
    W = truth["W"].clone().requires_grad_()
    lml = ppca_log_marginal(X, W, truth["loc"], truth["noise_scale"])
    lml.backward()
    return lml.detach(), W.grad


def _estimate_with_grad(elbo, model, X, params, grad_name):
    """``{"total", "per_sequence", "grad_<name>"}`` of ``elbo.estimate`` with ``params``
    (on the data's device), the gradient of the total in ``params[grad_name]``."""
    params = dict(params)
    params[grad_name] = params[grad_name].clone().requires_grad_()
    est = elbo.estimate(lambda X: model(X, **params), None, X)
    est.total.backward()
    return {
        "total": est.total.detach(),
        "per_sequence": est.per_sequence.detach(),
        f"grad_{grad_name}": params[grad_name].grad,
    }


def _hmm_data():
    g = torch.Generator().manual_seed(0)
    init = torch.tensor([0.5, 0.3, 0.2])
    trans = torch.softmax(torch.randn(3, 3, generator=g), -1)
    emit = torch.softmax(torch.randn(3, 4, generator=g), -1)
    X = sample_hmm(3, 6, init, trans, emit, generator=g)
    return X, {"initial": init, "transition": trans, "emission": emit}


def _mixture_data():
    g = torch.Generator().manual_seed(0)
    X, _ = _ppca()
    params = {
        "weights": torch.softmax(torch.randn(3, generator=g), -1),
        "locs": torch.randn(3, 5, generator=g),
        "scale": torch.tensor(0.8),
    }
    return X, params


# ----------------------------------------------------------------------------------------
# Checks: each compares a computation on ``device`` with the CPU
# ----------------------------------------------------------------------------------------


def check_lowrank_gaussian(device, estimator):
    X, truth = _ppca()

    def compute(dev):
        elbo = MaskedELBO(estimator=MasksFromCPU(estimator), num_masks=3, max_elements=MAX_ELEMENTS)
        return _estimate_with_grad(elbo, PPCA_COLLAPSED, X.to(dev), to_device(truth, dev), "W")

    got, _ = compare_on_devices(compute, device, rtol=1e-10)
    if estimator in ("chain", "exhaustive"):  # exact conditionals: the exact LML and gradient
        lml, grad = _exact_ppca(X, truth)
        assert_close(got["total"].cpu(), lml, atol=1e-8)
        assert_close(got["grad_W"].cpu(), grad, atol=1e-8)


def check_shared_masks(device):
    X, truth = _ppca()

    def compute(dev):
        out = {}
        for name in ("stratified", "chain"):
            elbo = MaskedELBO(
                estimator=MasksFromCPU(name),
                num_masks=2,
                share_masks=True,
                max_elements=MAX_ELEMENTS,
            )
            est = elbo.estimate(
                lambda X: ppca_collapsed(X, 2, **to_device(truth, dev)), None, X.to(dev)
            )
            out[name] = est.per_sequence
        return out

    got, _ = compare_on_devices(compute, device, rtol=1e-10)
    lml, _ = _exact_ppca(X, truth)
    assert_close(got["chain"].sum().cpu(), lml, atol=1e-8)


def check_dense_gaussian_exhaustive(device):
    X, truth = _ppca()
    cov = truth["W"] @ truth["W"].T + 0.25 * torch.eye(5)

    def compute(dev):
        curve = mpt_curve(
            lambda X: multivariate_normal(X, truth["loc"].to(dev), cov.to(dev)),
            X.to(dev),
            exhaustive=True,
            max_elements=MAX_ELEMENTS,
        )
        return {"per_sequence": curve.per_sequence, "scores": curve.scores, "area": curve.area}

    got, _ = compare_on_devices(compute, device, rtol=1e-10)
    exact = torch.distributions.MultivariateNormal(truth["loc"], cov).log_prob(X).sum()
    assert_close(got["area"].cpu(), exact, atol=1e-8)


def check_quadrature_ppca(device):
    """Quadrature conditionals are deterministic: with the same masks, the same numbers."""
    X, truth = _ppca()

    def compute(dev):
        elbo = MaskedELBO(
            estimator=MasksFromCPU("stratified"),
            conditionals="quadrature",
            max_elements=MAX_ELEMENTS,
        )
        return _estimate_with_grad(elbo, PPCA_LATENT, X.to(dev), to_device(truth, dev), "W")

    compare_on_devices(compute, device, rtol=1e-9)


#: |estimate - reference| and max |gradient - reference gradient| allowed for importance
#: conditionals (S = 16384 prior draws, the chain estimator, the Bernoulli model of
#: :func:`_bernoulli_data`). Over seeds 0..39 on the CPU the estimate's error had mean
#: -0.0013 and s.d. 0.0122 (largest 0.029); the gradient's largest error was 0.024. The
#: tolerances are about 5 s.d. and 2.5 times the largest gradient error.
IMPORTANCE_TOL, IMPORTANCE_GRAD_TOL = 0.06, 0.06


def _bernoulli_data():
    """``(X (4, 6) of 0/1, {"W" (6, 2), "bias" (6,)})`` on the CPU, seed 0."""
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(4, 6, generator=g) < 0.5).double()
    params = {"W": torch.randn(6, 2, generator=g), "bias": torch.randn(6, generator=g)}
    return X, params


def check_importance(device):
    """Importance particles are drawn on the device (the streams differ), so both devices
    are compared with a deterministic reference instead: the same masks scored by
    quadrature conditionals on a fine grid (40 x 40 points on [-7, 7]^2; 80 points change
    the total by 1e-10) on the CPU."""
    X, params = _bernoulli_data()
    fine = MaskedELBO(
        estimator=MasksFromCPU("chain"),
        conditionals="quadrature",
        quadrature_points=40,
        quadrature_bounds=(-7.0, 7.0),
        max_elements=MAX_ELEMENTS,
    )
    ref = _estimate_with_grad(fine, bernoulli_latent_linear, X, params, "W")
    for dev in (torch.device(device), torch.device("cpu")):
        elbo = MaskedELBO(
            estimator=MasksFromCPU("chain"),
            conditionals="importance",
            num_samples=16384,
            max_elements=MAX_ELEMENTS,
        )
        p = to_device(params, dev)
        out = _estimate_with_grad(elbo, bernoulli_latent_linear, X.to(dev), p, "W")
        assert out["total"].device.type == dev.type and out["grad_W"].device.type == dev.type
        assert_close(out["total"].cpu(), ref["total"], atol=IMPORTANCE_TOL, msg=f"on {dev}")
        assert_close(
            out["grad_W"].cpu(), ref["grad_W"], atol=IMPORTANCE_GRAD_TOL, msg=f"grad on {dev}"
        )


def check_importance_ppca_runs(device):
    """The importance backend on PPCA with few draws (biased: only where the work runs and
    that the gradient is finite are checked; :func:`check_importance` checks its values)."""
    X, truth = _ppca()
    elbo = MaskedELBO(estimator="chain", conditionals="importance", num_samples=64)
    p = to_device(truth, device)
    out = _estimate_with_grad(elbo, PPCA_LATENT, X.to(device), p, "W")
    assert out["total"].device.type == torch.device(device).type
    assert out["grad_W"].device.type == torch.device(device).type
    assert torch.isfinite(out["total"]) and torch.isfinite(out["grad_W"]).all()


def check_bernoulli_quadrature(device):
    X, params = _bernoulli_data()

    def compute(dev):
        elbo = MaskedELBO(
            estimator=MasksFromCPU("stratified"),
            conditionals="quadrature",
            max_elements=MAX_ELEMENTS,
        )
        return _estimate_with_grad(
            elbo, bernoulli_latent_linear, X.to(dev), to_device(params, dev), "W"
        )

    compare_on_devices(compute, device, rtol=1e-9)


def check_enumerated_mixture(device):
    X, params = _mixture_data()

    def compute(dev):
        curve = mpt_curve(
            lambda X: gaussian_mixture(X, 3, **to_device(params, dev)),
            X.to(dev),
            exhaustive=True,
            max_elements=MAX_ELEMENTS,
        )
        return {"per_sequence": curve.per_sequence, "area": curve.area}

    got, _ = compare_on_devices(compute, device, rtol=1e-10)
    exact = gaussian_mixture_log_marginal(X, **params)
    assert_close(got["area"].cpu(), exact, atol=1e-8)


def check_hmm_elimination(device):
    X, params = _hmm_data()

    def compute(dev):
        out = {}
        for name in ("chain", "stratified"):
            elbo = MaskedELBO(estimator=MasksFromCPU(name), max_elements=MAX_ELEMENTS)
            est = elbo.estimate(lambda X: hmm(X, **to_device(params, dev)), None, X.to(dev))
            out[name] = est.per_sequence
        return out

    got, _ = compare_on_devices(compute, device, rtol=1e-10)
    assert_close(got["chain"].sum().cpu(), hmm_log_marginal(X, **params), atol=1e-8)


def check_exact_reference(device, model, dtype):
    """``method="exact"`` (a density, variable elimination, enumeration) on the device."""
    if model == "ppca":
        X, params = _ppca(dtype)
        fn = PPCA_COLLAPSED
    elif model == "hmm":
        X, params = _hmm_data()
        params = {k: v.to(dtype) for k, v in params.items()}
        fn = hmm
    else:
        X, params = _mixture_data()
        X, params = X.to(dtype), {k: v.to(dtype) for k, v in params.items()}
        fn = gaussian_mixture

    def compute(dev):
        p = to_device(params, dev)
        ref = log_marginal_likelihood(
            lambda X: fn(X, **p), X.to(dev), method="exact", max_elements=MAX_ELEMENTS
        )
        return {"per_sequence": ref.per_sequence, "total": ref.total}

    compare_on_devices(compute, device, rtol=RTOL[dtype])


def check_exhaustive_gradients(device, dtype):
    """MaskedELBO gradients with every mask (deterministic) in every parameter."""
    X, truth = _ppca(dtype)

    def compute(dev):
        params = {k: v.to(dev).clone().requires_grad_() for k, v in truth.items()}
        elbo = MaskedELBO(estimator="exhaustive", max_elements=MAX_ELEMENTS)
        est = elbo.estimate(lambda X: ppca_collapsed(X, 2, **params), None, X.to(dev))
        est.total.backward()
        return {"total": est.total.detach(), **{f"grad_{k}": p.grad for k, p in params.items()}}

    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    compare_on_devices(compute, device, rtol=rtol)


#: Every check, by name, with its parameters.
CHECKS = {
    **{
        f"lowrank_gaussian[{e}]": partial(check_lowrank_gaussian, estimator=e)
        for e in ("chain", "stratified", "uniform", "fixed", "exhaustive")
    },
    "shared_masks": check_shared_masks,
    "dense_gaussian_exhaustive": check_dense_gaussian_exhaustive,
    "quadrature_ppca": check_quadrature_ppca,
    "importance": check_importance,
    "importance_ppca_runs": check_importance_ppca_runs,
    "bernoulli_quadrature": check_bernoulli_quadrature,
    "enumerated_mixture": check_enumerated_mixture,
    "hmm_elimination": check_hmm_elimination,
    **{
        f"exact_reference[{m}-{str(d)[6:]}]": partial(check_exact_reference, model=m, dtype=d)
        for m in ("ppca", "hmm", "mixture")
        for d in (torch.float32, torch.float64)
    },
    **{
        f"exhaustive_gradients[{str(d)[6:]}]": partial(check_exhaustive_gradients, dtype=d)
        for d in (torch.float32, torch.float64)
    },
}


@requires_cuda
@pytest.mark.parametrize("name", CHECKS)
def test_cuda_matches_cpu(name):
    CHECKS[name]("cuda")


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
@pytest.mark.parametrize("name", CHECKS)
def test_check_runs_cpu_against_cpu(name):
    """The checks' own logic (inputs, masks, comparisons) with the CPU as the device."""
    CHECKS[name]("cpu")


def test_compare_on_devices_catches_a_mismatch():
    calls = []

    def compute(dev):
        calls.append(dev)
        return {"x": torch.tensor([1.0, 2.0]) * (1 + 1e-6 * len(calls))}

    with pytest.raises(AssertionError, match="x: cpu differs from cpu"):
        compare_on_devices(compute, "cpu", rtol=1e-8)
    calls.clear()
    compare_on_devices(compute, "cpu", rtol=1e-5)  # within the tolerance


def test_compare_on_devices_catches_the_wrong_device():
    with pytest.raises(AssertionError, match="x is on cpu, expected meta"):
        compare_on_devices(lambda dev: {"x": torch.zeros(2)}, "meta", rtol=0.0)


def test_compare_on_devices_checks_names_and_shapes():
    with pytest.raises(AssertionError):
        compare_on_devices(
            lambda dev: {"x" if dev.type == "cpu" else "y": torch.zeros(2)}, "meta", rtol=0.0
        )
    with pytest.raises(AssertionError, match="shape"):
        compare_on_devices(
            lambda dev: {"x": torch.zeros(2 if dev.index is None else 3)}, "cpu:0", rtol=0.0
        )


def test_masks_from_cpu_are_the_seeded_cpu_masks():
    est = MasksFromCPU("stratified", seed=3)
    kwargs = dict(device="cpu", dtype=torch.float64, max_rows=100)
    first = list(est.batches(4, 5, 2, **kwargs))
    again = list(est.batches(4, 5, 2, **kwargs))
    g = torch.Generator().manual_seed(3)
    plain = list(get_estimator("stratified").batches(4, 5, 2, generator=g, **kwargs))
    assert len(first) == len(again) == len(plain) >= 1
    for a, b, c in zip(first, again, plain):
        for field in ("observed", "scored", "weight", "size", "draw"):
            assert torch.equal(getattr(a, field), getattr(b, field))
            assert torch.equal(getattr(a, field), getattr(c, field))
    assert (est.name, est.unbiased, est.rows_per_draw(5)) == ("stratified", True, 5)


def test_masked_elbo_scores_the_masks_from_cpu():
    """MaskedELBO takes its masks from the wrapper, not from torch's global generator: the
    same seed gives the same estimate whatever the global state, another seed another."""
    X, truth = _ppca()

    def total(seed, global_seed):
        pyro.set_rng_seed(global_seed)
        elbo = MaskedELBO(estimator=MasksFromCPU("stratified", seed=seed), num_masks=2)
        return elbo.estimate(lambda X: PPCA_COLLAPSED(X, **truth), None, X).total

    assert torch.equal(total(0, 1), total(0, 2))
    assert not torch.equal(total(0, 1), total(1, 1))
