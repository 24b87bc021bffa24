"""Samplers: plain functions `name(denoiser, x, sigmas, *, generator, noise, callback, ...) -> x_0`.

x is the starting noise already scaled to sigmas[0]; sigmas is a grid from diffkit.grids.
"""
from __future__ import annotations

import difflib
from typing import Callable

from diffkit.samplers.base import NFECounter
from diffkit.samplers.consistency import consistency
from diffkit.samplers.ode import dpmpp_2m, dpmpp_3m, euler, heun, multistep, rk45
from diffkit.samplers.sde import ddim, ddpm, dpmpp_2m_sde, euler_maruyama
from diffkit.samplers.unipc import unipc

SAMPLERS: dict[str, Callable] = {
    f.__name__: f
    for f in (euler, heun, dpmpp_2m, dpmpp_3m, multistep, unipc, rk45, ddim, ddpm, dpmpp_2m_sde, euler_maruyama,
              consistency)
}
STOCHASTIC = frozenset({"ddpm", "dpmpp_2m_sde", "euler_maruyama", "consistency"})


def get(name: str) -> Callable:
    """The sampler called `name`; an unknown name is an error that suggests the nearest ones."""
    if name not in SAMPLERS:
        near = difflib.get_close_matches(name, SAMPLERS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown sampler {name!r}.{hint} Available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "STOCHASTIC", "NFECounter", "get", *SAMPLERS]
