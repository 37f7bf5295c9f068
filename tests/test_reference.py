"""log_marginal_likelihood's dispatch (pyro_mpt.reference): the method registry, "auto",
option checks before any work, the deprecated names, the progress bar, and the old
pyro_mpt.evaluation module."""

import importlib

import pytest
import torch

from pyro_mpt import reference
from pyro_mpt.models import ppca_latent, ppca_log_marginal
from pyro_mpt.reference import METHODS, LMLEstimate, log_marginal_likelihood, register_method
from pyro_mpt.reference.result import fixed_estimate
from tests.conftest import assert_close
from tests.reference_data import latent_model, per_row_exact, ppca_data


def test_methods_registry():
    assert sorted(METHODS) == [
        "conjugate",
        "exact",
        "gaussian",
        "importance",
        "quadrature",
        "smc",
        "smc_importance",
    ]
    assert METHODS["quadrature"] is reference.quadrature.quadrature_reference


def test_unknown_method_lists_valid_ones():
    X, t = ppca_data()
    with pytest.raises(
        ValueError,
        match=r"unknown method 'mcmc'; valid values are "
        r"\['auto', 'conjugate', 'exact', 'gaussian', 'importance', 'quadrature', 'smc', 'smc_importance'\]",
    ):
        log_marginal_likelihood(latent_model(t), X, method="mcmc")


def test_registered_method_is_dispatched(monkeypatch):
    """A method added with register_method runs on the traced model and the checked
    options; its name joins the valid ones. Here: the closed form of PPCA."""
    monkeypatch.setattr(reference, "METHODS", dict(METHODS))

    def closed_form(problem, options, messages):
        X, t = problem.args[0], problem.kwargs["t"]
        per_seq = per_row_exact(X, t)
        return fixed_estimate(per_seq, problem.layout.scale, "closed", messages, None)

    reference.register_method("closed", closed_form)
    X, t = ppca_data()

    def model(X, t):
        ppca_latent(X, 2, t["W"], t["loc"], t["noise_scale"])

    est = log_marginal_likelihood(model, X, t=t, method="closed")
    assert est.method == "closed"
    assert_close(est.total, ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"]), atol=1e-8)
    with pytest.raises(ValueError, match=r"'closed'\]"):
        log_marginal_likelihood(model, X, t=t, method="mcmc")
    for name in ("auto", "closed"):
        with pytest.raises(ValueError, match=f"method name '{name}' is taken"):
            register_method(name, closed_form)


def test_auto_chooses_exact_without_latents():
    X = torch.randn(5, 3)

    def model(X):
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", X.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=X)

    est = log_marginal_likelihood(model, X)
    assert est.messages[0] == "method='auto' chose 'exact': the model has no latent sites"
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(X).sum()
    assert_close(est.total, expected, atol=1e-12)


BAD_OPTIONS = [
    ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1 or None, got 0"),
    ({"num_samples": 0}, ValueError, "num_samples must be an integer >= 1, got 0"),
    ({"num_samples": 2.5}, ValueError, "num_samples must be an integer >= 1, got 2.5"),
    ({"num_samples": True}, ValueError, "num_samples must be an integer >= 1, got True"),
    ({"max_elements": -1}, ValueError, "max_elements must be an integer >= 1"),
    ({"quadrature_points": 0}, ValueError, "quadrature_points must be an integer >= 1"),
    ({"quadrature_bounds": (1.0, -1.0)}, ValueError, r"quadrature_bounds .* low < high"),
    ({"quadrature_bounds": (0.0, float("inf"))}, ValueError, "quadrature_bounds must be two"),
    ({"compile": "fast"}, ValueError, "unknown compile='fast'"),
    ({"progress": "yes"}, TypeError, "progress must be True, False or None, got 'yes'"),
    ({"method": "mcmc"}, ValueError, "unknown method 'mcmc'"),
    ({"guide": 3}, TypeError, "guide must be a callable"),
    ({"token_plate": 3}, TypeError, "token_plate must be a plate name"),
    ({"max_plate_nesting": -1}, ValueError, "max_plate_nesting must be >= 0"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_OPTIONS)
def test_bad_option_raises_before_the_model_runs(kwargs, error, match):
    """Every option is checked first: the model is never called."""
    X, t = ppca_data()
    calls = []

    def model(X):
        calls.append(1)
        ppca_latent(X, 2, t["W"], t["loc"], t["noise_scale"])

    with pytest.raises(error, match=match):
        log_marginal_likelihood(model, X, **kwargs)
    assert calls == []


def test_good_options_run_the_model():
    """The control of the test above: with good options the model is traced."""
    X, t = ppca_data()
    calls = []

    def model(X):
        calls.append(1)
        ppca_latent(X, 2, t["W"], t["loc"], t["noise_scale"])

    est = log_marginal_likelihood(
        model, X, method="quadrature", quadrature_points=40, quadrature_bounds=(-6, 6)
    )
    assert len(calls) >= 2  # the first trace and the grid's chunk
    assert_close(est.per_sequence, per_row_exact(X, t), atol=1e-4)


def test_num_particles_is_a_deprecated_alias():
    X, t = ppca_data()
    with pytest.warns(DeprecationWarning, match="num_particles= is deprecated.*num_samples="):
        est = log_marginal_likelihood(latent_model(t), X, num_particles=512, method="importance")
    assert est.num_samples == 512 and est.log_weights.shape == (512, 10)
    with pytest.raises(TypeError, match="pass num_samples= only"):
        log_marginal_likelihood(latent_model(t), X, num_particles=512, num_samples=256)


def test_progress_bar_and_str(capsys):
    X, t = ppca_data()
    est = log_marginal_likelihood(
        latent_model(t), X, num_samples=512, chunk_size=128, progress=True, method="importance"
    )
    err = capsys.readouterr().err
    assert "chunk" in err  # tqdm wrote its bar to stderr
    assert str(est).startswith("log p(x) = ") and "importance, S=512" in str(est)
    est = log_marginal_likelihood(latent_model(t), X, num_samples=512, chunk_size=128)
    assert capsys.readouterr().err == ""  # not a terminal: no bar by default


def test_evaluation_module_still_works():
    """pyro_mpt.evaluation re-exports the reference's public names without a warning;
    its other old names resolve with a DeprecationWarning naming their new home."""
    evaluation = importlib.import_module("pyro_mpt.evaluation")
    assert evaluation.log_marginal_likelihood is log_marginal_likelihood
    assert evaluation.LMLEstimate is LMLEstimate and evaluation.METHODS is METHODS
    with pytest.warns(DeprecationWarning, match="pyro_mpt.reference.importance.KEEP_LOG"):
        assert evaluation.KEEP_LOG_WEIGHTS == 2**22
    with pytest.warns(DeprecationWarning, match="resolve_max_elements"):
        assert evaluation.DEFAULT_LML_MAX_ELEMENTS == 2**24
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        evaluation.nothing  # noqa: B018
