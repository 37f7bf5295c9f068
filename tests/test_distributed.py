"""MaskedELBO on several processes (pyro_mpt.distributed): per-rank mask streams, and
(slow) PyTorch Lightning with DDP on 2 CPU processes (gloo) matching one process on the
same data: same parameters after a few Adam steps."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam

from pyro_mpt import MaskedELBO
from pyro_mpt.distributed import rank_and_world_size, seed_per_rank

N, T, K = 40, 6, 2
STEPS = 5


class PPCA(PyroModule):
    """Collapsed PPCA as a PyroModule, its data plate declared at the full size ``N`` and
    subsampled to the batch (Pyro's convention), so a shard's loss is scaled by N / batch."""

    def __init__(self, size):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.size = size
        self.W = PyroParam(0.3 * torch.randn(T, K, generator=g, dtype=torch.float64))
        self.loc = PyroParam(torch.zeros(T, dtype=torch.float64))
        self.noise = PyroParam(torch.ones((), dtype=torch.float64), dist.constraints.positive)

    def forward(self, X):
        with pyro.plate("data", self.size, subsample_size=X.shape[0]):
            cov = (self.noise**2).expand(T)
            pyro.sample("x", dist.LowRankMultivariateNormal(self.loc, self.W, cov), obs=X)


def _data():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(T, K, generator=g, dtype=torch.float64)
    X = torch.randn(N, K, generator=g, dtype=torch.float64) @ W.T
    return X + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)


@pytest.fixture
def module_local_params():
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)
    try:
        yield
    finally:
        pyro.settings.set(module_local_params=old)


def test_rank_and_world_size_without_a_process_group():
    assert rank_and_world_size() == (0, 1)


def test_seed_per_rank_gives_reproducible_independent_mask_streams(module_local_params):
    X = _data()
    loss_fn = MaskedELBO(estimator="stratified")(PPCA(N), None)
    losses = {}
    for rank in (0, 1, 0):
        assert seed_per_rank(7, rank=rank) == 7 + rank
        losses.setdefault(rank, []).append(loss_fn(X).item())
    assert losses[0][0] == losses[0][1]  # the same rank: the same masks
    assert losses[0][0] != losses[1][0]  # another rank: other masks
    assert seed_per_rank(3) == 3  # no process group: rank 0
    with pytest.raises(TypeError, match="rank must be an int >= 0, got -1"):
        seed_per_rank(0, rank=-1)
    with pytest.raises(TypeError, match="seed must be an int >= 0, got 1.5"):
        seed_per_rank(1.5)


def test_subsample_plate_scales_a_shard_to_the_full_size(module_local_params):
    """Half the data with the plate at full size: twice the half's loss, so the mean of two
    shards' gradients is the full gradient (what DDP computes)."""
    X = _data()
    model = PPCA(N)
    loss_fn = MaskedELBO(estimator="chain")(model, None)
    full = loss_fn(X)
    halves = [loss_fn(X[r::2]) for r in (0, 1)]
    assert (sum(halves) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    (g_full,) = torch.autograd.grad(full, [model.W_unconstrained])
    g_mean = sum(torch.autograd.grad(h, [model.W_unconstrained])[0] for h in halves) / 2
    torch.testing.assert_close(g_mean, g_full, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------
# Lightning + DDP on 2 CPU processes (slow: each process starts torch, Pyro and Lightning)
# ---------------------------------------------------------------------------------------

try:
    import lightning as L
except ImportError:  # optional: pip install pyro-mpt[lightning]
    L = None


if L is not None:

    class MPTLightning(L.LightningModule):
        """Pyro's svi_lightning pattern with MaskedELBO: the ELBOModule is the loss."""

        def __init__(self, seed=0):
            super().__init__()
            self.seed = seed
            self.loss_fn = MaskedELBO(estimator="chain")(PPCA(N), None)

        def setup(self, stage):
            pyro.settings.set(module_local_params=True)  # every spawned rank
            seed_per_rank(self.seed)

        def training_step(self, batch, batch_idx):
            loss = self.loss_fn(batch)
            self.log("loss", loss.detach(), sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.loss_fn.parameters(), lr=0.05)


def _fit(devices):
    from torch.utils.data import DataLoader

    X = _data()
    module = MPTLightning()
    # one batch per rank and step: a rank's shard (DistributedSampler) is N / devices rows
    loader = DataLoader(X, batch_size=N // devices, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=STEPS,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return {k: v.detach().clone() for k, v in module.loss_fn.state_dict().items()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lightning_ddp_two_processes_match_one(module_local_params):
    """DDP (gloo, 2 ranks, each half the data) and one process on all the data take the
    same Adam steps: the chain estimator with exact conditionals has no mask noise, so the
    parameters agree to float64 rounding (tolerance 1e-8) after 5 steps."""
    if L is None:
        pytest.skip("lightning is not installed (pip install pyro-mpt[lightning])")
    one = _fit(1)
    two = _fit(2)
    start = PPCA(N).state_dict()
    assert not torch.allclose(one["model.W_unconstrained"], start["W_unconstrained"])
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-8, rtol=0)
