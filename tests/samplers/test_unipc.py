"""UniPC: convergence orders against the exact flow of a Gaussian mixture, and parity with diffusers' scheduler.

Parity. diffusers' UniPCMultistepScheduler keeps its sample in VP space and hands the model its own sigmas;
it is driven here by the exact denoiser through test_diffusers_parity's `run_vp` (whose docstring explains the
spaces), as shipped and with its tables in float64 (`Float64`), and compared with ours on the same grid.
Two grids, because of how each library ends:
  - final_sigmas_type="sigma_min" (its grid ends at sigma(t = 0) = 0.01, no jump to 0): diffusers' last step
    lands at sigma_min, uncorrected. Ours on that grid with 0 appended takes the same steps and then x = D at
    sigma_min, so we compare with D(diffusers' sample, sigma_min). With lower_order_final the two count steps
    differently (ours counts the jump to 0, as diffusers does on its default grid), so here it is off.
  - its default grid, which ends with 0 (final_sigmas_type="zero"): compared directly. Its last step is x = D
    at the uncorrected point, as ours. bh1 cannot take it (asserted below); bh2 is checked with
    lower_order_final on, its default.
"""
import math

import pytest
import torch

from diffkit import grids, samplers
from diffkit.samplers import NFECounter
from diffkit.samplers.ode import _adams_weights
from diffkit.samplers.unipc import _update
from test_ode import order as fitted_order

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # (64 or 200, 2) tensors


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_convergence_order(problem, p, corrector, variant):
    # UniP-p is of order p, UniC lifts it to p + 1 (Corollary 3.2, Theorem 3.1). lower_order_final is off, so
    # that every step past the warm-up has the order under test (with it, p = 3 steps to sigma_min at order 2,
    # uncorrected; here that measured 3.94, as D barely moves in lambda so close to the data).
    # Measured on Karras grids of 40, 80, 160 steps (both variants): 1.02, 2.19/2.14, 3.33 without the corrector;
    # 1.96/1.95, 3.16/3.05, 3.93 with it. 0.4 either way rejects a neighbouring order.
    def sampler(d, x, s):
        return samplers.unipc(d, x, s, order=p, variant=variant, corrector=corrector, lower_order_final=False)

    expected = p + corrector
    slope, errors = fitted_order(*problem, sampler, [40, 80, 160])
    assert abs(-slope - expected) < 0.4, f"UniPC-{p} {variant} corrector={corrector}: fitted {-slope:.2f}, {errors}"


@pytest.mark.parametrize("k", [3, 4])
def test_unip_of_order_3_and_up_is_the_exponential_adams_step(k):
    # With two or more differences B(h) a is fixed by R and g alone: UniP-k integrates the interpolant of the
    # last k outputs exactly, the step of `multistep` (ode._adams_weights), whatever B.
    g = torch.Generator().manual_seed(k)
    sig = [2.0, 2.9, 4.4, 7.0][:k]
    lams, outs = [-math.log(v) for v in sig], [torch.randn(5, generator=g, dtype=F64) for _ in sig]
    x, h = torch.randn(5, generator=g, dtype=F64), math.log(2.0 / 1.1)
    adams = (1.1 / 2.0) * x + sum(w * d for w, d in zip(_adams_weights([lam - lams[0] for lam in lams], h), outs))
    for variant in ("bh1", "bh2"):
        torch.testing.assert_close(_update(x, 2.0, 1.1, list(zip(lams, outs)), variant), adams, rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_nfe_is_the_number_of_steps(ring_gmm, n):
    # The corrector reuses the output the next predictor needs: one call per grid step, whatever the options.
    for options in ({}, {"order": 3, "variant": "bh1"}, {"order": 1, "corrector": False}):
        counter = NFECounter(ring_gmm)
        out = samplers.unipc(counter, 10 * torch.ones(3, 2, dtype=F64), grids.karras(n, 0.01, 10.0), **options)
        assert counter.nfe == n and torch.isfinite(out).all(), options


def test_bad_options_are_clear_errors(ring_gmm):
    x, s = torch.zeros(2, 2, dtype=F64), grids.karras(4, 0.1, 1.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="integer order >= 1"):
            samplers.unipc(ring_gmm, x, s, order=bad)
    with pytest.raises(ValueError, match="use 'bh1'.*or 'bh2'"):
        samplers.unipc(ring_gmm, x, s, variant="bh3")


# --- Parity with diffusers' UniPCMultistepScheduler ----------------------------------------------------------


@pytest.fixture(scope="module")
def parity():
    pytest.importorskip("diffusers")
    import test_diffusers_parity

    return test_diffusers_parity


def scheduler(n, **config):
    import diffusers

    sch = diffusers.UniPCMultistepScheduler(prediction_type="sample", predict_x0=True, **config)
    sch.set_timesteps(n)
    return sch


def disabled(corrector, n):
    """diffusers' disable_corrector: the steps whose result is not corrected."""
    return [] if corrector else list(range(n))


def start(gmm, sigma):
    g = torch.Generator().manual_seed(0)
    return gmm.sample(64, g) + float(sigma) * torch.randn(64, gmm.dim, generator=g, dtype=F64)


@pytest.mark.parametrize("n", [6, 15])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_parity_on_a_grid_ending_at_sigma_min(parity, ring_gmm, variant, p, corrector, n):
    def make():
        return scheduler(n, solver_order=p, solver_type=variant, lower_order_final=False,
                         final_sigmas_type="sigma_min", disable_corrector=disabled(corrector, n))

    sigmas = make().sigmas.to(F64)
    assert sigmas[-1] > 0
    x, last = start(ring_gmm, sigmas[0]), sigmas[-1].expand(64)

    def drive(sch):  # diffusers' sample at sigma_min, to the scale-free state, then x = D there
        return ring_gmm(parity.run_vp(sch, ring_gmm, x, sigmas, "sample") * torch.sqrt(1 + last[:, None] ** 2), last)

    def ours(with_corrector):
        grid = torch.cat([sigmas, torch.zeros(1, dtype=F64)])
        return samplers.unipc(ring_gmm, x, grid, order=p, variant=variant, corrector=with_corrector,
                              lower_order_final=False)

    label = f"UniPC {variant} p={p} corrector={corrector} n={n} (sigma_min grid)"
    theirs = parity.both(make, drive, {label: ours(corrector)})
    # The comparison can fail: the corrector flipped moves the sample far beyond the tolerance (measured >= 0.05).
    assert (ours(not corrector) - theirs).abs().max() > 1e-4


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_parity_on_the_default_grid(parity, ring_gmm, p, corrector, karras):
    n = 10

    def make():
        return scheduler(n, solver_order=p, use_karras_sigmas=karras, disable_corrector=disabled(corrector, n))

    sch = make()
    sigmas = sch.sigmas.to(F64)
    assert sigmas[-1] == 0 and sch.config.solver_type == "bh2" and sch.config.lower_order_final  # its defaults
    x = start(ring_gmm, sigmas[0])
    parity.both(make, lambda sch: parity.run_vp(sch, ring_gmm, x, sigmas, "sample"),
                {f"UniPC bh2 p={p} corrector={corrector} karras={karras}": samplers.unipc(
                    ring_gmm, x, sigmas, order=p, corrector=corrector)})


def test_diffusers_bh1_cannot_end_at_zero(parity, ring_gmm):
    # On its default grid diffusers' last step has h = inf, so B(h) = h is infinite and its order-1 update
    # multiplies it by an empty sum (inf * 0 = NaN). Ours takes that step as x = D. If diffusers fixes this,
    # this fails: then compare bh1 on the default grid too.
    sigmas = scheduler(8, solver_type="bh1").sigmas.to(F64)
    x = start(ring_gmm, sigmas[0])
    theirs = parity.run_vp(parity.Float64(scheduler(8, solver_type="bh1")), ring_gmm, x, sigmas, "sample")
    assert torch.isnan(theirs).all()
    assert torch.isfinite(samplers.unipc(ring_gmm, x, sigmas, variant="bh1")).all()
