"""Probability-flow ODE samplers over a denoiser and a sigma grid.

In the scale-free state the PF-ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Eq. 3 with
s = 1, sigma(t) = t), whatever path trained the model. With lambda = -log sigma it reads
dx/dlambda = D - x, whose exact solution over one step of length h = lambda_next - lambda is

    x_next = e^{-h} x + integral_0^h e^{tau - h} D(lambda + tau) dtau.                     (*)

Euler and Heun integrate the sigma form; the DPM-Solver++ family and `multistep` integrate (*) with D
replaced by a polynomial through past denoiser outputs (Lu et al. 2022, "DPM-Solver++", §3-4).
Every sampler takes the last step to sigma = 0 as x = D(x, sigma_min), the limit of (*) as h -> inf
(`base.final_step` where the update itself has no such limit).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torchdiffeq
from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.samplers.base import Callback, denoise, final_step, prepare
from diffkit.samplers.noise import resolve


def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
          callback: Callback | None = None) -> Tensor:
    """Euler in sigma (EDM Alg. 1 with one evaluation per step). DDIM(eta=0) and flow-matching Euler are this step."""
    s = prepare(x, sigmas)
    for i in range(len(s) - 1):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        x = x0_hat + (s[i + 1] / s[i]) * (x - x0_hat)  # x + (s' - s) (x - D) / s
    return x


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
         callback: Callback | None = None, churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf,
         s_noise: float = 1.0) -> Tensor:
    """EDM's 2nd-order sampler (Karras et al. 2022, Alg. 2), deterministic unless churn > 0. NFE = 2N - 1."""
    s = prepare(x, sigmas)
    n = len(s) - 1
    source = resolve(noise, generator) if churn > 0 else None
    for i in range(n):
        # Increase noise temporarily (Alg. 2, lines 4-6).
        gamma = min(churn / n, math.sqrt(2) - 1) if churn > 0 and s_min <= s[i] <= s_max else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s[i] ** 2) * s_noise * source(i, x, x)
        # Euler step (lines 7-8).
        x0_hat = denoise(denoiser, x, s_hat, callback, i)
        d = (x - x0_hat) / s_hat
        x_next = x + (s[i + 1] - s_hat) * d
        # 2nd-order correction (lines 9-11), skipped on the last step to sigma = 0.
        if s[i + 1] > 0:
            d_next = (x_next - denoise(denoiser, x_next, s[i + 1])) / s[i + 1]
            x_next = x + (s[i + 1] - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
             callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) in the scale-free state, where alpha = 1.

    With lambda = -log sigma, step i from s to s' has h_i = log(s/s') and r_i = h_{i-1} / h_i, and

        D_i = (1 + 1/(2 r_i)) x0_hat(s) - 1/(2 r_i) x0_hat(s_last),   x' = (s'/s) x - (e^{-h_i} - 1) D_i.

    The first step is first order (D = x0_hat); the last, to sigma = 0, is x = D(x, sigma_min).
    `dpmpp_2m_sde(eta=0)` is the same update in another arrangement.
    """
    s = prepare(x, sigmas)
    x0_last, h_last = None, None
    for i in range(len(s) - 2):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        h = math.log(s[i] / s[i + 1])  # lambda(s') - lambda(s), lambda = -log sigma (Alg. 2, line 1)
        if x0_last is None:  # first step, first order (line 4)
            d = x0_hat
        else:  # linear extrapolation of the data prediction to the step's midpoint (lines 7-8)
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_last
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d  # line 9 with alpha = 1
        x0_last, h_last = x0_hat, h
    return final_step(denoiser, x, s, callback)


def _phi_moments(h: float, k: int) -> np.ndarray:
    """M_m = integral_0^h e^{tau-h} tau^m dtau for m < k, by M_0 = 1 - e^{-h}, M_m = h^m - m M_{m-1}."""
    m = np.empty(k)
    m[0] = -math.expm1(-h)
    for j in range(1, k):
        m[j] = h**j - j * m[j - 1]
    return m


def _adams_weights(taus: list[float], h: float) -> list[float]:
    """Weights w_j with integral_0^h e^{tau-h} P(tau) dtau = sum_j w_j D_j, P the Lagrange polynomial through (taus_j, D_j)."""
    moments = _phi_moments(h, len(taus))
    weights = []
    for j, tj in enumerate(taus):
        others = [tk for k, tk in enumerate(taus) if k != j]
        basis = np.atleast_1d(np.poly(others)) / np.prod([tj - tk for tk in others])  # highest power first
        weights.append(float(np.dot(basis[::-1], moments)))
    return weights


def multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
              callback: Callback | None = None, order: int = 3) -> Tensor:
    """Exponential Adams-Bashforth of any order: (*) with D interpolated through the last `order` outputs.

    The interpolating polynomial in lambda is integrated exactly (Hochbruck & Ostermann 2010, §2.4; the data-
    prediction form of DPM-Solver++, Lu et al. 2022, Eq. 9). Order 3 is DPM-Solver++(3M); the first steps
    warm up with lower orders, and the last step is x = D.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    s = prepare(x, sigmas)
    history: list[tuple[float, Tensor]] = []  # (lambda_j, D_j), newest first
    for i in range(len(s) - 2):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        lam = -math.log(s[i])
        history = [(lam, x0_hat)] + history[: order - 1]
        h = math.log(s[i] / s[i + 1])
        weights = _adams_weights([lj - lam for lj, _ in history], h)
        x = (s[i + 1] / s[i]) * x + sum(w * d for w, (_, d) in zip(weights, history))
    return final_step(denoiser, x, s, callback)


def dpmpp_3m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
             callback: Callback | None = None) -> Tensor:
    """Third-order multistep exponential integrator (DPM-Solver++(3M)): `multistep` with order 3."""
    return multistep(denoiser, x, sigmas, callback=callback, order=3)


def rk45(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
         callback: Callback | None = None, rtol: float = 1e-8, atol: float = 1e-8, method: str = "dopri5") -> Tensor:
    """Adaptive Runge-Kutta reference (Dormand-Prince via torchdiffeq) on dx/du = x - D(x, e^u), u = log sigma.

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the grid's other entries are not
    used), then takes the final step x = D. Wrap the denoiser in NFECounter to read its NFE.

    The step size is chosen over the whole batch, so a row that is not finite would stall it: such rows are an
    error here. The fixed-grid samplers do not check (it would read the batch back on every call); a NaN row
    stays NaN there and leaves the other rows unchanged.
    """
    s = prepare(x, sigmas)
    s_end = s[-2]
    bad = (~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rk45 needs finite start points; rows {bad[:10]}{' ...' if len(bad) > 10 else ''} hold NaN "
                         "or inf (drop them, or use a fixed-grid sampler, which carries them through)")

    def field(u: Tensor, y: Tensor) -> Tensor:
        return y - denoise(denoiser, y, math.exp(float(u)))

    if s_end < s[0]:
        u = torch.tensor([math.log(s[0]), math.log(s_end)], dtype=torch.float64)
        x = torchdiffeq.odeint(field, x, u, rtol=rtol, atol=atol, method=method)[-1]
    return final_step(denoiser, x, s, callback)
