"""The few types every diffkit module agrees on, and the time convention, stated once.

Time convention: a path moves data to noise as t goes 0 -> 1, x_t = alpha(t) x_0 + beta(t) eps.
Samplers work in the scale-free state x = x_t / alpha = x_0 + sigma eps (EDM, Karras et al. 2022, §2),
indexed by sigma = beta / alpha, which decreases to 0 along a sampling grid.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


class Denoiser(Protocol):
    """D(x, sigma) -> estimate of x_0, for x (B, ...) in the scale-free state and sigma (B,)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


class ConditionalDenoiser(Protocol):
    """D(x, sigma, cond) -> estimate of x_0; cond is (B, ...) or None for the unconditional model."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor: ...


class NoiseSource(Protocol):
    """Standard-normal noise for stochastic samplers.

    Called once per stochastic step with the step index, the current state and the denoiser's estimate;
    returns noise shaped like x. Gaussian sources ignore x and x0_hat; a compression codec (DDCM) uses them
    to choose its noise from a codebook.
    """

    def __call__(self, step: int, x: Tensor, x0_hat: Tensor) -> Tensor: ...


@runtime_checkable
class StepHooks(Protocol):
    """A module that takes part in the training step beyond its forward (a mixture-of-experts layer).

    The training loop adds `aux_loss()` (the training forwards' auxiliary loss since the last call, or None) to
    the objective, calls `after_step(applied)` after each optimizer step (applied: whether it stepped or skipped
    a non-finite step), and merges `drain()` into each metrics row, prefixed with the module's name."""

    def aux_loss(self) -> Tensor | None: ...

    def after_step(self, applied: bool) -> None: ...

    def drain(self) -> dict: ...
