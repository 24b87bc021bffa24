"""Sampler settings measured to go wrong at few steps, and the warning that names a better choice.

Heun's trapezoidal corrector and DPM-Solver++(3M)'s third-order extrapolation are exact for smooth, small
steps; where a grid takes long steps at high noise they do worse than the lower-order sampler at the same
number of denoiser calls, and at very few steps they fail outright. Measured on the exact mixtures
(benchmarks/results/sampler_accuracy.md, median endpoint error on EDM's rho = 7 grid from sigma 157):

- heun is worse than euler at every NFE up to 20 (10 steps) on both targets, and off by 5x to 300x at 3 to 9
  NFE; from 18 steps (35 NFE) it is better than euler. On the trained digits model heun at 9 NFE scores FD
  862 against 26 for euler (benchmarks/results/digits_quality.md).
- dpmpp_3m is worse than dpmpp_2m at every NFE from 4 to 20 on both targets, by up to 4x.

- On the digits flow-matching model, heun at 18 steps scores FD 26 on the flow's uniform-t grid from sigma 999
  and 1.6 on EDM's grid from the same sigma.

What the failures share is the largest step ratio sigma_i / sigma_{i+1} among the steps that stay above the
data's scale (sigma >= 1 for data of unit scale): 2.8 at 10 steps and 1.8 at 18 steps on the grids above,
2.3 on EDM's grid from sigma 999 at 18 steps, 63 on the uniform-t grid. The rule warns when that ratio exceeds
the sampler's limit, read off the measurements: heun 2.5 (bad at 10 steps, good at 18), dpmpp_3m 2.0 (bad at
15 steps, 2.2; as good as dpmpp_2m at 20, 1.8).
"""
from __future__ import annotations

from torch import Tensor

DATA_SCALE = 1.0
LIMITS = {  # sampler: (largest step ratio above DATA_SCALE it is measured to take well, what to use instead)
    "heun": (2.5, "dpmpp_2m (or euler)"),
    "dpmpp_3m": (2.0, "dpmpp_2m"),
}


class FewStepWarning(UserWarning):
    """A sampler and grid measured to do worse than a cheaper choice at the same NFE."""


def largest_step_ratio(sigmas: Tensor) -> float:
    """max sigma_i / sigma_{i+1} over the grid's steps that end at or above DATA_SCALE (1.0 if none)."""
    s = sigmas[:-1]
    ratios = (s[:-1] / s[1:])[s[1:] >= DATA_SCALE]
    return ratios.max().item() if len(ratios) else 1.0


def few_step_warning(sampler: str, sigmas: Tensor) -> str | None:
    """Why `sampler` on `sigmas` is a poor choice and what to use instead, or None if it is not known to be."""
    if sampler not in LIMITS:
        return None
    limit, better = LIMITS[sampler]
    ratio = largest_step_ratio(sigmas)
    if ratio <= limit:
        return None
    return (f"{sampler} on this grid ({len(sigmas) - 1} steps from sigma {sigmas[0].item():.4g}) steps sigma down "
            f"{ratio:.3g}x at once where the noise is large; {sampler} is measured to do worse than a cheaper "
            f"sampler at the same NFE there (it takes at most {limit}x well). Use {better}, more steps, or a grid "
            f"fitted to the model (`diffkit calibrate`, then --grid calibrated).")
