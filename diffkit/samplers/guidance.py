"""Guidance as denoiser -> denoiser wrappers; the samplers never know about it.

Scale convention, stated once: w = 1 is the plain conditional model and w = 0 the unconditional one.
Classifier-free guidance (Ho & Salimans 2022) samples p(x)^(1-w) p(x|c)^w at every sigma:

    D_w = D_u + w (D_c - D_u)

(the paper's guidance strength is w - 1; diffusers' `guidance_scale` is this w). Because D = x + sigma^2
grad log p, the same line holds for scores, eps and velocities. Classifier guidance (Dhariwal & Nichol
2021, §4) adds scale * grad_x log p(c | x, sigma) to the score: D_s = D + scale sigma^2 grad log p(c | x).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffkit._tensor import per_sample
from diffkit.contracts import ConditionalDenoiser, Denoiser


class ClassifierFree:
    """D_w(x, sigma) = D(x, sigma, null) + w (D(x, sigma, cond) - D(x, sigma, null)), one batched call.

    cond: (B, ...) conditions; null: the "no condition" value the model was trained with under label dropout,
    shaped like cond.
    """

    def __init__(self, denoiser: ConditionalDenoiser, cond: Tensor, null: Tensor, w: float):
        if cond.shape != null.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and null {tuple(null.shape)} must have the same shape")
        self.denoiser, self.cond, self.null, self.w = denoiser, cond, null, w

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.shape[0] != self.cond.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} does not match {self.cond.shape[0]} conditions")
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.cond, self.null]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + self.w * (d_cond - d_uncond)


class ClassifierGuided:
    """D_s(x, sigma) = D(x, sigma) + scale sigma^2 grad_x log p(c | x, sigma).

    log_prob(x, sigma) -> (B,) is a noise-aware classifier's log-probability of the wanted classes.
    """

    def __init__(self, denoiser: Denoiser, log_prob: Callable[[Tensor, Tensor], Tensor], scale: float):
        self.denoiser, self.log_prob, self.scale = denoiser, log_prob, scale

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x_in, sigma).sum(), x_in)
        return self.denoiser(x, sigma) + self.scale * per_sample(sigma, x) ** 2 * grad
