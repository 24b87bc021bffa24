"""Sampling grids: 1-D float64 tensors of strictly decreasing sigmas that end with 0.

A grid of n steps has n + 1 entries. The samplers take the last step to sigma = 0 themselves.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffkit.paths import Path

SPACINGS = ("leading", "trailing", "linspace")


def check_grid(sigmas: Tensor) -> None:
    """Raise a ValueError that says what is wrong unless sigmas is a valid grid."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("a sigma grid must be a 1-D tensor with at least 2 entries (build one with diffkit.grids)")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigma grid has non-finite entries: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigma grid has negative entries (sigma must be >= 0): {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigma grid must be strictly decreasing: {sigmas.tolist()}")
    if sigmas[-1] != 0:
        raise ValueError(f"sigma grid must end with 0, got last entry {sigmas[-1].item()}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's grid (Karras et al. 2022, Eq. 5): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    if n < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras needs n >= 1 and 0 < sigma_min < sigma_max, got {n}, {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min if n > 1 else sigma_max  # exact ends, free of pow round-off
    return _append_zero(sigmas)


def uniform_t(path: Path, n: int, t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """n steps uniform in the path's own time, from t_max down to t_min (defaults: the path's range)."""
    t_min = path.t_min if t_min is None else t_min
    t_max = path.t_max if t_max is None else t_max
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64) if n > 1 else torch.tensor([t_max], dtype=torch.float64)
    return _append_zero(path.sigma(t))


def uniform_t_to_zero(path: Path, n: int, t_max: float) -> Tensor:
    """n equal steps in the path's time from t_max to t = 0, the last one included (t_max (n - i) / n, then 0).

    The times a k-step distilled flow is trained at and sampled on with Euler (Liu et al. 2022, §2.3)."""
    return uniform_t(path, n, t_min=t_max / n, t_max=t_max)


def log_snr_uniform(path: Path, n: int, sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """n steps uniform in log-SNR = -2 log sigma (geometric in sigma); the same for every path."""
    lo = path.sigma_min if sigma_min is None else sigma_min
    hi = path.sigma_max if sigma_max is None else sigma_max
    if n == 1:
        return _append_zero(torch.tensor([hi], dtype=torch.float64))
    return _append_zero(torch.logspace(np.log10(hi), np.log10(lo), n, dtype=torch.float64))


NAMED = ("karras", "uniform_t", "log_snr", "distill")


def named(name: str, path: Path, n: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The grid a run's config names (`sample.grid`), n steps from sigma_max towards sigma_min.

    "distill" is `uniform_t_to_zero` from sigma_max: it ends with a full step to 0 instead of at sigma_min."""
    if name == "karras":
        return karras(n, sigma_min, sigma_max, rho)
    if name == "uniform_t":
        return uniform_t(path, n, float(path.t(sigma_min)), float(path.t(sigma_max)))
    if name == "log_snr":
        return log_snr_uniform(path, n, sigma_min, sigma_max)
    if name == "distill":
        return uniform_t_to_zero(path, n, float(path.t(sigma_max)))
    raise ValueError(f"unknown sample.grid {name!r}; choose {', '.join(NAMED[:-1])} or {NAMED[-1]}")


def discrete_timesteps(n: int, spacing: str = "leading", num_train: int = 1000, steps_offset: int = 0) -> Tensor:
    """Integer training timesteps (descending) that diffusers' DDIM/DDPM schedulers pick for n steps."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (num_train // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / n)) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return torch.from_numpy(ts.astype(np.int64).copy())


def discrete(alphas_cumprod: Tensor, n: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """The sigma grid of a discrete-time model at diffusers' timesteps: sigma = sqrt((1 - abar) / abar), then 0."""
    ts = discrete_timesteps(n, spacing, len(alphas_cumprod), steps_offset)
    abar = alphas_cumprod.to(torch.float64)[ts]
    return _append_zero(torch.sqrt((1 - abar) / abar))
