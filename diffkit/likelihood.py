"""Exact log-likelihood of any diffusion or flow model by its probability-flow ODE, and bits per dimension.

Every diffkit model is a denoiser D(x, sigma) in the scale-free state x = x_0 + sigma eps, whatever path trained
it, and its probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (see diffkit.samplers.ode). In
u = log sigma it reads dx/du = f(x, u) = x - D(x, e^u), which is what we integrate, as the `rk45` sampler does: a
likelihood spans many decades of sigma, and in u the solver's steps stay of one scale over all of them.

The ODE carries the model's density p_sigma along with x, so by the instantaneous change of variables (Chen et al.
2018, "Neural ODEs", Thm. 1) d log p_u(x(u)) / du = -div f = -(d - tr dD/dx), with d the dimension. Integrating
from sigma_min, where x(u_min) is the data point, up to sigma_max gives (Song et al. 2021, "Score-Based Generative
Modeling through SDEs", App. D.2)

    log p_{sigma_min}(x) = log p_{sigma_max}(x(u_max)) + integral_{u_min}^{u_max} (d - tr dD/dx(x(u), e^u)) du,

with p_{sigma_max} replaced by the prior N(0, sigma_max^2 I). We solve the joint ODE for (x, delta), delta the
integral, with torchdiffeq. The trace is exact (one vector-Jacobian product per dimension) or Hutchinson's
estimate v^T (dD/dx) v with Rademacher probes v (Hutchinson 1989; Grathwohl et al. 2019, "FFJORD"), the same
probes for the whole solve, so the estimate of log p is unbiased. Each vector-Jacobian product is taken per batch
entry, so each sample's trace is its own as long as the denoiser treats samples independently (no batch statistics).

`bits_per_dim` turns this into the figure papers report for integer-valued data, under uniform dequantization.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torchdiffeq
from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.data import dequantize, dequantized_bits
from diffkit.samplers.base import denoise

Prior = Callable[[Tensor], Tensor]
"""prior(x) -> log-density (B,) at sigma_max of x (B, ...); the default is log N(x; 0, sigma_max^2 I)."""


def _trace(x0_hat: Tensor, x: Tensor, vectors: Tensor, *, average: bool) -> Tensor:
    """sum_n (or mean_n) of v_n^T (dD/dx) v_n per sample, (B,), for vectors (N, B, ...): one VJP per vector."""
    if not x0_hat.requires_grad:
        raise ValueError("the denoiser's output does not depend on x through autograd: log_likelihood "
                         "differentiates it, so call it outside torch.no_grad / inference_mode and without CUDA graphs")
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for n, v in enumerate(vectors):
        (vjp,) = torch.autograd.grad(x0_hat, x, v, retain_graph=n < len(vectors) - 1)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / len(vectors) if average else total


def _probes(x: Tensor, divergence: str, probes: int, generator: torch.Generator | None) -> Tensor:
    """The basis e_1..e_d (exact trace), or `probes` Rademacher vectors per sample (Hutchinson), (N, B, ...)."""
    if divergence == "exact":
        d = x[0].numel()
        return torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    device = x.device if generator is None else generator.device
    signs = torch.randint(0, 2, (probes, *x.shape), generator=generator, device=device).to(x.device, x.dtype)
    return 2 * signs - 1


def log_likelihood(denoiser: Denoiser, x: Tensor, *, sigma_min: float, sigma_max: float,
                   divergence: Literal["exact", "hutchinson"] = "exact", probes: int = 1,
                   generator: torch.Generator | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                   prior: Prior | None = None) -> Tensor:
    """log p_{sigma_min}(x) in nats, (B,), of the model's probability-flow density, for x (B, ...).

    x is in the scale-free state at noise level sigma_min (data in [-1, 1] for images). The ODE runs from
    sigma_min to sigma_max, where the prior N(0, sigma_max^2 I) stands for p_{sigma_max}: that is accurate when
    sigma_max is large against the data's mean and spread (for data of mean m and per-dimension variance v the
    error is about |m| / sigma_max + sqrt(d) v / sigma_max^2 nats); `prior` replaces it with any log-density at
    sigma_max. divergence="exact" costs d vector-Jacobian products per denoiser call (for small d); "hutchinson"
    costs `probes` of them, with Rademacher probes drawn once from `generator` and reused along the solve; its
    estimate of log p is unbiased, its standard deviation falls as 1 / sqrt(probes). rtol and atol go to
    torchdiffeq's dopri5.

    Any Precond model is a denoiser, whatever its path. A conditional model is passed as a closure that binds the
    condition, e.g. `lambda x, sigma: model(x, sigma, labels)` with labels (B,): the batch size never changes
    inside. The denoiser must be differentiable in x; no gradient reaches its parameters or x, and the result
    is detached.
    """
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must be a (B, ...) tensor with B >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    vectors = _probes(x, divergence, probes, generator)
    d = x[0].numel()

    def field(u: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            x0_hat = denoise(denoiser, y, math.exp(float(u)))
            trace = _trace(x0_hat, y, vectors, average=divergence == "hutchinson")
        # dx/du = x - D and d(delta)/du = div_x (x - D) = d - tr dD/dx (Song et al. 2021, App. D.2)
        return (y - x0_hat).detach(), (d - trace).detach()

    u = torch.tensor([math.log(sigma_min), math.log(sigma_max)], dtype=torch.float64)
    delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        # torchdiffeq's first-step guess divides by |f| at sigma_min, about 0 where the model barely denoises
        # (D(x) ~ x), and then evaluates e^u far past sigma_max; a small first step, grown by the controller, is safe.
        options = {"first_step": 1e-3 * float(u[1] - u[0])}
        x_end, delta = (s[-1] for s in torchdiffeq.odeint(field, (x.detach(), delta0), u, rtol=rtol, atol=atol,
                                                           options=options))
        if prior is None:  # log N(x_end; 0, sigma_max^2 I)
            var = sigma_max**2
            log_prior = -0.5 * (x_end.flatten(1).pow(2).sum(1) / var + d * math.log(2 * math.pi * var))
        else:
            log_prior = prior(x_end)
    return (log_prior + delta).detach()


def bits_per_dim(denoiser: Denoiser, x: Tensor, *, levels: int, sigma_min: float, sigma_max: float, draws: int = 1,
                 divergence: Literal["exact", "hutchinson"] = "exact", probes: int = 1,
                 generator: torch.Generator | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                 prior: Prior | None = None) -> Tensor:
    """Bits per dimension of integer-valued data under uniform dequantization, (B,), for x (B, ...) on the grid.

    x is the data as diffkit's loaders scale it: integers k in {0, ..., L-1}^D (L = `levels`) mapped to
    x_k = delta k - 1 with delta = 2 / (L - 1), so x_k spans [-1, 1]. That is x = k / 8 - 1 for the 8x8 digits
    (L = 17, values 0..16) and x = k / 127.5 - 1 for 8-bit images (L = 256).

    What is counted. The model's continuous density p (= p_{sigma_min}, from `log_likelihood`) gives each integer
    vector k the mass of its cell, P(k) = integral of p over x_k + delta [-1/2, 1/2)^D. Writing x = x_k + delta w,
    w uniform on [-1/2, 1/2)^D, and applying Jensen's inequality (uniform dequantization: Theis et al. 2016,
    "A note on the evaluation of generative models"; Ho et al. 2019, "Flow++", §3.1),

        log P(k) = D log delta + log E_w[p(x_k + delta w)] >= D log delta + E_w[log p(x_k + delta w)].

    D log delta is the Jacobian of the scaling y = (x + 1) / delta into units of the integer grid, so the bound is
    E_w[log q(k + w)] with q the density of the dequantized data y = k + w. The result is

        bits/dim = -(log p(x_k + delta w) + D log delta) / (D ln 2)
                 = -log p(x_k + delta w) / (D ln 2) + log2((L - 1) / 2),

    averaged over `draws` independent draws of w per sample (default 1, as is usual for a test set): an unbiased
    estimate of an upper bound on the discrete -log2 P(k) / D, and so comparable with papers' figures. (Papers
    that scale by 2 / L instead, x = 2 (k + w) / L - 1, add log2(L / 2), 7 for 8-bit data where we add 6.994;
    both are bounds on the same kind of quantity, for the bins each places.) The cells reach delta / 2 beyond
    [-1, 1]. Noise draws and Hutchinson probes come from `generator`; the other options go to `log_likelihood`.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    log_p = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(draws):  # one batch per draw, so a closure binding per-sample conditions still fits
        log_p = log_p + log_likelihood(denoiser, dequantize(x, levels=levels, generator=generator),
                                       sigma_min=sigma_min, sigma_max=sigma_max, divergence=divergence,
                                       probes=probes, generator=generator, rtol=rtol, atol=atol, prior=prior)
    return dequantized_bits(log_p / draws, dims=x[0].numel(), levels=levels)
