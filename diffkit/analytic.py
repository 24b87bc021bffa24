"""Exact denoisers: a Gaussian mixture with full covariances, and a finite dataset (EDM's ideal denoiser).

For data p_0 = sum_k w_k N(mu_k, S_k), the scale-free noised marginal is p_sigma = sum_k w_k N(mu_k, S_k + sigma^2 I)
and the exact denoiser is the posterior mean E[x_0 | x] (Tweedie's formula, Efron 2011), per component Gaussian
conditioning:

    r_k(x) ~ w_k N(x; mu_k, S_k + sigma^2 I),   D(x, sigma) = sum_k r_k [mu_k + S_k (S_k + sigma^2 I)^{-1} (x - mu_k)].

With S_k = Q_k diag(lam_k) Q_k^T precomputed, everything is diagonal in each component's eigenbasis. A finite
dataset is the case S_k = 0 with equal weights (Karras et al. 2022, App. B.3), computed without the d x d bases.
All arithmetic is float64; results come back in the input's dtype and shape (B, ...), flattened to d inside.

These sit above the samplers in the layering because the exact probability-flow solution is the `rk45`
sampler run at a tight tolerance (Dormand-Prince 8(5,3), rtol = atol = 1e-10) on the exact denoiser.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffkit.samplers.ode import rk45


def _sigma_vector(sigma: Tensor | float, batch: int) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or a ({batch},) tensor, got shape {tuple(sigma.shape)}")
    if (sigma < 0).any():
        raise ValueError("sigma must be >= 0")
    return sigma


class _Exact:
    """The shared front end: shape checks, float64, D(x, 0) = x, score, and the exact flow."""

    dim: int

    def _flatten(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"expected x of shape (B, ...) with {self.dim} values per sample, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def denoiser(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact D(x, sigma) = E[x_0 | x_0 + sigma eps = x], shape of x."""
        sigma = _sigma_vector(sigma, x.shape[0]).to(x.device)
        xf = self._flatten(x)
        d = torch.where((sigma > 0)[:, None], self._posterior_mean(xf, sigma.clamp_min(1e-300)), xf)
        return d.reshape(x.shape).to(x.dtype)

    __call__ = denoiser

    def log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_sigma(x), shape (B,)."""
        sigma = _sigma_vector(sigma, x.shape[0]).to(x.device)
        return torch.logsumexp(self.component_log_prob(x, sigma), dim=1)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """grad_x log p_sigma(x) = (D - x) / sigma^2, for sigma > 0."""
        sigma = _sigma_vector(sigma, x.shape[0]).to(x.device)
        s2 = (sigma**2).reshape(-1, *([1] * (x.ndim - 1)))
        return ((self.denoiser(x, sigma).to(torch.float64) - x.to(torch.float64)) / s2).to(x.dtype)

    def flow(self, x: Tensor, sigma_start: float, *, sigma_end: float = 1e-7, rtol: float = 1e-10) -> Tensor:
        """Endpoint at sigma = 0 of the probability-flow ODE started at x (noise level sigma_start), float64."""
        grid = torch.tensor([sigma_start, sigma_end, 0.0], dtype=torch.float64)
        return rk45(self.denoiser, x.to(torch.float64), grid, rtol=rtol, atol=rtol, method="dopri8")


class GaussianMixture(_Exact):
    """p_0 = sum_k weights_k N(means_k, covs_k) in d dimensions.

    means (K, d); covs (K, d, d) symmetric positive semi-definite, or None for point masses; weights (K,)
    summing to 1, or None for equal weights.
    """

    def __init__(self, means: Tensor, covs: Tensor | None = None, weights: Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        k, d = means.shape
        covs = torch.zeros(k, d, d, dtype=torch.float64) if covs is None else torch.as_tensor(covs, dtype=torch.float64)
        weights = torch.full((k,), 1 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be (K, d, d) = {(k, d, d)}, got {tuple(covs.shape)}")
        if weights.shape != (k,) or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-9:
            raise ValueError("weights must be (K,), non-negative, and sum to 1")
        if (covs - covs.transpose(1, 2)).abs().max() > 1e-9 * max(1.0, float(covs.abs().max())):
            raise ValueError("covs must be symmetric")
        lam, q = torch.linalg.eigh(covs)
        if (lam < -1e-9 * max(1.0, float(lam.abs().max()))).any():
            raise ValueError(f"covs must be positive semi-definite (smallest eigenvalue {lam.min().item():.3g})")
        self.means, self.covs, self.weights = means, covs, weights
        self.lam, self.q, self.dim = lam.clamp_min(0), q, d

    def _projected(self, xf: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """z = Q_k^T (x - mu_k), (B, K, d), and the variances lam_k + sigma^2, (B, K, d)."""
        z = torch.einsum("bki,kij->bkj", xf[:, None, :] - self.means.to(xf.device), self.q.to(xf.device))
        return z, self.lam.to(xf.device) + (sigma**2)[:, None, None]

    def _log_joint(self, z: Tensor, var: Tensor) -> Tensor:
        """log w_k + log N(x; mu_k, S_k + sigma^2 I), (B, K)."""
        maha = (z**2 / var).sum(-1)
        return torch.log(self.weights.to(z.device)) - 0.5 * (maha + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))

    def component_log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log w_k + log N(x; mu_k, S_k + sigma^2 I) for every component, (B, K)."""
        z, var = self._projected(self._flatten(x), _sigma_vector(sigma, x.shape[0]).to(x.device))
        return self._log_joint(z, var)

    def _posterior_mean(self, xf: Tensor, sigma: Tensor) -> Tensor:
        z, var = self._projected(xf, sigma)
        r = torch.softmax(self._log_joint(z, var), dim=1)
        # E[x_0 | x, k] = mu_k + Q_k diag(lam / (lam + sigma^2)) z_k
        shrunk = torch.einsum("kij,bkj->bki", self.q.to(xf.device), z * (self.lam.to(xf.device) / var))
        return torch.einsum("bk,bki->bi", r, self.means.to(xf.device) + shrunk)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws from p_0, (n, d) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", self.q[k], eps * self.lam[k].sqrt())

    def subset(self, components: list[int] | Tensor) -> GaussianMixture:
        """The mixture of the given components with renormalised weights (e.g. one class of a labelled mixture)."""
        idx = torch.as_tensor(components, dtype=torch.long)
        w = self.weights[idx]
        return GaussianMixture(self.means[idx], self.covs[idx], w / w.sum())

    def gaussian_flow(self, x: Tensor, sigma_start: float) -> Tensor:
        """Closed-form PF-ODE endpoint for a single Gaussian: y_i(0) = y_i(s0) sqrt(lam_i / (lam_i + s0^2)) in its eigenbasis."""
        if len(self.weights) != 1:
            raise ValueError("gaussian_flow is exact only for a single Gaussian (K = 1)")
        y = (self._flatten(x) - self.means[0]) @ self.q[0]
        y0 = y * torch.sqrt(self.lam[0] / (self.lam[0] + sigma_start**2))
        return (self.means[0] + y0 @ self.q[0].T).reshape(x.shape)


class FiniteDataset(_Exact):
    """The ideal denoiser of a finite training set (points (N, ...)): D = sum_i softmax_i(-|x - y_i|^2 / 2 sigma^2) y_i."""

    def __init__(self, points: Tensor):
        points = torch.as_tensor(points, dtype=torch.float64)
        if points.ndim < 2 or points.shape[0] == 0:
            raise ValueError(f"points must be (N, ...) with N >= 1, got shape {tuple(points.shape)}")
        self.points = points.reshape(points.shape[0], -1)
        self.dim = self.points.shape[1]

    def component_log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log (1/N) N(x; y_i, sigma^2 I) for every point, (B, N)."""
        xf = self._flatten(x)
        sigma = _sigma_vector(sigma, x.shape[0]).to(x.device)
        s2 = (sigma**2)[:, None]
        d2 = torch.cdist(xf, self.points.to(xf.device)) ** 2
        return -d2 / (2 * s2) - 0.5 * self.dim * torch.log(2 * math.pi * s2) - math.log(len(self.points))

    def _posterior_mean(self, xf: Tensor, sigma: Tensor) -> Tensor:
        d2 = torch.cdist(xf, self.points.to(xf.device)) ** 2
        return torch.softmax(-d2 / (2 * (sigma**2)[:, None]), dim=1) @ self.points.to(xf.device)


def ring(n_modes: int = 8, radius: float = 4.0, scale: tuple[float, float] = (0.05, 0.3), seed: int = 0) -> GaussianMixture:
    """The built-in 2-D target: equal-weight modes on a circle, each with a random anisotropic covariance.

    Each covariance is R diag(s1^2, s2^2) R^T with standard deviations s uniform in `scale` and a random rotation R.
    """
    g = torch.Generator().manual_seed(seed)
    angle = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes
    means = radius * torch.stack([angle.cos(), angle.sin()], 1)
    std = scale[0] + (scale[1] - scale[0]) * torch.rand(n_modes, 2, generator=g, dtype=torch.float64)
    theta = math.pi * torch.rand(n_modes, generator=g, dtype=torch.float64)
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)], -2)
    covs = rot @ torch.diag_embed(std**2) @ rot.transpose(1, 2)
    return GaussianMixture(means, covs)
