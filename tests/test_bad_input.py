"""Every bad input is a clear error: bad data and models, and bad option values, through
the five entry points (``MaskedELBO.loss``, ``MaskedELBO.estimate``, ``mpt_curve``,
``log_marginal_likelihood``, ``evaluate``). Each case asserts the error type and a message
fragment naming the argument or site; a failing call leaves its input tensors and the
Pyro param store unchanged. Values (float32 promotion, warnings, trustworthiness) are in
``tests/test_bad_input_values.py``."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, evaluate, log_marginal_likelihood, mpt_curve
from pyro_mpt.models import ppca_collapsed, sample_ppca

N, T, K = 6, 4, 2


def _X():
    X, _ = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(0))
    return X


def _truth():
    _, t = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(0))
    return t


# ----------------------------------------------------------------------------------------
# Entry points: (model, args, kwargs, options) -> result
# ----------------------------------------------------------------------------------------


def _loss(model, args, kwargs, **o):
    return MaskedELBO(**o).loss(model, None, *args, **kwargs)


def _estimate(model, args, kwargs, **o):
    return MaskedELBO(**o).estimate(model, None, *args, **kwargs)


def _curve(model, args, kwargs, **o):
    return mpt_curve(model, *args, **o, **kwargs)


def _lml(model, args, kwargs, **o):
    return log_marginal_likelihood(model, *args, **o, **kwargs)


def _evaluate(model, args, kwargs, **o):
    o = {"num_masks": 2, "curve_masks": None, "progress": False, **o}
    return evaluate(model, *args, **o, **kwargs)


ENTRIES = {
    "loss": _loss,
    "estimate": _estimate,
    "curve": _curve,
    "lml": _lml,
    "evaluate": _evaluate,
}

# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def gauss(x):
    """``N`` rows of ``T`` independent standard normal tokens."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)


def gauss_kw(*, data):
    gauss(data)


def ppca(x):
    """PPCA with learnable parameters (created in the param store on the first trace)."""
    ppca_collapsed(x, K)


def ppca_noise(noise):
    t = _truth()

    def model(x):
        ppca_collapsed(x, K, t["W"], t["loc"], torch.tensor(noise))

    return model


def poisson_enumerated(x):
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Poisson(3.0), infer={"enumerate": "parallel"})
        loc = k.unsqueeze(-1).expand(k.shape + (x.shape[-1],))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def _with(X, i, j, value):
    X = X.clone()
    X[i, j] = value
    return X


# ----------------------------------------------------------------------------------------
# Bad data and models
# ----------------------------------------------------------------------------------------

#: id -> (model, args, kwargs, error, message fragment, entry points excluded (none now))
DATA_CASES = {
    "N=0": (
        gauss,
        lambda: (_X()[:0],),
        {},
        ValueError,
        r"size 0.*no sequences \(N = 0\)",
        set(),
    ),
    "N=0-ppca": (ppca, lambda: (_X()[:0],), {}, ValueError, r"no sequences \(N = 0\)", set()),
    "T=0": (
        gauss,
        lambda: (_X()[:, :0],),
        {},
        ValueError,
        r"\['x'\] hold no tokens \(T = 0",
        set(),
    ),
    "T=0-ppca": (ppca, lambda: (_X()[:, :0],), {}, ValueError, r"hold no tokens \(T = 0", set()),
    "numpy": (
        gauss,
        lambda: (_X().numpy(),),
        {},
        TypeError,
        r"(argument 0 of the model is|observed site 'x' holds) a ndarray.*torch\.as_tensor",
        set(),
    ),
    "list": (
        gauss,
        lambda: (_X().tolist(),),
        {},
        TypeError,
        r"argument 0 .* list.*torch\.as_tensor",
        set(),
    ),
    "numpy-keyword": (
        gauss_kw,
        lambda: (),
        {"data": _X().numpy()},
        TypeError,
        r"(keyword argument data= of the model is|observed site 'x' holds) a ndarray",
        set(),
    ),
    "int64": (
        gauss,
        lambda: (_X().long(),),
        {},
        TypeError,
        r"site 'x'.*continuous support.*int64.*double",
        set(),
    ),
    "int32": (gauss, lambda: (_X().int(),), {}, TypeError, r"site 'x'.*torch\.int32", set()),
    "bool": (gauss, lambda: (_X() > 0,), {}, TypeError, r"site 'x'.*torch\.bool.*double", set()),
    "float16": (
        gauss,
        lambda: (_X().half(),),
        {},
        TypeError,
        r"site 'x'.*float16 is too coarse",
        set(),
    ),
    "bfloat16": (
        gauss,
        lambda: (_X().bfloat16(),),
        {},
        TypeError,
        r"site 'x'.*bfloat16 is too coarse",
        set(),
    ),
    "complex": (
        gauss,
        lambda: (_X().to(torch.complex128),),
        {},
        TypeError,
        r"site 'x' holds complex",
        set(),
    ),
    "int64-lowrank": (
        ppca,
        lambda: (_X().long(),),
        {},
        TypeError,
        r"argument 0 .* torch\.int64 tensor.*float32 or float64",
        set(),
    ),
    "poisson-enumerated": (
        poisson_enumerated,
        lambda: (_X(),),
        {},
        ValueError,
        r"latent site 'k' .*enumerate.*Poisson has no finite support",
        set(),
    ),
    "nan-noise": (
        ppca_noise(float("nan")),
        lambda: (_X(),),
        {},
        ValueError,
        r"LowRankMultivariateNormal at site 'x' .*not positive definite: cov_diag",
        set(),
    ),
    "zero-noise": (
        ppca_noise(0.0),
        lambda: (_X(),),
        {},
        ValueError,
        r"at site 'x' .*not positive definite: cov_diag has 4",
        set(),
    ),
    "nan-data": (
        gauss,
        lambda: (_with(_X(), 1, 2, float("nan")),),
        {},
        ValueError,
        r"site 'x' holds 1 NaN",
        set(),
    ),
    "inf-data": (
        gauss,
        lambda: (_with(_X(), 0, 0, float("inf")),),
        {},
        ValueError,
        r"site 'x' holds 1 NaN or inf",
        set(),
    ),
}

DATA_PARAMS = [
    pytest.param(case, entry, id=f"{case}-{entry}")
    for case, spec in DATA_CASES.items()
    for entry in ENTRIES
    if entry not in spec[5]
]


def _snapshot(args, kwargs):
    tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
    store = pyro.get_param_store()
    params = {name: store[name].detach().clone() for name in store.keys()}
    return [(t, t.clone()) for t in tensors], params


def _assert_unchanged(snapshot, *, params_too=True):
    tensors, params = snapshot
    for t, before in tensors:
        torch.testing.assert_close(t, before, rtol=0, atol=0, equal_nan=True)
    if not params_too:
        return
    store = pyro.get_param_store()
    assert sorted(store.keys()) == sorted(params)
    for name, before in params.items():
        assert torch.equal(store[name].detach(), before), name


@pytest.mark.parametrize("case, entry", DATA_PARAMS)
def test_bad_data_is_a_clear_error(case, entry):
    model, make_args, kwargs, error, match, _ = DATA_CASES[case]
    with pytest.raises(error, match=match):
        ENTRIES[entry](model, make_args(), kwargs)


@pytest.mark.parametrize("case, entry", DATA_PARAMS)
def test_failing_call_leaves_inputs_and_param_store_unchanged(case, entry):
    """A parameter created before the call is kept as it was; parameters the failing call's
    trace created (PPCA's W, loc, noise_scale) are removed; inputs are not modified."""
    model, make_args, kwargs, error, match, _ = DATA_CASES[case]
    pyro.param("unrelated", torch.tensor([1.0, 2.0]))
    args = make_args()
    snapshot = _snapshot(args, kwargs)
    with pytest.raises(error, match=match):
        ENTRIES[entry](model, args, kwargs)
    _assert_unchanged(snapshot)


# ----------------------------------------------------------------------------------------
# Bad option values
# ----------------------------------------------------------------------------------------

_INT = r"must be an integer >= 1"

#: (entry points, option, value, error, message fragment)
OPTION_CASES = [
    (("loss", "estimate", "curve"), "num_masks", 0, ValueError, f"num_masks {_INT}, got 0"),
    (("loss", "estimate", "curve"), "num_masks", -3, ValueError, f"num_masks {_INT}, got -3"),
    (("loss", "estimate", "curve"), "num_masks", 2.5, ValueError, f"num_masks {_INT}, got 2.5"),
    (("loss", "estimate", "curve"), "num_masks", True, ValueError, f"num_masks {_INT}, got True"),
    (("loss", "estimate", "curve"), "num_masks", "4", ValueError, f"num_masks {_INT}, got '4'"),
    (("loss", "estimate"), "num_masks", 10**9, ValueError, r"num_masks=1000000000 needs 6e\+09 "),
    (("loss", "estimate", "curve", "lml"), "num_samples", 0, ValueError, f"num_samples {_INT}"),
    (("loss", "estimate", "curve", "lml"), "max_elements", 0, ValueError, "max_elements must"),
    (("loss", "estimate", "curve"), "share_masks", "no", TypeError, "share_masks must be True"),
    (("loss", "estimate", "curve"), "conditionals", "exact", ValueError, "unknown conditionals"),
    (("loss", "estimate", "lml"), "quadrature_bounds", (1.0, 0.0), ValueError, "quadrature_bounds"),
    (
        ("loss", "estimate", "lml"),
        "quadrature_bounds",
        3,
        ValueError,
        "quadrature_bounds must be two",
    ),
    (
        ("loss", "estimate", "lml"),
        "quadrature_bounds",
        (float("nan"), 1),
        ValueError,
        "finite numbers",
    ),
    (
        ("loss", "estimate", "lml"),
        "max_plate_nesting",
        -1,
        ValueError,
        "max_plate_nesting must be >= 0",
    ),
    (
        ("loss", "estimate", "lml"),
        "max_plate_nesting",
        1.5,
        TypeError,
        "max_plate_nesting must be an",
    ),
    (
        ("loss", "estimate", "curve", "lml"),
        "token_plate",
        3,
        TypeError,
        "token_plate must be a plate",
    ),
    (
        ("loss", "estimate", "curve", "lml", "evaluate"),
        "token_plate",
        "nope",
        ValueError,
        "token_plate 'nope' not found",
    ),
    (("loss", "estimate"), "estimator", "foo", ValueError, "unknown estimator 'foo'"),
    (("loss", "estimate"), "mask_rate", 1.5, ValueError, r"mask_rate must lie in \(0, 1\]"),
    (("loss", "estimate", "lml"), "quadrature_points", 0, ValueError, f"quadrature_points {_INT}"),
    (("curve",), "exhaustive", "yes", TypeError, "exhaustive must be True or False"),
    (("lml",), "method", "foo", ValueError, "unknown method 'foo'"),
    (("lml",), "chunk_size", 0, ValueError, "chunk_size must be an integer >= 1 or None"),
    (("lml", "evaluate"), "progress", "yes", TypeError, "progress must be True, False or None"),
    (("lml", "evaluate"), "guide", 3, TypeError, "guide must be a callable"),
    (("lml",), "compile", "foo", ValueError, "unknown compile='foo'"),
    (("evaluate",), "num_masks", 0, ValueError, f"num_masks {_INT}"),
    (("evaluate",), "estimators", ("foo",), ValueError, "unknown estimator 'foo'"),
    (("evaluate",), "fixed_rates", (1.5,), ValueError, r"fixed_rates\[0\]"),
    (("evaluate",), "reference", "foo", ValueError, "unknown reference 'foo'"),
    (("evaluate",), "reference_samples", 0, ValueError, f"reference_samples {_INT}"),
    (("evaluate",), "curve_masks", 0, ValueError, "curve_masks must be an integer"),
    (("evaluate",), "mpt_samples", 0, ValueError, f"mpt_samples {_INT}"),
    (("evaluate",), "share_masks", "no", TypeError, "share_masks must be True or False"),
    (
        ("evaluate",),
        "reference_options",
        {"foo": 1},
        TypeError,
        r"reference_options has unknown keys \['foo'\]",
    ),
    (
        ("evaluate",),
        "mpt_options",
        {"bar": 1},
        TypeError,
        r"mpt_options has unknown keys \['bar'\]",
    ),
    (("evaluate",), "reference_options", {"chunk_size": 0}, ValueError, "chunk_size must be"),
    (("evaluate",), "mpt_options", {"max_elements": 0}, ValueError, "max_elements must be"),
]

OPTION_PARAMS = [
    pytest.param(entry, option, value, error, match, id=f"{entry}-{option}={value!r}")
    for entries, option, value, error, match in OPTION_CASES
    for entry in entries
]


@pytest.mark.parametrize("entry, option, value, error, match", OPTION_PARAMS)
def test_bad_option_is_a_clear_error(entry, option, value, error, match):
    X = _X()
    snapshot = _snapshot((X,), {})
    with pytest.raises(error, match=match):
        ENTRIES[entry](ppca, (X,), {}, **{option: value})
    # mpt_curve does not yet remove the parameters of a failing first trace
    _assert_unchanged(snapshot)


def test_there_are_at_least_a_hundred_cases():
    assert len(DATA_PARAMS) + len(OPTION_PARAMS) >= 100
