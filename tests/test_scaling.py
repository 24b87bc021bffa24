"""The scaling-law fitter recovers known exponents from synthetic losses (diffkit.scaling)."""
import numpy as np
import pytest

from diffkit import scaling

TRUE = {"E": 0.5, "A": 20.0, "B": 50.0, "alpha": 0.4, "beta": 0.3}


def synthetic(noise: float = 0.0, seed: int = 0):
    n, d = (v.ravel() for v in np.meshgrid(np.geomspace(1e3, 1e6, 6), np.geomspace(1e3, 1e6, 6)))
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return n, d, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(len(loss)))


def test_exact_power_laws_are_recovered():
    f = scaling.fit(*synthetic())
    assert f.params() == pytest.approx(TRUE, rel=1e-3)


def test_noisy_losses_and_an_outlier_still_give_the_exponents():
    n, d, loss = synthetic(noise=0.003)
    loss[7] *= 1.5  # one diverged run: Huber on log-loss keeps it from dragging the fit
    f = scaling.fit(n, d, loss)
    assert (f.alpha, f.beta) == pytest.approx((0.4, 0.3), rel=0.08)
    assert f.E == pytest.approx(0.5, rel=0.05)


def test_bootstrap_intervals_cover_the_truth_and_the_prediction():
    n, d, loss = synthetic(noise=0.003, seed=1)
    out = scaling.bootstrap(n, d, loss, resamples=30, at=[(1e7, 1e7)])
    for key in ("alpha", "beta"):
        lo, hi = out["intervals"][key]
        assert lo <= TRUE[key] <= hi and hi - lo < 0.1 * TRUE[key], key
    assert out["fit"].E == pytest.approx(TRUE["E"], rel=0.03)  # the floor is the least identified parameter
    lo, hi = out["intervals"]["L(1e+07, 1e+07)"]
    exact = TRUE["E"] + TRUE["A"] / 1e7 ** 0.4 + TRUE["B"] / 1e7 ** 0.3
    assert lo <= out["fit"].predict(1e7, 1e7) <= hi  # an extrapolation 10x past the largest run:
    assert out["fit"].predict(1e7, 1e7) == pytest.approx(exact, rel=0.01)  # its bias, not its spread, dominates


def test_too_few_runs_is_an_error():
    with pytest.raises(ValueError, match="at least 5 runs"):
        scaling.fit([1, 2], [1, 2], [1, 2])
