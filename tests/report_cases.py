"""Reports shared by the tests of ``evaluate`` (test_evaluate), its text (test_report), its
arviz export (test_export) and its figures (test_plotting): small PPCA problems whose
reference is exact."""

import dataclasses

import pyro

from pyro_mpt import evaluate, models

N, T, K = 20, 6, 2


def ppca_data():
    """``(X, truth)``: ``N`` sequences of ``T`` tokens from PPCA with ``K`` factors."""
    return models.sample_ppca(N, T, K, noise_scale=0.5)


def ppca_report(X, truth):
    """Every part: the exact reference, three estimators with 4 masks, a curve with 3 masks
    per size and the default fixed rates (0.15, 0.5, 0.8); seed 1."""
    pyro.set_rng_seed(1)
    return evaluate(
        models.ppca_collapsed, X, K, num_masks=4, curve_masks=3, progress=False, **truth
    )


def report_without_curve(X, truth):
    """One estimator and no curve (``curve_masks=None``), hence no fixed-rate rows."""
    return evaluate(
        models.ppca_collapsed,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=None,
        progress=False,
        **truth,
    )


def flagged(report):
    """The same report with its reference flagged untrustworthy."""
    reference = dataclasses.replace(report.reference, trustworthy=False)
    return dataclasses.replace(report, reference=reference)


def new_axes():
    """A bare matplotlib Axes (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure().add_subplot()
