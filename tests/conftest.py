import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_float64():
    """Every test starts from a clear param store, seed 0 and float64."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


def assert_close(actual, expected, *, atol, rtol=0.0, msg=""):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with the tolerance
    written at each call."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def requires_cuda(test):
    """Marks a test ``gpu`` and skips it without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return pytest.mark.gpu(skip(test))


def random_hmm_params(C, V, seed=0):
    """Random HMM parameters ``(init (C,), trans (C, C), emit (C, V))``, every row a
    distribution bounded away from 0."""
    g = torch.Generator().manual_seed(seed)
    init = torch.rand(C, generator=g) + 0.1
    trans = torch.rand(C, C, generator=g) + 0.1
    emit = torch.rand(C, V, generator=g) + 0.1
    return init / init.sum(), trans / trans.sum(-1, keepdim=True), emit / emit.sum(-1, keepdim=True)


def sample_hmm_data(N, T, C, V, seed=0):
    """``(X, init, trans, emit)``: ``N`` sequences of ``T`` tokens from a random HMM."""
    from pyro_mpt.models import sample_hmm

    init, trans, emit = random_hmm_params(C, V, seed)
    X = sample_hmm(N, T, init, trans, emit, generator=torch.Generator().manual_seed(seed + 1))
    return X, init, trans, emit


@pytest.fixture
def ppca_data():
    """``(X, truth)``: the PPCA data of the report tests (tests/report_cases.py)."""
    from tests import report_cases

    return report_cases.ppca_data()


@pytest.fixture
def ppca_report(ppca_data):
    """``(report, X, truth)``: one evaluated report on :func:`ppca_data`, shared by the
    evaluator, report, export and plotting tests."""
    from tests import report_cases

    X, truth = ppca_data
    return report_cases.ppca_report(X, truth), X, truth
