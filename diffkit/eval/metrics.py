"""Two-sample distances between sets of vectors x (N, d) and y (M, d); images are flattened.

Energy distance (Székely & Rizzo 2013) and MMD (Gretton et al. 2012, Eq. 3, unbiased) are computed exactly
from all pairs; sliced Wasserstein (Rabin et al. 2011) averages exact 1-D W2 over random directions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = x.reshape(x.shape[0], -1).to(torch.float64), y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("each sample set needs at least 2 samples")
    return x, y


def _mean_offdiag(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (within-set terms over distinct pairs); 0 iff the laws agree."""
    x, y = _pair(x, y)
    return float(2 * torch.cdist(x, y).mean() - _mean_offdiag(torch.cdist(x, x)) - _mean_offdiag(torch.cdist(y, y)))


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the RBF kernel exp(-|a - b|^2 / (2 h^2)); h defaults to the median distance of x and y."""
    x, y = _pair(x, y)
    if bandwidth is None:
        bandwidth = float(torch.cdist(torch.cat([x, y]), torch.cat([x, y])).median())
    kern = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth**2))  # noqa: E731
    return float(_mean_offdiag(kern(x, x)) + _mean_offdiag(kern(y, y)) - 2 * kern(x, y).mean())


def sliced_wasserstein(x: Tensor, y: Tensor, *, n_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """sqrt(mean over random unit directions of W2^2 between the projected sets); needs equal set sizes."""
    x, y = _pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal set sizes, got {x.shape[0]} and {y.shape[0]}")
    dirs = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs.to(x.device)).sort(0).values, (y @ dirs.to(y.device)).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())
