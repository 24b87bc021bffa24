"""Stochastic samplers in the scale-free state x = x_0 + sigma eps.

All draw their noise from a NoiseSource (diffkit.samplers.noise), so a seed gives the same sample per item
whatever the batch size. Each takes the last step to sigma = 0 as x = D(x, sigma_min), without noise.
"""
from __future__ import annotations

import math

from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.samplers.base import Callback, denoise, final_step, prepare
from diffkit.samplers.noise import resolve


def ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
         callback: Callback | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12 and 16) written in sigma.

    Dividing DDIM's update by sqrt(alpha_bar) gives x' = x0_hat + sqrt(s'^2 - c^2) eps_hat + c z with
    c = eta s' sqrt(1 - s'^2/s^2): eta = 0 is Euler in sigma, eta = 1 is DDPM's ancestral step.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"ddim needs 0 <= eta <= 1, got {eta}")
    s = prepare(x, sigmas)
    source = resolve(noise, generator) if eta > 0 else None
    for i in range(len(s) - 1):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        eps_hat = (x - x0_hat) / s[i]
        c = eta * s[i + 1] * math.sqrt(1 - (s[i + 1] / s[i]) ** 2)
        x = x0_hat + math.sqrt(s[i + 1] ** 2 - c**2) * eps_hat
        if c > 0:
            x = x + c * source(i, x, x0_hat)
    return x


def ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
         callback: Callback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2, posterior variance beta~): x' ~ q(x' | x, x0_hat).

    In sigma the posterior is N(x0_hat + (s'^2/s^2)(x - x0_hat), s'^2 (1 - s'^2/s^2)), which is DDIM with eta = 1.
    """
    return ddim(denoiser, x, sigmas, generator=generator, noise=noise, callback=callback, eta=1.0)


def euler_maruyama(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
                   callback: Callback | None = None) -> Tensor:
    """Euler-Maruyama on the reverse VE SDE dx = -d[sigma^2] grad log p + sqrt(d[sigma^2]/dt) dw (Song et al. 2021, Eq. 6).

    One step: x' = x + (s^2 - s'^2) score + sqrt(s^2 - s'^2) z, with score = (D - x)/s^2.
    """
    s = prepare(x, sigmas)
    source = resolve(noise, generator)
    for i in range(len(s) - 2):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        x = x + (1 - (s[i + 1] / s[i]) ** 2) * (x0_hat - x)
        x = x + math.sqrt(s[i] ** 2 - s[i + 1] ** 2) * source(i, x, x0_hat)
    return final_step(denoiser, x, s, callback)


def dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
                 callback: Callback | None = None, eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", §5 and App. B), midpoint form.

    With h = log(s/s'): x' = (s'/s) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + s' sqrt(1 - e^{-2 eta h}) z,
    plus the 2nd-order multistep correction. eta = 0 is DPM-Solver++(2M).
    """
    s = prepare(x, sigmas)
    source = resolve(noise, generator) if eta > 0 else None
    old, h_last = None, None
    for i in range(len(s) - 2):
        x0_hat = denoise(denoiser, x, s[i], callback, i)
        h = math.log(s[i] / s[i + 1])
        phi = -math.expm1(-(1 + eta) * h)
        x = (s[i + 1] / s[i]) * math.exp(-eta * h) * x + phi * x0_hat
        if old is not None:
            x = x + 0.5 * phi * (h / h_last) * (x0_hat - old)
        if eta > 0:
            x = x + s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * source(i, x, x0_hat)
        old, h_last = x0_hat, h
    return final_step(denoiser, x, s, callback)
