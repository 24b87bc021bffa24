"""Convergence orders of the ODE samplers against the exact probability-flow solution of a Gaussian mixture."""
import numpy as np
import pytest
import torch

from diffkit import analytic, grids, paths, samplers
from diffkit.samplers import NFECounter

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002  # the range of the shared `problem` (tests/samplers/conftest.py)


def order(gmm, x_T, ref, sampler, steps):
    nfes, errors = [], []
    for n in steps:
        counter = NFECounter(gmm)
        out = sampler(counter, x_T, grids.karras(n, SIGMA_MIN, SIGMA_MAX))
        nfes.append(counter.nfe)
        errors.append((out - ref).norm(dim=1).median().item())
    return np.polyfit(np.log(nfes), np.log(errors), 1)[0], errors


@pytest.mark.parametrize(
    "name,steps,lo,hi",
    [
        ("euler", [40, 80, 160], 0.85, 1.15),
        ("heun", [40, 80, 160], 1.8, 2.3),
        ("dpmpp_2m", [40, 80, 160], 1.8, 2.4),
        ("dpmpp_3m", [40, 80, 160], 2.7, 3.6),
    ],
)
def test_convergence_order_on_gmm(problem, name, steps, lo, hi):
    slope, errors = order(*problem, samplers.get(name), steps)
    assert lo < -slope < hi, f"{name}: fitted order {-slope:.2f}, median errors {errors}"


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_multistep_order_k(problem, k):
    slope, errors = order(*problem, lambda d, x, s: samplers.multistep(d, x, s, order=k), [80, 160, 320])
    assert abs(-slope - k) < 0.45, f"order {k}: fitted {-slope:.2f}, errors {errors}"


def test_heun_on_single_gaussian_closed_form(gauss3):
    g = torch.Generator().manual_seed(5)
    x_T = gauss3.sample(64, g) + 50.0 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    exact = gauss3.gaussian_flow(x_T, 50.0)
    errs = [(samplers.heun(gauss3, x_T, grids.karras(n, 1e-3, 50.0)) - exact).norm(dim=1).max().item() for n in (32, 64)]
    assert errs[1] < 0.02 and 3.5 < errs[0] / errs[1] < 5.0  # second order: halving h quarters the error


def test_rk45_reaches_reference_and_counts_nfe(problem):
    gmm, x_T, ref = problem
    counter = NFECounter(gmm)
    out = samplers.rk45(counter, x_T, grids.karras(10, SIGMA_MIN, SIGMA_MAX), rtol=1e-8, atol=1e-8)
    assert (out - ref).norm(dim=1).max() < 1e-5
    assert counter.nfe > 50  # adaptive: many more evaluations than grid points


def test_heun_nfe_is_2n_minus_1(ring_gmm):
    counter = NFECounter(ring_gmm)
    samplers.heun(counter, torch.zeros(4, 2, dtype=torch.float64), grids.karras(18, SIGMA_MIN, SIGMA_MAX))
    assert counter.nfe == 35  # EDM's CIFAR-10 setting


def test_ddim_eta0_is_euler(problem):
    gmm, x_T, _ = problem
    s = grids.karras(12, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(samplers.ddim(gmm, x_T, s, eta=0.0), samplers.euler(gmm, x_T, s), rtol=1e-12, atol=1e-12)


def test_callback_sees_every_step(ring_gmm):
    seen = []
    samplers.dpmpp_2m(ring_gmm, torch.ones(3, 2, dtype=torch.float64) * 10, grids.karras(6, 0.01, 10.0),
                      callback=lambda i, x, sigma, x0_hat: seen.append((i, sigma, x0_hat.shape)))
    assert [i for i, _, _ in seen] == list(range(6)) and seen[0][1] == 10.0 and seen[0][2] == (3, 2)


TWO_M_GRIDS = {
    "karras3": grids.karras(3, SIGMA_MIN, SIGMA_MAX),
    "karras10": grids.karras(10, SIGMA_MIN, SIGMA_MAX),
    "karras40": grids.karras(40, SIGMA_MIN, SIGMA_MAX),
    "log_snr_vp": grids.log_snr_uniform(paths.VPLinear(), 12),
    "uniform_t_rf": grids.uniform_t(paths.RectifiedFlow(), 17),
}


@pytest.mark.parametrize("grid", list(TWO_M_GRIDS))
def test_dpmpp_2m_is_the_noise_free_sde_solver(ring_gmm, grid):
    """Alg. 2's arrangement of DPM-Solver++(2M) and dpmpp_2m_sde's at eta = 0 are one update: they agree to
    float64 round-off (measured <= 4e-14 on samples of size ~5), while the first-order solver is 0.08 to 3 away."""
    sigmas = TWO_M_GRIDS[grid]
    g = torch.Generator().manual_seed(0)
    x = ring_gmm.sample(64, g) + sigmas[0] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ours = samplers.dpmpp_2m(ring_gmm, x, sigmas)
    torch.testing.assert_close(ours, samplers.dpmpp_2m_sde(ring_gmm, x, sigmas, eta=0.0), rtol=0, atol=1e-12)
    assert (ours - samplers.multistep(ring_gmm, x, sigmas, order=1)).abs().max() > 0.05


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_the_last_step_is_the_denoiser_at_sigma_min(name, ring_gmm):
    """Every sampler ends with x = D(x, sigma_min), noise-free, reported to the callback as the grid's last step."""
    sigmas = grids.karras(5, 0.01, 10.0)
    seen = []
    out = samplers.get(name)(ring_gmm, 10 * torch.randn(4, 2, dtype=torch.float64), sigmas,
                             callback=lambda i, x, sigma, x0_hat: seen.append((i, sigma, x0_hat)))
    i, sigma, x0_hat = seen[-1]
    assert (i, sigma) == (len(sigmas) - 2, 0.01)
    torch.testing.assert_close(out, x0_hat, rtol=0, atol=1e-12)  # heun's Euler step to 0 rounds; the others are exact


def test_rk45_names_the_rows_that_are_not_finite_and_fixed_grids_carry_them():
    gmm = analytic.ring()
    x = 80.0 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\] hold NaN"):
        samplers.rk45(gmm, x, grids.karras(4, 0.002, 80.0))
    out = samplers.dpmpp_2m(gmm, x, grids.karras(4, 0.002, 80.0))
    clean = samplers.dpmpp_2m(gmm, x[[0, 1, 3, 4, 5]], grids.karras(4, 0.002, 80.0))
    assert out[2].isnan().all() and torch.equal(out[[0, 1, 3, 4, 5]], clean)
