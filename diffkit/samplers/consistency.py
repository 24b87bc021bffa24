"""Multistep consistency sampling: denoise, re-noise to the next level, denoise again.

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 1. For a denoiser that maps any noise
level straight to data (a consistency model, a one-step generator such as SiD's), each step forgets the state
and keeps only the estimate:

    x0_hat = D(x, sigma_i),    x = x0_hat + sigma_{i+1} z,    z ~ N(0, I)

so the grid's first entry is the one-step sample and each further level trades one call for a fresh
re-noising. Unlike DDPM's posterior step (`ddim` with eta = 1) nothing of x is kept, which is what a denoiser
trained at few levels needs. The last step to sigma = 0 is x = D(x, sigma_min) without noise.
"""
from __future__ import annotations

from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.samplers.base import Callback, denoise, prepare
from diffkit.samplers.noise import resolve


def consistency(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
                callback: Callback | None = None) -> Tensor:
    """Consistency models' multistep sampler (Alg. 1) on the grid `sigmas`; NFE = len(sigmas) - 1."""
    s = prepare(x, sigmas)
    source = resolve(noise, generator)
    for i in range(len(s) - 1):
        x = denoise(denoiser, x, s[i], callback, i)
        if s[i + 1] > 0:  # re-noise to the next, lower level (Alg. 1, line 5)
            x = x + s[i + 1] * source(i, x, x)
    return x
