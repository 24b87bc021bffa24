"""The gradient noise scale and the learning rate for a new batch size (training-stack.md §4).

Written by hand (no maintained library measures it). With G the true gradient and Sigma the per-sample
gradient covariance, a batch of B has E|G_B|^2 = |G|^2 + tr(Sigma)/B (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", eq. A.1), so two batch sizes give unbiased estimates (their App. A.1):

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and the simple noise scale B_noise = tr(Sigma)/|G|^2 (their eq. 2.8) is the ratio of their averages over many
pairs (each estimate is noisy; the ratio of averages is what they report).

Learning-rate rules for moving from batch B_ref at lr_ref to batch B:
- SGD: lr(B) = lr_max / (1 + B_noise/B) (McCandlish eq. 2.7): linear in B well below B_noise (Goyal et al.
  2017), flat above.
- Adam (and the sign-like Lion, Tiger, Muon): per coordinate Adam's step is m/(sqrt(v) + eps) with
  sqrt(v) ~ g_rms * sqrt(1 + B_noise/B) (g_rms^2 = |G|^2/P over P parameters), i.e. SGD with lr/(sqrt(v) + eps).
  Putting SGD's optimum through that preconditioner gives
      lr(B) proportional to (g_rms * sqrt(1 + B_noise/B) + eps) / (1 + B_noise/B).
  With eps << g_rms it is 1/sqrt(1 + B_noise/B): the square-root rule below B_noise (Malladi et al. 2022; Su,
  "How should the learning rate scale with the batch size", 2024, for SignSGD) and flat above; with
  eps >> g_rms it becomes SGD's linear rule, which is the seed's point about Adam's epsilon (Su, "How does
  Adam's epsilon affect the learning-rate scaling law", 2024). This mean-field combination is our
  derivation, not a formula quoted from those texts; it is a starting point for a sweep, not a substitute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class NoiseScale:
    b_noise: float  # tr(Sigma) / |G|^2
    grad_sq: float  # |G|^2
    trace: float  # tr(Sigma)
    params: int  # P, the number of gradient coordinates
    pairs: int

    @property
    def g_rms(self) -> float:
        return math.sqrt(max(self.grad_sq, 0.0) / self.params)


def noise_scale(grad: Callable[[int, torch.Generator], torch.Tensor], *, small: int, big: int, pairs: int,
                seed: int = 0) -> NoiseScale:
    """B_noise from `pairs` independent gradients at batch sizes `small` < `big`; grad(batch, generator) is
    the flat mean gradient over a random batch of that size."""
    if not 0 < small < big:
        raise ValueError(f"need 0 < small < big batch sizes, got small={small}, big={big}")
    gen = torch.Generator().manual_seed(seed)
    g2, trace, params = 0.0, 0.0, 0
    for _ in range(pairs):
        gs, gb = grad(small, gen).double(), grad(big, gen).double()
        ns, nb = gs.square().sum().item(), gb.square().sum().item()
        g2 += (big * nb - small * ns) / (big - small) / pairs
        trace += (ns - nb) / (1 / small - 1 / big) / pairs
        params = gs.numel()
    return NoiseScale(trace / g2 if g2 > 0 else math.inf, g2, trace, params, pairs)


def sgd_lr(lr_ref: float, b_ref: int, b_new: int, b_noise: float) -> float:
    """McCandlish eq. 2.7 moved from b_ref to b_new."""
    return lr_ref * (1 + b_noise / b_ref) / (1 + b_noise / b_new)


def adam_lr(lr_ref: float, b_ref: int, b_new: int, b_noise: float, g_rms: float, eps: float = 1e-8) -> float:
    """The epsilon-aware square-root rule of the module docstring, moved from b_ref to b_new."""
    def shape(b: int) -> float:
        ratio = 1 + b_noise / b
        return (g_rms * math.sqrt(ratio) + eps) / ratio
    return lr_ref * shape(b_new) / shape(b_ref)
