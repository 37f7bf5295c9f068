"""The paper's experiments (pyro_mpt.experiments) at tiny sizes, reproduce() and the CLI."""

import math
import os
import sys

import pytest
import torch

from pyro_mpt.experiments import (
    PRESETS,
    area,
    binary,
    convergence,
    load_digits_binary,
    prepare_binary,
    reproduce,
    synthetic_binary,
    training,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _check_figure(result):
    fig = result.figure()
    assert fig.axes, "the figure has no axes"
    return fig


def test_convergence_error_shrinks_with_permutations():
    res = convergence(T_values=(4, 8), N=20, permutations=(1, 30), seed=0, repeats=2)
    assert res.errors.shape == (2, 2, 2) and res.abs_errors.shape == (2, 2)
    assert torch.isfinite(res.errors).all()
    assert torch.isfinite(res.exact).all()
    # the stratified estimate's error falls roughly like 1/sqrt(p): 30 masks per size beat 1
    assert res.abs_errors[:, -1].mean() < res.abs_errors[:, 0].mean()
    assert (res.final_abs_error < 0.1).all()
    assert "T=4" in res.headline()
    _check_figure(res)


def test_area_matches_exact_lml():
    res = area(T=20, K=2, N=50, permutations=(1, 10), seed=0)
    assert len(res.curves) == 2 and res.share_masks
    assert all(math.isfinite(a) for a in res.areas)
    z = res.z_scores()[-1]
    assert math.isfinite(z) and abs(z) < 4, z
    # one mask per size: no standard error, but still close per sequence
    assert abs(res.areas[0] - res.exact) / res.N < 0.5
    _check_figure(res)


def test_training_stratified_reaches_ml():
    res = training(T=5, N=300, K=2, steps=60, lr=0.1, record_every=5, seed=0)
    assert set(res.lml) == {"stratified", "fixed 80%"}
    assert len(res.steps) == 12 and int(res.steps[-1]) == 60
    for name in res.lml:
        assert torch.isfinite(res.lml[name]).all() and torch.isfinite(res.objective[name]).all()
    # the exact LML rises during training, and the stratified run ends near the ML fit
    assert res.lml["stratified"][-1] > res.lml["stratified"][0]
    assert res.ml_lml - res.final_lml("stratified") < 0.1
    assert res.final_lml("stratified") <= res.ml_lml + 1e-6
    _check_figure(res)


def test_binary_synthetic_is_finite():
    res = binary(data="synthetic", num_data=60, steps=10, batch_size=30, seed=0)
    assert res.data_source == "synthetic" and res.N == 60 and res.num_pixels == 64
    assert math.isfinite(res.lml_mpt) and math.isfinite(res.lml_vae)
    assert math.isfinite(res.lml_truth)
    # a log-probability of 64 binary pixels: between -64 log 2 - slack and 0
    assert -200 < res.lml_mpt < 0 and -200 < res.lml_vae < 0
    assert len(res.mpt_objective) == 10 and len(res.vae_elbo) == 10
    _check_figure(res)


def test_binary_user_images_are_binarised():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 3), generator=gen).to(torch.float64)
    X = prepare_binary(images)
    assert X.shape == (40, 9) and set(X.unique().tolist()) <= {0.0, 1.0}
    res = binary(data=images, steps=5, batch_size=20, seed=0)
    assert res.data_source == "user" and res.num_pixels == 9
    assert math.isfinite(res.lml_mpt) and math.isfinite(res.lml_vae)


def test_digits_loader_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_binary()
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        binary(data="digits", steps=1)


def test_synthetic_binary_shapes():
    X, truth = synthetic_binary(num_data=30, num_pixels=16, latent_dim=2, seed=3)
    assert X.shape == (30, 16) and truth["W"].shape == (16, 2)
    assert set(X.unique().tolist()) <= {0.0, 1.0}


def test_figures_leave_global_matplotlib_state_alone():
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    open_before = plt.get_fignums()
    res = area(T=10, K=2, N=20, permutations=(2,), seed=0)
    fig = res.figure()
    assert plt.get_fignums() == open_before
    assert dict(matplotlib.rcParams) == before
    # drawing on a given axes returns that axes' figure
    fig2 = matplotlib.figure.Figure()
    ax = fig2.add_subplot()
    assert res.figure(ax=ax) is fig2
    assert fig is not fig2


def test_reproduce_tiny_writes_figures_and_report(tmp_path):
    out = tmp_path / "out"
    results = reproduce(str(out), _preset="_tiny", progress=False)
    assert set(results) == {"convergence", "area", "training", "binary", "mlm"}
    for name in results:
        png = out / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Experiment | Measured | Paper's claim |" in report
    for name in results:
        assert f"| {name} |" in report
    assert "MPT-trained" in report and "closed-form ML" in report
    assert "exact LML" in report and "(c) untrained" in report  # the MLM row
    # every table row has the same number of (unescaped) cells as the header
    rows = [l for l in report.splitlines() if l.startswith("| ")]
    counts = {l.replace("\\|", "").count("|") for l in rows}
    assert len(counts) == 1, rows


def test_reproduce_only_and_errors(tmp_path):
    results = reproduce(str(tmp_path), _preset="_tiny", progress=False, only="area")
    assert list(results) == ["area"]
    assert sorted(os.listdir(tmp_path)) == ["area.png", "report.md"]
    with pytest.raises(ValueError, match="unknown experiment"):
        reproduce(str(tmp_path), _preset="_tiny", only="bert")
    with pytest.raises(ValueError, match="not a torch device"):
        reproduce(str(tmp_path), device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            reproduce(str(tmp_path), device="cuda")


def test_full_preset_is_the_papers_sizes():
    full = PRESETS["full"]
    assert full["convergence"]["T_values"] == (5, 10, 20, 50)
    assert full["convergence"]["permutations"][-1] == 300
    assert (full["area"]["T"], full["area"]["K"], full["area"]["N"]) == (200, 5, 1000)
    assert full["area"]["permutations"] == (1, 100)
    assert (full["training"]["T"], full["training"]["N"]) == (10, 2000)


def test_cli_reproduce(tmp_path, monkeypatch, capsys):
    from pyro_mpt import cli

    monkeypatch.setitem(PRESETS, "quick", PRESETS["_tiny"])
    out = tmp_path / "cli"
    rc = cli.main(
        [
            "reproduce",
            "--output",
            str(out),
            "--only",
            "convergence",
            "--only",
            "area",
            "--seed",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (out / "convergence.png").exists() and (out / "area.png").exists()
    assert not (out / "training.png").exists()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "seed 1" in report and "Sizes: `quick`" in report
    assert "report.md" in capsys.readouterr().out


def test_cli_reproduce_bad_device(tmp_path, capsys):
    from pyro_mpt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "--output", str(tmp_path), "--device", "nonsense"])
    assert e.value.code == 2
    assert "not a torch device" in capsys.readouterr().err


def test_cli_demo_bad_device(capsys):
    """The demo checks --device with the same helper as reproduce: a clear usage error."""
    from pyro_mpt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "nonsense"])
    assert e.value.code == 2
    assert "not a torch device" in capsys.readouterr().err
