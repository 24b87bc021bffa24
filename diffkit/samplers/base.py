"""What every sampler shares: checking its inputs, calling the denoiser at one sigma, the callback, the last step."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.grids import check_grid

Callback = Callable[[int, Tensor, float, Tensor], None]
"""callback(i, x, sigma_i, x0_hat): called once per step, after the denoiser, before the update."""


def prepare(x: Tensor, sigmas: Tensor) -> list[float]:
    """Validate (x, grid) and return the grid as Python floats (step coefficients need no device syncs)."""
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must be a (B, ...) tensor with B >= 1: the starting noise scaled to sigmas[0]")
    check_grid(sigmas)
    return sigmas.tolist()


def denoise(denoiser: Denoiser, x: Tensor, sigma: float, callback: Callback | None = None, step: int = 0) -> Tensor:
    """D(x, sigma) with sigma given as a (B,) tensor; checks the output's shape, then reports it to the callback."""
    x0_hat = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
    if x0_hat.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {tuple(x0_hat.shape)} for input {tuple(x.shape)}")
    if callback is not None:
        callback(step, x, sigma, x0_hat)
    return x0_hat


def final_step(denoiser: Denoiser, x: Tensor, s: list[float], callback: Callback | None = None) -> Tensor:
    """The last step of a grid s (from `prepare`), from sigma_min = s[-2] to s[-1] = 0: x = D(x, sigma_min).

    It is the limit of the exponential integrators' update as h = log(s/s') -> inf, where a multistep
    correction (h / h_last) has no limit; stochastic samplers add no noise on it. The callback sees it as
    step len(s) - 2.
    """
    return denoise(denoiser, x, s[-2], callback, len(s) - 2)


class NFECounter:
    """Wrap a denoiser and count its calls (the number of function evaluations, NFE)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma)
