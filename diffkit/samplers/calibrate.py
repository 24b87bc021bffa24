"""Sigma grids optimised for one model: minimise a sampler's error against the model's own exact-ish solution.

For a denoiser, a sampler and a step count, choose the interior noise levels (sigma_max fixed, last step to
0) that minimise the median distance between the sampler's output and a tight-tolerance solution of the same
probability-flow ODE (the `rk45` sampler), started from calibration noise that is not used afterwards. This is
optimised time steps (Xue et al. 2024, "Accelerating Diffusion Sampling with Optimized Time Steps"; Sabour et
al. 2024, "Align Your Steps") in its plainest form: derivative-free search (Powell, scipy) over the gaps in
log sigma, from a few starting grids, keeping the best. It costs a few hundred sampler runs on the calibration
batch, once per model, sampler and step count; the grid then serves every later sample.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from diffkit import grids
from diffkit.contracts import Denoiser
from diffkit.samplers import ode

_MIN_GAP = 1e-3  # smallest allowed step in log sigma


def _grid(params: np.ndarray, sigma_max: float) -> Tensor:
    gaps = np.logaddexp(0, params) + _MIN_GAP  # softplus keeps the grid strictly decreasing
    sigmas = sigma_max * np.exp(-np.concatenate([[0.0], np.cumsum(gaps)]))  # exactly sigma_max first
    return torch.tensor(np.concatenate([sigmas, [0.0]]), dtype=torch.float64)


def _params(sigmas: Tensor) -> np.ndarray:
    gaps = np.maximum(-np.diff(np.log(sigmas[:-1].numpy())) - _MIN_GAP, 1e-6)
    return np.log(np.expm1(gaps))


def default_inits(steps: int, sigma_max: float) -> list[Tensor]:
    """Starting grids: EDM's rho = 7 grid to 0.3 and to 0.05, and log-SNR-uniform to 0.2 (data of unit scale)."""
    geometric = torch.logspace(np.log10(sigma_max), np.log10(0.2), steps, dtype=torch.float64)
    return [grids.karras(steps, 0.3, sigma_max), grids.karras(steps, 0.05, sigma_max),
            torch.cat([geometric, torch.zeros(1, dtype=torch.float64)])]


def calibrated_grid(denoiser: Denoiser, x: Tensor, sigma_max: float, steps: int, *, sampler: str = "dpmpp_2m",
                    reference: Tensor | None = None, inits: list[Tensor] | None = None, max_evals: int = 1500,
                    rtol: float = 1e-6) -> tuple[Tensor, dict]:
    """The grid of `steps` steps from sigma_max that minimises `sampler`'s median endpoint error on x.

    x: calibration start points (B, ...) at sigma_max in the scale-free state. reference: their exact
    endpoints if known, else solved here with rk45 at `rtol`. Returns (grid, info with the errors found).
    """
    from diffkit.samplers import get

    if steps < 2:
        return grids.karras(max(steps, 1), 0.3 if sigma_max > 0.3 else sigma_max / 2, sigma_max), {"evals": 0}
    fn = get(sampler)
    if reference is None:
        reference = ode.rk45(denoiser, x, torch.tensor([sigma_max, 1e-4, 0.0], dtype=torch.float64), rtol=rtol, atol=rtol)

    def error(params: np.ndarray) -> float:
        out = fn(denoiser, x, _grid(params, sigma_max))
        return (out - reference).reshape(len(x), -1).norm(dim=1).median().item()

    best, info = None, {"evals": 0, "starts": []}
    for init in inits or default_inits(steps, sigma_max):
        start = _params(init)
        result = minimize(error, start, method="Powell", options={"maxfev": max_evals, "xtol": 1e-3, "ftol": 1e-4})
        info["evals"] += result.nfev
        info["starts"].append({"initial_error": error(start), "final_error": float(result.fun)})
        if best is None or result.fun < best.fun:
            best = result
    info["calibration_error"] = float(best.fun)
    return _grid(best.x, sigma_max), info
