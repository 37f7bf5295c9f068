r"""Experiment 4 of the paper: a Bernoulli latent linear model (logistic link, :math:`K = 2`)
on binarised images, trained by masked pre-training with quadrature conditionals, against a
linear VAE (the same decoder family, a linear Gaussian encoder) trained by its ELBO. Both are
scored by the log marginal likelihood on a 20 x 20 grid over :math:`[-5, 5]^2`, in nats per
image.

The published script scored masked pixels under the prior, not given the visible pixels, at a
fixed 15% rate; here every masked pixel is scored by its conditional
:math:`\log p(x_j \mid x_O)` (grid quadrature), and the estimator is unbiased for the LML.

Data: the binarised 8 x 8 digits that scikit-learn ships (pixel >= 8 of 16), nothing is
downloaded; without scikit-learn, synthetic images drawn from a Bernoulli latent linear
model; or any ``(N, ...)`` tensor (e.g. MNIST) passed by the user.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Section 4, binary images).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from ..estimators import MaskEstimator
from ..masked_elbo import MaskedELBO
from ..models import bernoulli_latent_linear
from ..plotting import bare_axes
from ..reference import log_marginal_likelihood

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BinaryResult", "binary", "load_digits_binary", "synthetic_binary", "prepare_binary"]


def load_digits_binary(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scikit-learn's 8 x 8 digits (1797 images, values 0..16), binarised at 8: returns a
    ``(1797, 64)`` tensor of zeros and ones.

    :raises ImportError: when scikit-learn is not installed.

    Example::

        X = load_digits_binary()                 # (1797, 64), values 0. / 1.
        res = binary(data=X, steps=200)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the binary experiment's digits come from scikit-learn, which is not installed: "
            "`pip install scikit-learn`, or pass your own binary images as `data=` "
            "(or data='synthetic')"
        ) from None
    images = torch.as_tensor(load_digits().data, dtype=dtype)
    return (images >= 8).to(dtype)


def synthetic_binary(
    num_data: int = 500,
    num_pixels: int = 64,
    latent_dim: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Binary images drawn from :func:`~pyro_mpt.models.bernoulli_latent_linear` with random
    true parameters (``W`` entries :math:`\mathcal N(0, 2^2)`, biases :math:`\mathcal N(0, 1)`).

    :returns: ``(X, truth)``: ``(num_data, num_pixels)`` zeros and ones, and a dict with ``W``
        and ``bias``.

    Example::

        X, truth = synthetic_binary(num_data=200)   # X: (200, 64); truth["W"]: (64, 2)
    """
    gen = torch.Generator().manual_seed(seed)
    W = 2.0 * torch.randn(num_pixels, latent_dim, generator=gen, dtype=dtype)
    bias = torch.randn(num_pixels, generator=gen, dtype=dtype)
    z = torch.randn(num_data, latent_dim, generator=gen, dtype=dtype)
    probs = torch.sigmoid(z @ W.T + bias)
    X = (torch.rand(num_data, num_pixels, generator=gen, dtype=dtype) < probs).to(dtype)
    return X, {"W": W, "bias": bias}


def prepare_binary(
    data: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A user's images as ``(N, pixels)`` zeros and ones: flattens trailing dims; values not
    already binary are thresholded at half their maximum (e.g. MNIST's 0..255 at 127.5).

    :param data: images ``(N, ...)`` (a tensor or array).
    :param dtype: the dtype of the result.
    :returns: ``(N, pixels)`` tensor of zeros and ones.

    Example::

        X = prepare_binary(mnist_images)         # (N, 28, 28), 0..255 -> (N, 784) of 0. / 1.
    """
    X = torch.as_tensor(data).to(dtype)
    if X.dim() < 2:
        raise ValueError(f"data must have shape (N, ...) with pixels, got {tuple(X.shape)}")
    X = X.reshape(X.shape[0], -1)
    if not bool(((X == 0) | (X == 1)).all()):
        X = (X >= 0.5 * X.max()).to(dtype)
    return X


@dataclass
class BinaryResult:
    r"""Numbers of :func:`binary`, in nats per image.

    :ivar float lml_mpt: quadrature :math:`\log p(X)/N` of the MPT-trained model.
    :ivar float lml_vae: the same for the VAE's decoder.
    :ivar torch.Tensor mpt_objective: per step, the MaskedELBO estimate per image of the
        minibatch.
    :ivar torch.Tensor vae_elbo: per step, the ELBO per image of the minibatch.
    :ivar str data_source: ``"digits"``, ``"synthetic"`` or ``"user"``.
    :ivar int N: images.
    :ivar int num_pixels: pixels per image.
    :ivar str estimator: the MaskedELBO estimator used.
    :ivar float lml_truth: for synthetic data, the LML of the true parameters, else None.
    :ivar list messages: warnings raised while scoring (e.g. grid mass cut off).
    :ivar int train_quadrature_points: grid points per axis used during training.

    Example::

        res = binary(data="synthetic", steps=200)
        res.lml_mpt - res.lml_vae, res.mpt_objective.shape    # (steps,)
        res.figure()
    """

    lml_mpt: float
    lml_vae: float
    mpt_objective: torch.Tensor
    vae_elbo: torch.Tensor
    data_source: str
    N: int
    num_pixels: int
    estimator: str
    lml_truth: float | None = None
    messages: list[str] = field(default_factory=list)
    train_quadrature_points: int = 20

    def headline(self) -> str:
        text = (
            f"LML per image (20 x 20 quadrature): MPT-trained {self.lml_mpt:.3f}, "
            f"VAE {self.lml_vae:.3f} ({self.data_source}, N = {self.N})"
        )
        if self.lml_truth is not None:
            text += f"; true parameters {self.lml_truth:.3f}"
        return text

    def figure(self, ax: Axes | None = None, smooth: int = 10) -> Figure:
        """Training traces per image (MPT objective, VAE ELBO; running means over ``smooth``
        steps) with the final quadrature LMLs as horizontal lines. Returns the Figure."""
        fig, ax = bare_axes(ax, figsize=(7.0, 4.5))

        def running(v):
            k = max(1, min(smooth, len(v)))
            c = torch.cat([torch.zeros(1, dtype=v.dtype), v.cumsum(0)])
            return ((c[k:] - c[:-k]) / k).numpy(), torch.arange(k, len(v) + 1).numpy()

        y, x = running(self.mpt_objective)
        ax.plot(x, y, color="tab:blue", alpha=0.8, label="MPT objective (MaskedELBO)")
        y, x = running(self.vae_elbo)
        ax.plot(x, y, color="tab:orange", alpha=0.8, label="VAE ELBO (Trace_ELBO)")
        ax.axhline(
            self.lml_mpt,
            color="tab:blue",
            linestyle="--",
            label=f"log p(X), MPT-trained: {self.lml_mpt:.2f}",
        )
        ax.axhline(
            self.lml_vae,
            color="tab:orange",
            linestyle="--",
            label=f"log p(X), VAE decoder: {self.lml_vae:.2f}",
        )
        if self.lml_truth is not None:
            ax.axhline(
                self.lml_truth,
                color="grey",
                linestyle=":",
                label=f"log p(X), true parameters: {self.lml_truth:.2f}",
            )
        finals = [self.lml_mpt, self.lml_vae] + ([] if self.lml_truth is None else [self.lml_truth])
        lo = min(finals + [float(self.vae_elbo[len(self.vae_elbo) // 3 :].min())])
        hi = max(finals)
        pad = max(0.5, 0.2 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per image")
        ax.set_title(
            f"Bernoulli latent linear model, K = 2 ({self.data_source}, N = {self.N}, "
            f"{self.num_pixels} pixels)",
            fontsize="medium",
        )
        ax.legend(fontsize="small", loc="lower right")
        return fig


def _quadrature_lml(X, K, W, bias, points, bounds, messages):
    def model(data):
        return bernoulli_latent_linear(data, K, W=W, bias=bias)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = log_marginal_likelihood(
            model, X, method="quadrature", quadrature_points=points, quadrature_bounds=bounds
        )
    messages.extend(str(w.message) for w in caught)
    return float(est.total) / X.shape[0]


def _binary_data(data, num_data, K, seed):
    """``(X, truth, source)``: the images as ``(N, P)`` zeros and ones, the true parameters
    (synthetic data only, else ``None``) and where the images came from."""
    truth = None
    if data is None:
        try:
            X, source = load_digits_binary(), "digits"
        except ImportError:
            data = "synthetic"
    if isinstance(data, str):
        if data == "digits":
            X, source = load_digits_binary(), "digits"
        elif data == "synthetic":
            X, truth = synthetic_binary(num_data or 500, latent_dim=K, seed=seed)
            source = "synthetic"
        else:
            raise ValueError(f"data must be None, 'digits', 'synthetic' or a tensor, got {data!r}")
    elif data is not None:
        X, source = prepare_binary(data), "user"
    if num_data is not None:
        X = X[:num_data]
    return X, truth, source


def _linear_encoder_guide(P, K, X):
    r"""The linear VAE's guide: :math:`q(z\mid x) = \mathcal N(Ax + a,
    \mathrm{diag}\,\mathrm{softplus}(Bx + b)^2)`."""
    encoder = torch.nn.Linear(P, 2 * K).to(device=X.device, dtype=X.dtype)

    def guide(batch):
        enc = pyro.module("encoder", encoder)
        out = enc(batch)
        loc, scale = out[..., :K], torch.nn.functional.softplus(out[..., K:]) + 1e-4
        with pyro.plate("data", batch.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def _train(model, make_guide, loss, X, batches, lr, seed):
    """Adam on the minibatches from a clear parameter store and a fixed seed (the guide is
    made after seeding, so its initial weights are seeded too); returns the objective per
    image at each step and the learned ``W`` and ``bias``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed + 1)
    svi = SVI(model, make_guide(), Adam({"lr": lr}), loss=loss)
    objective = [-svi.step(X[idx]) / idx.shape[0] for idx in batches]
    return objective, pyro.param("W").detach().clone(), pyro.param("bias").detach().clone()


def binary(
    data: str | torch.Tensor | np.ndarray | None = None,
    K: int = 2,
    steps: int = 1000,
    lr: float = 0.05,
    batch_size: int = 128,
    estimator: str | MaskEstimator = "uniform",
    num_masks: int = 1,
    quadrature_points: int = 20,
    quadrature_bounds: tuple[float, float] = (-5.0, 5.0),
    num_data: int | None = None,
    train_quadrature_points: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> BinaryResult:
    r"""Trains :func:`~pyro_mpt.models.bernoulli_latent_linear` by MaskedELBO with quadrature
    conditionals, and a linear VAE (same decoder, encoder :math:`q(z\mid x) =
    \mathcal N(Ax + a, \mathrm{diag}\,\mathrm{softplus}(Bx + b)^2)`) by
    :class:`~pyro.infer.Trace_ELBO`, both by Adam on random minibatches, and scores both by
    the quadrature LML (``quadrature_points`` per axis on ``quadrature_bounds``) on all the
    data.

    The default estimator is ``"uniform"`` (one mask of uniform size per image and step:
    unbiased, and one conditional evaluation per image, where ``"stratified"`` needs one
    per mask size, 64 times the cost for 8 x 8 images). Clears Pyro's parameter store.

    Example::

        res = binary(data="synthetic", steps=200)
        res.lml_mpt, res.lml_vae

    :param data: ``None`` (scikit-learn's digits when installed, else synthetic),
        ``"digits"`` (raises ImportError without scikit-learn), ``"synthetic"``, or a tensor
        of images ``(N, ...)`` (binarised by :func:`prepare_binary`).
    :param int num_data: use only the first ``num_data`` images (synthetic: draw that many,
        default 500).
    :param int train_quadrature_points: grid points per axis of the conditionals during
        training (default ``quadrature_points``); fewer make the MPT steps cheaper (the cost
        is proportional to the grid's size). The final scores always use
        ``quadrature_points``.
    :returns: :class:`BinaryResult`.

    Both are scored by :math:`\log p(X)/N = \frac1N\sum_n \log \int \prod_t
    \mathrm{Bernoulli}(x_{n,t};\, \mathrm{sigmoid}(W_t^\top z + b_t))\,\mathcal N(z; 0, I_K)\,dz`
    on the quadrature grid.
    """
    device = torch.device(device)
    X, truth, source = _binary_data(data, num_data, K, seed)
    X = X.to(device)
    N, P = X.shape
    batch_size = min(batch_size, N)

    def model(batch):
        return bernoulli_latent_linear(batch, K)

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(N, (batch_size,), generator=gen) for _ in range(steps)]
    elbo = MaskedELBO(
        estimator=estimator,
        num_masks=num_masks,
        conditionals="quadrature",
        quadrature_points=train_quadrature_points or quadrature_points,
        quadrature_bounds=quadrature_bounds,
    )
    mpt_obj, W_mpt, b_mpt = _train(model, lambda: None, elbo, X, batches, lr, seed)
    vae_elbo, W_vae, b_vae = _train(
        model, lambda: _linear_encoder_guide(P, K, X), Trace_ELBO(), X, batches, lr, seed
    )

    messages = []
    grid = (quadrature_points, quadrature_bounds, messages)
    with torch.no_grad():
        lml_mpt = _quadrature_lml(X, K, W_mpt, b_mpt, *grid)
        lml_vae = _quadrature_lml(X, K, W_vae, b_vae, *grid)
        lml_truth = None
        if truth is not None:
            truth = {k: v.to(device) for k, v in truth.items()}
            lml_truth = _quadrature_lml(X, K, truth["W"], truth["bias"], *grid)
    return BinaryResult(
        lml_mpt=lml_mpt,
        lml_vae=lml_vae,
        mpt_objective=torch.tensor(mpt_obj, dtype=torch.float64),
        vae_elbo=torch.tensor(vae_elbo, dtype=torch.float64),
        data_source=source,
        N=int(N),
        num_pixels=int(P),
        estimator=getattr(elbo.estimator, "name", str(estimator)),
        lml_truth=lml_truth,
        messages=messages,
        train_quadrature_points=int(train_quadrature_points or quadrature_points),
    )
