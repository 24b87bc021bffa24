"""Sigma grids optimised for one model: minimise a sampler's error against the model's own exact-ish solution.

For a denoiser, a deterministic sampler and a step count, choose the interior noise levels (sigma_max fixed,
last step to 0) that minimise the median distance between the sampler's output and a tight-tolerance
solution of the same probability-flow ODE (the `rk45` sampler), started from calibration noise that is not
used afterwards. This is optimised time steps (Xue et al. 2024, "Accelerating Diffusion Sampling with
Optimized Time Steps"; Sabour et al. 2024, "Align Your Steps") in its plainest form, in two stages:

1. a cheap fit inside a three-parameter family, whatever the step count: one step from sigma_max to sigma_1,
   then EDM's grid (Karras et al. 2022, Eq. 5) from sigma_1 to sigma_min with exponent rho; a coarse sweep,
   then Nelder-Mead over (log sigma_1, log sigma_min, log rho). Far above the data's scale the ODE is close
   to linear, and the best grids found with every gap free take one long first step (sigma 157 -> 5 at
   10 steps on the ring), which EDM's grid alone cannot express;
2. derivative-free search (Powell, scipy) over all the gaps in log sigma, started from stage 1's grid, with a
   budget of sampler runs that grows linearly with the step count.

Starting Powell from one good grid instead of several generic ones is what keeps the cost down: the bench
(benchmarks/results/sampler_accuracy.md) reports the sampler runs and seconds per step count. Every sampler
run is one pass over the calibration batch; scipy's optimisers propose one grid at a time, so runs are not
batched across grids. A grid costs this once per model, sampler, step count (and guidance scale); it then
serves every later sample. Written by hand: no maintained library optimises sampling grids.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from diffkit import grids
from diffkit.contracts import Denoiser
from diffkit.samplers import ode

_MIN_GAP = 1e-3  # smallest allowed step in log sigma
_OUTSIDE = 1e30  # the error of a grid outside the allowed ones (finite: scipy's line searches subtract errors)
# Stage 1's coarse sweep (data of unit scale): sigma_1, sigma_min, rho.
SWEEP = [(s1, lo, rho) for s1 in (40.0, 10.0, 3.0, 1.0) for lo in (0.002, 0.02, 0.1, 0.3) for rho in (3.0, 7.0)]


def _grid(params: np.ndarray, sigma_max: float) -> Tensor | None:
    """The grid [sigma_max, exp(params)..., 0], or None unless it decreases by at least _MIN_GAP in log sigma."""
    if not (np.diff(np.concatenate([[np.log(sigma_max)], params])) < -_MIN_GAP).all():
        return None
    return torch.tensor(np.concatenate([[sigma_max], np.exp(params), [0.0]]), dtype=torch.float64)


def _params(sigmas: Tensor) -> np.ndarray:
    return np.log(sigmas[1:-1].numpy())


def resample(sigmas: Tensor, steps: int) -> Tensor:
    """A grid of `steps` steps with the same shape in log sigma as `sigmas` (e.g. a calibrated grid of another
    step count): log sigma interpolated linearly over the fraction of the way, then the step to 0."""
    log = sigmas[:-1].log().numpy()
    at = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
    new = np.exp(np.interp(at, np.linspace(0, 1, len(log)), log)) if len(log) > 1 else np.exp(log[:1]).repeat(steps)
    new[0] = sigmas[0].item()  # sigma_max exactly
    return torch.tensor(np.concatenate([new, [0.0]]), dtype=torch.float64)


def check_sampler(sampler: str) -> None:
    """A ValueError unless `sampler` is a deterministic fixed-grid sampler, the kind a grid can be fitted for."""
    from diffkit.samplers import STOCHASTIC, get

    get(sampler)  # an unknown name: nearest-name error
    if sampler in STOCHASTIC or sampler == "rk45":
        raise ValueError(f"calibrated grids are for deterministic fixed-grid samplers; {sampler!r} is not one "
                         "(choose one of euler, heun, dpmpp_2m, dpmpp_3m, unipc, multistep)")


def calibrated_grid(denoiser: Denoiser, x: Tensor, sigma_max: float, steps: int, *, sampler: str = "dpmpp_2m",
                    options: dict | None = None, reference: Tensor | None = None, init: Tensor | None = None,
                    family_evals: int = 60, max_evals: int | None = None, rtol: float = 1e-6) -> tuple[Tensor, dict]:
    """The grid of `steps` steps from sigma_max that minimises `sampler`'s median endpoint error on x.

    x: calibration start points (B, ...) at sigma_max in the scale-free state. options: the sampler's keyword
    arguments (e.g. UniPC's order). reference: the exact endpoints of x if known, else solved here with rk45
    at `rtol`. init: one more starting grid for stage 1 (e.g. `resample` of a neighbouring step count's
    grid). family_evals, max_evals: sampler runs for stage 1's Nelder-Mead and stage 2's Powell (default
    60 per step; 0 skips stage 2). Returns (grid, info): the errors of the stages, sampler runs and seconds.
    """
    from diffkit.samplers import get

    check_sampler(sampler)
    t0, run = time.perf_counter(), partial(get(sampler), **(options or {}))
    if reference is None:
        reference = ode.rk45(denoiser, x, torch.tensor([sigma_max, 1e-4, 0.0], dtype=torch.float64), rtol=rtol, atol=rtol)
    runs = 0

    def error(sigmas: Tensor | None) -> float:
        nonlocal runs
        if sigmas is None:
            return _OUTSIDE
        runs += 1
        out = run(denoiser, x, sigmas)
        err = (out - reference).reshape(len(x), -1).norm(dim=1).median().item()
        return err if np.isfinite(err) else _OUTSIDE

    if steps < 2:  # one step from sigma_max to 0: nothing to choose
        grid = torch.tensor([sigma_max, 0.0], dtype=torch.float64)
        e = error(grid)
        return grid, {"sampler_runs": runs, "family_error": e, "calibration_error": e,
                      "seconds": time.perf_counter() - t0}

    # Stage 1: one step to sigma_1, then EDM's grid to sigma_min; swept, then refined by Nelder-Mead.
    def family(p: np.ndarray) -> Tensor | None:
        s1, lo, rho = np.exp(p)
        if not (lo < s1 < sigma_max and 0.5 <= rho <= 50):
            return None
        rest = torch.tensor([s1, 0.0], dtype=torch.float64) if steps == 2 else grids.karras(steps - 1, lo, s1, rho)
        return torch.cat([torch.tensor([sigma_max], dtype=torch.float64), rest])

    sweep = [(error(family(p)), p) for p in np.log([c for c in SWEEP if c[0] < sigma_max] or
                                                  [(sigma_max / 4, sigma_max / 400, 7.0)])]
    fit = minimize(lambda p: error(family(p)), min(sweep, key=lambda s: s[0])[1], method="Nelder-Mead",
                   options={"maxfev": family_evals, "xatol": 1e-2, "fatol": 1e-4})
    start, start_error = family(fit.x), float(fit.fun)
    if init is not None and (e := error(init)) < start_error:
        start, start_error = init, e
    # Stage 2: every gap in log sigma free, from stage 1's grid.
    budget = max_evals if max_evals is not None else 60 * steps
    grid, final = start, start_error
    if budget > 0:
        result = minimize(lambda p: error(_grid(p, sigma_max)), _params(start), method="Powell",
                          options={"maxfev": budget, "xtol": 1e-3, "ftol": 1e-4})
        if result.fun < start_error:
            grid, final = _grid(result.x, sigma_max), float(result.fun)
    s1, lo, rho = np.exp(fit.x)
    return grid, {"sampler_runs": runs, "family": {"sigma_1": float(s1), "sigma_min": float(lo), "rho": float(rho)},
                  "family_error": float(fit.fun), "start_error": start_error, "calibration_error": final,
                  "seconds": time.perf_counter() - t0}
