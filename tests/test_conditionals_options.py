"""Tests of the backend registry (:func:`~pyro_mpt.conditionals.get_conditionals`,
:func:`~pyro_mpt.conditionals.choose_conditionals`) and of the backends' options: each
backend is built from its own options, every option is checked up front with one error
style, and ``num_particles`` is a deprecated alias of ``num_samples``."""

import numpy as np
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt.conditionals import (
    CONDITIONALS,
    EnumerateConditionals,
    ImportanceConditionals,
    QuadratureConditionals,
    choose_conditionals,
    get_conditionals,
)
from pyro_mpt.models import gaussian_mixture, ppca_collapsed, ppca_latent, sample_ppca
from pyro_mpt.tokens import read_layout


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layouts():
    """Layouts of a model without latents, with a continuous latent, with an enumerated one."""
    N, T, K = 3, 4, 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=_gen(7))
    weights, locs = torch.tensor([0.4, 0.6]), torch.zeros(2, T)
    models = {
        "none": lambda X: ppca_collapsed(X, K, **truth),
        "continuous": lambda X: ppca_latent(X, K, **truth),
        "enumerated": lambda X: gaussian_mixture(X, 2, weights, locs, torch.tensor(1.0)),
    }
    return {k: read_layout(poutine.trace(m).get_trace(X)) for k, m in models.items()}


def test_get_conditionals_builds_each_backend_from_its_options():
    from pyro_mpt.options import DEFAULT_MAX_ELEMENTS

    layout = _layouts()["continuous"]
    imp = get_conditionals("importance", layout, num_samples=7)
    assert (imp.name, imp.num_samples, imp.num_particles) == ("importance", 7, 7)
    quad = get_conditionals("quadrature", layout, quadrature_points=9, quadrature_bounds=(-2, 2))
    assert (quad.num_points, quad.bounds) == (9, (-2.0, 2.0))
    # max_elements=None: the budget of the layout's device (the CPU here)
    assert get_conditionals("enumerate", layout).max_elements == DEFAULT_MAX_ELEMENTS == 2**24
    assert get_conditionals("enumerate", layout, max_elements=5000).max_elements == 5000
    assert EnumerateConditionals().max_elements is None  # resolved when the scorer is built
    assert get_conditionals("gaussian", layout).name == "gaussian"
    assert get_conditionals(quad, layout) is quad
    assert sorted(CONDITIONALS) == [
        "conjugate",
        "enumerate",
        "gaussian",
        "importance",
        "linear_gaussian",
        "mixed",
        "quadrature",
        "smc",
    ]


def test_choose_conditionals_by_latents():
    layouts = _layouts()
    assert choose_conditionals(layouts["none"]).name == "gaussian"
    chosen = choose_conditionals(layouts["enumerated"])
    assert (chosen.name, chosen.max_elements) == ("enumerate", 2**24)
    chosen = get_conditionals("auto", layouts["continuous"], num_samples=11)
    assert (chosen.name, chosen.num_samples) == ("importance", 11)


def test_num_particles_is_a_deprecated_alias_of_num_samples():
    layout = _layouts()["continuous"]
    with pytest.warns(DeprecationWarning, match="num_particles= is deprecated.*num_samples="):
        assert get_conditionals("importance", layout, num_particles=9).num_samples == 9
    with pytest.warns(DeprecationWarning, match="num_particles"):
        assert get_conditionals("auto", layout, num_particles=5).num_samples == 5
    with pytest.warns(DeprecationWarning, match="num_particles"):
        assert choose_conditionals(layout, num_particles=3).num_samples == 3
    with pytest.warns(DeprecationWarning, match="ImportanceConditionals: num_particles"):
        assert ImportanceConditionals(num_particles=4).num_samples == 4
    with pytest.raises(TypeError, match="pass num_samples= only"):
        get_conditionals("importance", layout, num_samples=8, num_particles=9)


def test_registry_refuses_bad_names_and_options():
    layout = _layouts()["continuous"]
    valid = (
        r"\['auto', 'conjugate', 'enumerate', 'gaussian', 'importance', 'linear_gaussian', "
        r"'mixed', "
        r"'quadrature', 'smc'\]"
    )
    with pytest.raises(
        ValueError, match=f"unknown conditionals 'laplace'; valid values are {valid}"
    ):
        get_conditionals("laplace", layout)
    with pytest.raises(ValueError, match="unknown conditionals 3"):
        get_conditionals(3, layout)
    # every option is checked up front, whichever backend uses it
    bad = [
        (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
        (dict(num_samples=2.5), "num_samples must be an integer >= 1, got 2.5"),
        (dict(quadrature_points=True), "quadrature_points must be an integer >= 1, got True"),
        (dict(max_elements=-1), "max_elements must be an integer >= 1 or None, got -1"),
        (dict(quadrature_bounds=(1.0, -1.0)), r"quadrature_bounds must be .* low < high"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            get_conditionals("gaussian", layout, **options)


@pytest.mark.parametrize(
    "bounds", [(1.0, -1.0), (0.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0), (1.0,), None]
)
def test_quadrature_bounds_are_finite_and_ordered(bounds):
    with pytest.raises(
        ValueError, match=r"bounds must be a pair \(low, high\) of finite low < high"
    ):
        QuadratureConditionals(bounds=bounds)


def test_quadrature_points_and_samples_are_positive_ints():
    with pytest.raises(ValueError, match="num_points must be an integer >= 1, got 0"):
        QuadratureConditionals(num_points=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got -3"):
        ImportanceConditionals(-3)
    with pytest.raises(ValueError, match="max_elements must be an integer >= 1 or None"):
        EnumerateConditionals(0)
    assert QuadratureConditionals(num_points=np.int64(7)).num_points == 7
