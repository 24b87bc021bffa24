import pytest
import torch

from diffkit import analytic, grids, samplers
from diffkit.samplers.calibrate import calibrated_grid, resample


def starts(gmm, n, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(n, g) + sigma * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)


def test_calibrated_grid_beats_fixed_grids_on_unseen_points():
    gmm, sigma_max, steps = analytic.ring(), 80.0, 5
    x_cal = starts(gmm, 64, sigma_max, seed=1)
    grid, info = calibrated_grid(gmm, x_cal, sigma_max, steps)  # reference solved by rk45 inside
    grids.check_grid(grid)
    assert grid.shape == (steps + 1,) and grid[0].item() == sigma_max
    x = starts(gmm, 400, sigma_max, seed=2)  # points the calibration never saw
    exact = gmm.flow(x, sigma_max)
    err = lambda s: (samplers.dpmpp_2m(gmm, x, s) - exact).norm(dim=1).median().item()  # noqa: E731
    fixed = min(err(grids.karras(steps, lo, sigma_max)) for lo in (0.002, 0.05, 0.3))
    assert err(grid) < fixed / 3, (err(grid), fixed)
    # Each stage only improves on the one before: the best of the coarse sweep, the family fit, the free grid.
    assert info["calibration_error"] <= info["start_error"] <= info["family_error"]
    assert info["sampler_runs"] <= 32 + 60 + 60 * steps + 1


def test_unipc_calibrates_and_a_warm_start_is_used_when_better():
    gmm, sigma_max, steps = analytic.ring(), 80.0, 6
    x = starts(gmm, 64, sigma_max, seed=3)
    ref = gmm.flow(x, sigma_max)
    first, info = calibrated_grid(gmm, x, sigma_max, steps, sampler="unipc", options={"order": 2}, reference=ref)
    again, warm = calibrated_grid(gmm, x, sigma_max, steps, sampler="unipc", options={"order": 2}, reference=ref,
                                  init=first, max_evals=0)
    assert warm["start_error"] == info["calibration_error"] and torch.equal(again, first)


def test_resample_keeps_the_shape_in_log_sigma():
    grid = grids.karras(9, 0.01, 80.0, rho=7.0)
    coarse = resample(grid, 5)
    grids.check_grid(coarse)
    torch.testing.assert_close(coarse[:-1], grid[:-1:2])  # every other level of the 9-step grid
    torch.testing.assert_close(resample(grid, 9), grid, rtol=1e-12, atol=0)


def test_only_deterministic_fixed_grid_samplers_calibrate():
    gmm = analytic.ring()
    for name in ("ddpm", "euler_maruyama", "rk45"):
        with pytest.raises(ValueError, match="deterministic fixed-grid samplers"):
            calibrated_grid(gmm, torch.zeros(4, 2, dtype=torch.float64), 80.0, 3, sampler=name, reference=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unknown sampler"):
        calibrated_grid(gmm, torch.zeros(4, 2, dtype=torch.float64), 80.0, 3, sampler="dpmpp2m")
