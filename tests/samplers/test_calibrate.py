import torch

from diffkit import analytic, grids, samplers
from diffkit.samplers.calibrate import calibrated_grid


def starts(gmm, n, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(n, g) + sigma * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)


def test_calibrated_grid_beats_fixed_grids_on_unseen_points():
    gmm, sigma_max, steps = analytic.ring(), 80.0, 5
    x_cal = starts(gmm, 64, sigma_max, seed=1)
    grid, info = calibrated_grid(gmm, x_cal, sigma_max, steps, max_evals=150)  # reference solved by rk45 inside
    grids.check_grid(grid)
    assert grid.shape == (steps + 1,) and grid[0].item() == sigma_max
    x = starts(gmm, 400, sigma_max, seed=2)  # points the calibration never saw
    exact = gmm.flow(x, sigma_max)
    err = lambda s: (samplers.dpmpp_2m(gmm, x, s) - exact).norm(dim=1).median().item()  # noqa: E731
    fixed = min(err(grids.karras(steps, lo, sigma_max)) for lo in (0.002, 0.05, 0.3))
    assert err(grid) < fixed / 3, (err(grid), fixed)
    assert info["calibration_error"] <= min(s["initial_error"] for s in info["starts"])
