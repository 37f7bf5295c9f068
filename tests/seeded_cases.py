"""Seeded results that must not change when code is moved (the refactoring guard).

Each case runs one public entry point from a fixed seed in float64 and returns a dict of
floats. ``tests/data/seeded_results.json`` holds the values the tree gave when the pins were
taken; ``tests/test_seeded_results.py`` compares against them. Regenerate (only after a
change that is *meant* to alter a seeded stream, saying so in the commit) with::

    python -m tests.seeded_cases --write
"""

import json
import sys
import warnings
from pathlib import Path

import pyro
import torch

PINS = Path(__file__).parent / "data" / "seeded_results.json"


def _ppca(N=12, T=6, K=2, seed=0):
    from pyro_mpt.models import sample_ppca

    pyro.set_rng_seed(seed)
    X, truth = sample_ppca(num_data=N, num_tokens=T, latent_dim=K, noise_scale=0.5)
    return X, truth


def _floats(t):
    t = torch.as_tensor(t).detach().reshape(-1)
    return [float(v) for v in t]


def case_masked_elbo():
    from pyro_mpt import MaskedELBO
    from pyro_mpt.models import ppca_collapsed, ppca_latent

    X, truth = _ppca()
    out = {}
    for est in ("stratified", "uniform", "chain", "fixed"):
        for share in (False, True):
            pyro.set_rng_seed(1)
            e = MaskedELBO(estimator=est, num_masks=3, share_masks=share).estimate(
                ppca_collapsed, None, X, 2, truth["W"], truth["loc"], truth["noise_scale"]
            )
            out[f"{est}/share={share}"] = _floats(e.draws)
    pyro.set_rng_seed(2)
    e = MaskedELBO(
        estimator="stratified", num_masks=2, num_samples=16, conditionals="importance"
    ).estimate(ppca_latent, None, X[:4], 2, truth["W"], truth["loc"], truth["noise_scale"])
    out["importance"] = _floats(e.draws)
    pyro.set_rng_seed(3)
    e = MaskedELBO(estimator="uniform", num_masks=2, conditionals="quadrature").estimate(
        ppca_latent, None, X[:4, :4], 1, truth["W"][:4, :1], truth["loc"][:4], 0.5
    )
    out["quadrature"] = _floats(e.draws)
    return out


def case_enumerate():
    from pyro_mpt import MaskedELBO, log_marginal_likelihood
    from pyro_mpt.models import hmm
    from tests.conftest import sample_hmm_data

    X, init, trans, emit = sample_hmm_data(5, 6, 3, 4, seed=4)
    out = {}
    for est in ("stratified", "chain"):
        pyro.set_rng_seed(5)
        e = MaskedELBO(estimator=est, num_masks=2).estimate(hmm, None, X, init, trans, emit)
        out[est] = _floats(e.draws)
    out["exact"] = _floats(log_marginal_likelihood(hmm, X, init, trans, emit).per_sequence)
    return out


def case_curve():
    from pyro_mpt import mpt_curve
    from pyro_mpt.models import ppca_collapsed

    X, truth = _ppca()
    out = {}
    for share in (False, True):
        pyro.set_rng_seed(6)
        c = mpt_curve(
            ppca_collapsed,
            X,
            2,
            truth["W"],
            truth["loc"],
            truth["noise_scale"],
            num_masks=2,
            share_masks=share,
        )
        out[f"scores/share={share}"] = _floats(c.scores)
        out[f"area/share={share}"] = [float(c.area), float(c.area_stderr)]
    return out


def case_reference():
    from pyro_mpt import log_marginal_likelihood
    from pyro_mpt.models import ppca_collapsed, ppca_latent

    X, truth = _ppca()
    args = (2, truth["W"], truth["loc"], truth["noise_scale"])
    out = {"exact": _floats(log_marginal_likelihood(ppca_collapsed, X, *args).per_sequence)}
    pyro.set_rng_seed(7)
    ref = log_marginal_likelihood(ppca_latent, X, *args, num_samples=64, method="importance")
    out["importance"] = _floats(ref.per_sequence) + _floats(ref.khat) + _floats(ref.ess)
    pyro.set_rng_seed(8)
    ref = log_marginal_likelihood(
        ppca_latent, X[:3, :4], 1, truth["W"][:4, :1], truth["loc"][:4], 0.5, method="quadrature"
    )
    out["quadrature"] = _floats(ref.per_sequence)
    return out


def case_evaluate():
    from pyro_mpt import evaluate
    from pyro_mpt.models import ppca_collapsed

    X, truth = _ppca()
    pyro.set_rng_seed(9)
    rep = evaluate(
        ppca_collapsed,
        X,
        2,
        truth["W"],
        truth["loc"],
        truth["noise_scale"],
        num_masks=3,
        curve_masks=2,
        progress=False,
    )
    out = {"reference": [float(rep.reference.total)]}
    for name, r in rep.estimators.items():
        out[name] = [r.value, r.stderr]
    out["curve"] = _floats(rep.curve.scores)
    out["fixed"] = [f.estimate for f in rep.fixed_rates]
    return out


def case_mlm():
    from pyro_mpt.mlm import hmm_predictor, mlm_curve, mlm_estimate, pseudo_log_likelihood
    from tests.conftest import sample_hmm_data

    X, init, trans, emit = sample_hmm_data(4, 5, 3, 4, seed=10)
    pred = hmm_predictor(init, trans, emit)
    out = {}
    g = torch.Generator().manual_seed(11)
    out["curve"] = _floats(mlm_curve(pred, X, num_masks=2, generator=g).scores)
    for est in ("uniform", "stratified", "chain", "fixed"):
        g = torch.Generator().manual_seed(12)
        out[est] = _floats(mlm_estimate(pred, X, estimator=est, num_masks=2, generator=g).draws)
    out["pll"] = _floats(pseudo_log_likelihood(pred, X))
    return out


CASES = {
    name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


def run_case(name):
    pyro.clear_param_store()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            # diagnostics' warnings (k-hat on a tiny importance run) are not what is pinned
            warnings.simplefilter("ignore", UserWarning)
            return CASES[name]()
    finally:
        torch.set_default_dtype(old)
        pyro.clear_param_store()


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.seeded_cases --write")
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({n: run_case(n) for n in CASES}, indent=1) + "\n")
    print(f"wrote {PINS}")
