"""Noise sources for stochastic samplers (the `NoiseSource` contract in diffkit.contracts).

`GaussianNoise` gives each sample its own generator, seeded from (seed, index), so a sample's noise does
not depend on which batch it is drawn in (the idea of EDM's StackedRandomGenerator, Karras et al. 2022).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


def _sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


class GaussianNoise:
    """Per-sample seeded N(0, I) noise for samples `indices` (default 0..n-1) of the run with `seed`."""

    def __init__(self, seed: int, n: int | None = None, *, indices: Iterable[int] | None = None, device="cpu"):
        if (n is None) == (indices is None):
            raise ValueError("GaussianNoise needs exactly one of n or indices")
        self.indices = list(range(n)) if indices is None else list(indices)
        self.generators = [torch.Generator(device).manual_seed(_sample_seed(seed, i)) for i in self.indices]
        self.device = torch.device(device)

    def sample(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """The next draw for every sample: a (n, *shape) tensor."""
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=self.device) for g in self.generators])

    def __call__(self, step: int, x: Tensor, x0_hat: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"GaussianNoise was made for {len(self.generators)} samples, got a batch of {x.shape[0]}")
        return self.sample(tuple(x.shape[1:]), x.dtype).to(x.device)


class GeneratorNoise:
    """N(0, I) noise from one torch.Generator (or the global RNG): fast, but depends on the batch size."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, step: int, x: Tensor, x0_hat: Tensor) -> Tensor:
        g = self.generator
        device = x.device if g is None else g.device
        return torch.randn(x.shape, generator=g, dtype=x.dtype, device=device).to(x.device)


def resolve(noise, generator: torch.Generator | None):
    """The noise source a stochastic sampler uses: `noise` if given, else one built from `generator`."""
    return noise if noise is not None else GeneratorNoise(generator)
