r"""``MaskedELBO`` as a Pyro objective: it is a real :class:`pyro.infer.ELBO` (SVI, empty or
``None`` guides, ``evaluate_loss``, the ``nn.Module`` form), its three loss methods agree,
its gradient is the exact LML's gradient where the estimator is exact (``"chain"`` /
``"exhaustive"`` with exact conditionals), and its keywords (``num_samples``, the deprecated
``num_particles``). Its values on Trace_ELBO's scale: ``test_masked_elbo_values.py``."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import ELBO, SVI
from pyro.nn import PyroModule, PyroParam
from pyro.optim import Adam

from pyro_mpt import MaskedELBO
from pyro_mpt.models import (
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_ppca,
)
from tests.conftest import assert_close, requires_cuda

N, T, K = 40, 6, 2


def _data(device=None):
    g = torch.Generator().manual_seed(0)
    X, truth = sample_ppca(N, T, K, 0.447, generator=g)
    if device is not None:
        X = X.to(device)
        truth = {k: v.to(device) for k, v in truth.items()}
    return X, truth


def _model(X):
    """Collapsed PPCA with learnable ``W``, ``loc``, ``noise_scale``."""
    ppca_collapsed(X, K)


def empty_guide(*args, **kwargs):
    pass


def _params():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in ("W", "loc", "noise_scale")}


def _exact_lml(X):
    p = {name: pyro.param(name) for name in ("W", "loc", "noise_scale")}
    return ppca_log_marginal(X, p["W"], p["loc"], p["noise_scale"])


# ----------------------------------------------------------------------------------------
# A real pyro.infer.ELBO
# ----------------------------------------------------------------------------------------


def test_is_an_elbo():
    assert isinstance(MaskedELBO(), ELBO)


@pytest.mark.parametrize("guide", [None, empty_guide], ids=["guide=None", "empty-guide"])
def test_svi_steps_without_warnings(guide):
    X, _ = _data()
    svi = SVI(_model, guide, Adam({"lr": 0.05}), loss=MaskedELBO(estimator="stratified"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(X) for _ in range(5)]
        after_step = _params()
        evaluated = svi.evaluate_loss(X)
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses)
    assert math.isfinite(evaluated)
    # SVI found the model's params through the loss and updated them.
    assert set(pyro.get_param_store().keys()) == {"W", "loc", "noise_scale"}
    assert not torch.equal(after_step["W"], torch.zeros_like(after_step["W"]))


def test_svi_with_latent_model_and_empty_guide_has_no_guide_warnings():
    """A model with a local latent ``z`` and a guide that samples nothing: Trace_ELBO-style
    "site in model but not in guide" checks must not fire, the backend integrates ``z``."""
    X, _ = _data()
    model = lambda X: ppca_latent(X, K)  # noqa: E731
    elbo = MaskedELBO(estimator="stratified", conditionals="importance", num_samples=32)
    svi = SVI(model, empty_guide, Adam({"lr": 0.05}), loss=elbo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        W0 = None
        for _ in range(3):
            loss = svi.step(X)
            if W0 is None:
                W0 = pyro.param("W").detach().clone()
        svi.evaluate_loss(X)
    assert caught == [], [str(w.message) for w in caught]
    assert math.isfinite(loss)
    assert not torch.equal(W0, pyro.param("W").detach())


def test_evaluate_loss_does_not_change_params():
    X, _ = _data()
    svi = SVI(_model, None, Adam({"lr": 0.05}), loss=MaskedELBO())
    svi.step(X)  # creates and updates the params
    before = _params()
    for name in before:
        pyro.get_param_store().get_param(name).unconstrained().grad = None
    loss = svi.evaluate_loss(X)
    after = _params()
    assert math.isfinite(loss)
    for name in before:
        assert torch.equal(before[name], after[name]), name
        assert pyro.get_param_store().get_param(name).unconstrained().grad is None, name


def test_svi_step_decreases_loss_in_expectation():
    """With the zero-variance chain estimator the loss is the exact -LML, so a few Adam
    steps from the initialisation must lower it."""
    X, _ = _data()
    svi = SVI(_model, None, Adam({"lr": 0.05}), loss=MaskedELBO(estimator="chain"))
    first = svi.step(X)
    for _ in range(20):
        last = svi.step(X)
    assert last < first - 10.0, (first, last)
    assert_close(svi.evaluate_loss(X), -_exact_lml(X).item(), atol=1e-8)


# ----------------------------------------------------------------------------------------
# loss, differentiable_loss and loss_and_grads agree
# ----------------------------------------------------------------------------------------


def test_loss_methods_agree_chain_exact():
    """estimator="chain" with exact Gaussian conditionals is deterministic: every method
    returns -log p(X), whatever the seed."""
    X, _ = _data()
    elbo = MaskedELBO(estimator="chain")
    a = elbo.loss(_model, None, X)
    pyro.set_rng_seed(123)
    b = elbo.differentiable_loss(_model, None, X)
    pyro.set_rng_seed(456)
    c = elbo.loss_and_grads(_model, None, X)
    exact = -_exact_lml(X).item()
    assert isinstance(a, float) and isinstance(c, float)
    assert torch.is_tensor(b) and b.requires_grad and b.dim() == 0
    assert_close(a, exact, atol=1e-8)
    assert_close(b.item(), exact, atol=1e-8)
    assert_close(c, exact, atol=1e-8)


@pytest.mark.parametrize("estimator", ["stratified", "uniform", "fixed"])
def test_loss_methods_agree_when_reseeded(estimator):
    X, _ = _data()
    elbo = MaskedELBO(estimator=estimator, mask_rate=0.5)
    _model(X)  # create the params so that every call draws the same random numbers
    values = []
    for method in (elbo.loss, elbo.differentiable_loss, elbo.loss_and_grads):
        pyro.set_rng_seed(7)
        value = method(_model, None, X)
        values.append(value.item() if torch.is_tensor(value) else value)
    assert_close(values[1], values[0], atol=1e-10)
    assert_close(values[2], values[0], atol=1e-10)
    # A different seed draws other masks: the estimate moves (it is random).
    pyro.set_rng_seed(8)
    assert abs(elbo.loss(_model, None, X) - values[0]) > 1e-6


def test_loss_has_no_grad_and_loss_and_grads_fills_grads():
    X, _ = _data()
    elbo = MaskedELBO(estimator="chain")
    _model(X)
    leaves = {n: pyro.get_param_store().get_param(n).unconstrained() for n in ("W", "loc")}
    elbo.loss(_model, None, X)
    assert all(leaf.grad is None for leaf in leaves.values())
    loss = elbo.differentiable_loss(_model, None, X)
    assert loss.requires_grad
    assert all(leaf.grad is None for leaf in leaves.values())
    elbo.loss_and_grads(_model, None, X)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------
# The nn.Module form: MaskedELBO(...)(model, guide)
# ----------------------------------------------------------------------------------------


class PPCAModule(PyroModule):
    """Collapsed PPCA as a PyroModule with PyroParams."""

    def __init__(self, T, K):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = PyroParam(0.1 * torch.randn(T, K, generator=g))
        self.loc = PyroParam(torch.zeros(T))
        self.noise_scale = PyroParam(torch.ones(()), constraint=dist.constraints.positive)

    def forward(self, X):
        n, t = X.shape
        with pyro.plate("data", n):
            pyro.sample(
                "x",
                dist.LowRankMultivariateNormal(self.loc, self.W, (self.noise_scale**2).expand(t)),
                obs=X,
            )


@pytest.fixture
def module_local_params():
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)
    try:
        yield
    finally:
        pyro.settings.set(module_local_params=old)


def test_module_form_forward_and_backward(module_local_params):
    X, _ = _data()
    model = PPCAModule(T, K)
    loss_fn = MaskedELBO(estimator="chain")(model, empty_guide)
    assert isinstance(loss_fn, torch.nn.Module)
    names = {n for n, _ in loss_fn.named_parameters()}
    assert names == {
        "model.W_unconstrained",
        "model.loc_unconstrained",
        "model.noise_scale_unconstrained",
    }
    loss = loss_fn(X)
    assert torch.is_tensor(loss) and loss.requires_grad
    exact = ppca_log_marginal(X, model.W, model.loc, model.noise_scale)
    assert_close(loss.item(), -exact.item(), atol=1e-8)
    loss.backward()
    # The exact gradient, by autograd of the closed form.
    params = dict(loss_fn.named_parameters())
    W_leaf = params["model.W_unconstrained"]
    expected = torch.autograd.grad(
        -ppca_log_marginal(X, model.W, model.loc, model.noise_scale), W_leaf
    )[0]
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert_close(W_leaf.grad, expected, atol=1e-8)
    # module-local params: nothing leaked into the global param store
    assert len(pyro.get_param_store()) == 0


def test_module_form_trains_with_torch_optimizer(module_local_params):
    X, _ = _data()
    model = PPCAModule(T, K)
    loss_fn = MaskedELBO(estimator="stratified")(model, empty_guide)
    loss_fn(X)  # data-dependent initialisation, as Pyro's docs recommend
    optim = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    start = -ppca_log_marginal(X, model.W, model.loc, model.noise_scale).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            optim.zero_grad()
            loss = loss_fn(X)
            loss.backward()
            optim.step()
    end = -ppca_log_marginal(X, model.W, model.loc, model.noise_scale).item()
    assert end < start - 10.0, (start, end)


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["chain", "exhaustive"])
def test_gradient_matches_exact_lml_gradient(estimator):
    X, _ = _data()
    _model(X)
    store = pyro.get_param_store()
    leaves = [store.get_param(n).unconstrained() for n in ("W", "loc", "noise_scale")]
    loss = MaskedELBO(estimator=estimator).differentiable_loss(_model, None, X)
    assert loss.requires_grad
    got = torch.autograd.grad(loss, leaves)
    expected = torch.autograd.grad(-_exact_lml(X), leaves)
    assert_close(loss.item(), -_exact_lml(X).item(), atol=1e-8)
    for name, g, e in zip(("W", "loc", "noise_scale"), got, expected):
        assert_close(g, e, atol=1e-8, msg=name)


def test_stratified_gradient_is_unbiased():
    """The stratified gradient averages to the exact gradient over independent draws."""
    X, t = _data()
    W = t["W"].clone().requires_grad_()

    def model(X):
        ppca_collapsed(X, K, W, t["loc"], t["noise_scale"])

    expected = torch.autograd.grad(-ppca_log_marginal(X, W, t["loc"], t["noise_scale"]), W)[0]
    grads = []
    for _ in range(50):
        loss = MaskedELBO(estimator="stratified", num_masks=4).differentiable_loss(model, None, X)
        grads.append(torch.autograd.grad(loss, W)[0])
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    z = ((mean - expected) / se).abs()
    assert z.max() < 4.5, z


# ----------------------------------------------------------------------------------------
# repr, estimate, stderr
# ----------------------------------------------------------------------------------------


def test_repr():
    text = repr(MaskedELBO(estimator="fixed", mask_rate=0.3, num_masks=3, token_plate="data"))
    assert text.startswith("MaskedELBO(")
    assert "'fixed'" in text and "num_masks=3" in text and "'data'" in text
    assert "stratified" in repr(MaskedELBO())


def test_estimate_stderr():
    X, _ = _data()
    one = MaskedELBO(estimator="stratified").estimate(_model, None, X)
    assert math.isnan(one.stderr)
    assert one.draws.shape == (1, N) and one.per_sequence.shape == (N,)
    assert one.estimator == "stratified" and one.conditionals == "gaussian" and one.unbiased
    two = MaskedELBO(estimator="stratified", num_masks=2).estimate(_model, None, X)
    assert two.draws.shape == (2, N)
    assert math.isfinite(two.stderr) and two.stderr > 0
    assert_close(two.total, two.draws.mean(0).sum(), atol=1e-10)
    # exact conditionals + chain: zero variance
    chain = MaskedELBO(estimator="chain", num_masks=3).estimate(_model, None, X)
    assert chain.stderr < 1e-8
    fixed = MaskedELBO(estimator="fixed").estimate(_model, None, X)
    assert fixed.unbiased is False


# ----------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------


@requires_cuda
def test_cuda_data_gives_cuda_loss_and_grads():
    X, t = _data("cuda")
    elbo = MaskedELBO(estimator="chain")
    loss = elbo.differentiable_loss(_model, None, X)
    assert loss.device.type == "cuda"
    W_leaf = pyro.get_param_store().get_param("W").unconstrained()
    assert W_leaf.device.type == "cuda"
    loss.backward()
    assert W_leaf.grad.device.type == "cuda"
    p = {n: pyro.param(n).detach().cpu() for n in ("W", "loc", "noise_scale")}
    exact = ppca_log_marginal(X.cpu(), p["W"], p["loc"], p["noise_scale"])
    assert_close(loss.item(), -exact.item(), atol=1e-8)
    # and through SVI
    svi = SVI(_model, None, Adam({"lr": 0.05}), loss=MaskedELBO())
    assert math.isfinite(svi.step(X))
    assert pyro.param("W").device.type == "cuda"


def test_num_particles_is_a_deprecated_alias_of_num_samples():
    X, t = _data()
    args = (X[:4], K, t["W"], t["loc"], t["noise_scale"])
    pyro.set_rng_seed(3)
    new = MaskedELBO(estimator="chain", num_samples=16).loss(ppca_latent, None, *args)
    with pytest.warns(DeprecationWarning, match="MaskedELBO: num_particles= is deprecated"):
        elbo = MaskedELBO(estimator="chain", num_particles=16)
    assert elbo.options.num_samples == 16
    pyro.set_rng_seed(3)
    assert elbo.loss(ppca_latent, None, *args) == new
    with pytest.raises(TypeError, match="pass num_samples= only"):
        MaskedELBO(num_particles=16, num_samples=32)


def test_pyro_num_particles_is_the_number_of_masks():
    """Pyro's ``num_particles`` (independent estimates averaged) is ``num_masks``; the
    importance prior draws are ``num_samples``."""
    elbo = MaskedELBO(num_masks=5, num_samples=64)
    assert elbo.num_particles == 5 and elbo.options.num_samples == 64
    assert MaskedELBO().num_particles == 1
