"""DDCM: compress an image with a trained diffusion model and a seeded codebook of noises, no extra training.

Ohayon, Manor, Michaeli & Elad, "Compressed Image Generation with Denoising Diffusion Codebook Models", ICML 2025,
Sec. 3-4. DDPM's ancestral sampler (DDIM with eta = 1) adds fresh Gaussian noise at every step but the last;
DDCM draws that noise instead from a codebook C_i = {z_i^1 .. z_i^K} of K standard-normal vectors, fixed by a
seed and the step index i (derived, never stored). Sampling with random indices is compressed generation
(Sec. 3); encoding an image x_0 picks at each step the code best aligned with what is still missing,

    k_i = argmax_k <z_i^k, x_0 - x0_hat(x_i)>                                      (Sec. 4.1)

and the indices are the bitstream: decoding replays the same chain with them. Matching pursuit (Sec. 4.3)
spends M atoms per step: after the first, each further atom k mixes in as

    z <- (sqrt(c) z + sqrt(1 - c) z_i^k) / rms(.)      c from a grid of 2^C levels, (j + 1) / 2^C

where c = 1 (the top level) leaves z unchanged, so an atom that would not raise the inner product costs its
bits but changes nothing. Rate: (T - 1) (M log2 K + (M - 1) C) bits per tile for T sampler steps.

In diffkit the codec is a NoiseSource (diffkit.contracts): the unchanged `ddpm` sampler calls it with its step
index and x0_hat, so DDCM works with every denoiser the samplers take, whatever its path: in the scale-free state
the ancestral step of every path is the same formula. The starting noise x_T is fixed by the seed, not coded.

Determinism: codebooks come from a CPU torch.Generator seeded by (seed, step) through numpy's SeedSequence, and
are moved to the model's device afterwards, so every machine makes the same codes. Tiles run through the model
in chunks of CHUNK (the last padded with copies of its last tile), so a tile's computation is the same whether
one image or many are coded, and decoding repeats the encoder's arithmetic exactly on the same device and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffkit.samplers.sde import ddpm

CHUNK = 16  # tiles per denoiser call


@dataclass(frozen=True)
class Settings:
    """What a decoder needs besides the model: codebook size K (a power of two), atoms M, coefficient bits C,
    sampler steps T, and the codebook seed."""

    k: int = 256
    atoms: int = 1
    coef_bits: int = 0
    steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.k < 2 or self.k > 2 ** 16 or self.k & (self.k - 1):
            raise ValueError(f"K must be a power of two from 2 to 65536, got {self.k}")
        if not 1 <= self.atoms <= 16:
            raise ValueError(f"atoms (M) must be in 1..16, got {self.atoms}")
        if not 0 <= self.coef_bits <= 8 or (self.atoms > 1 and self.coef_bits == 0):
            raise ValueError(f"coefficient bits (C) must be in 0..8, and at least 1 with more than one atom; got "
                             f"{self.coef_bits}")
        if not 2 <= self.steps <= 4096:
            raise ValueError(f"steps must be in 2..4096 (the first T - 1 of them are coded), got {self.steps}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2^32), got {self.seed}")

    @property
    def bits_per_step(self) -> int:
        return self.atoms * int(math.log2(self.k)) + (self.atoms - 1) * self.coef_bits

    def bits_per_tile(self) -> int:
        return (self.steps - 1) * self.bits_per_step


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def codebook(settings: Settings, step: int, shape: tuple[int, ...], device, dtype=torch.float32) -> Tensor:
    """The K codes (K, D) of sampler step `step` for tiles of `shape` (D = prod(shape)): N(0, I) from a CPU
    generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(_seed(settings.seed, 1, step))
    return torch.randn((settings.k, math.prod(shape)), generator=g).to(device=device, dtype=dtype)


def start_noise(settings: Settings, shape: tuple[int, ...], n: int, device, dtype=torch.float32) -> Tensor:
    """x_T / sigma_max for n tiles: the same seeded N(0, I) for every tile (not coded)."""
    g = torch.Generator().manual_seed(_seed(settings.seed, 0))
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype).expand(n, *shape).clone()


def coefficient(j: Tensor | int, coef_bits: int):
    """The mixing weight c of level j: (j + 1) / 2^C (the top level, c = 1, keeps z)."""
    return (j + 1) / 2 ** coef_bits


def mix(z: Tensor, new: Tensor, c: Tensor) -> Tensor:
    """(sqrt(c) z + sqrt(1 - c) new), rescaled to unit root-mean-square per row; z, new (B, D), c (B,)."""
    w = c.sqrt()[:, None] * z + (1 - c).sqrt()[:, None] * new
    return w / w.pow(2).mean(1, keepdim=True).sqrt()


class Encoder:
    """The NoiseSource that encodes `target` (B, *shape) x_0 tiles: it picks each step's codes (module docstring)
    and records them in `indices` (B, T - 1, M) and `levels` (B, T - 1, M - 1)."""

    def __init__(self, target: Tensor, settings: Settings):
        self.target, self.s = target.flatten(1), settings
        n, m = len(target), settings.atoms
        self.shape = tuple(target.shape[1:])
        self.indices = torch.zeros((n, settings.steps - 1, m), dtype=torch.long)
        self.levels = torch.zeros((n, settings.steps - 1, max(m - 1, 0)), dtype=torch.long)

    def __call__(self, step: int, x: Tensor, x0_hat: Tensor) -> Tensor:
        codes = codebook(self.s, step, self.shape, x.device, x.dtype)
        residual = self.target.to(x.dtype) - x0_hat.flatten(1)
        score = residual @ codes.T  # (B, K): <z^k, x_0 - x0_hat>
        k = score.argmax(1)
        z = codes[k]
        self.indices[:, step, 0] = k.cpu()
        if self.s.atoms > 1:
            c = coefficient(torch.arange(2 ** self.s.coef_bits, device=x.device, dtype=x.dtype), self.s.coef_bits)
            for m in range(1, self.s.atoms):
                # <mix(z, z^k, c), r> for every (k, c) in closed form: |w|^2 = c|z|^2 + (1-c)|z^k|^2 + 2 sqrt(c(1-c)) <z, z^k>
                zr, kr = (z * residual).sum(1), score
                zz, kk, zk = z.pow(2).sum(1), codes.pow(2).sum(1), z @ codes.T
                a, b = c.sqrt()[None, :, None], (1 - c).sqrt()[None, :, None]
                inner = a * zr[:, None, None] + b * kr[:, None, :]
                norm = (a ** 2 * zz[:, None, None] + b ** 2 * kk[None, None, :] + 2 * a * b * zk[:, None, :]).sqrt()
                best = (inner / norm).flatten(1).argmax(1)  # over (level, code); ties keep the first
                j, k = best // self.s.k, best % self.s.k
                z = mix(z, codes[k], coefficient(j.to(x.dtype), self.s.coef_bits))
                self.indices[:, step, m], self.levels[:, step, m - 1] = k.cpu(), j.cpu()
        return z.reshape(x.shape)


class Decoder:
    """The NoiseSource that replays recorded `indices` (B, T - 1, M) and `levels` (B, T - 1, M - 1); with random
    indices it is compressed generation."""

    def __init__(self, indices: Tensor, levels: Tensor, settings: Settings, shape: tuple[int, ...]):
        self.indices, self.levels, self.s, self.shape = indices, levels, settings, shape

    def __call__(self, step: int, x: Tensor, x0_hat: Tensor) -> Tensor:
        codes = codebook(self.s, step, self.shape, x.device, x.dtype)
        k = self.indices[:, step].to(x.device)
        z = codes[k[:, 0]]
        for m in range(1, self.s.atoms):
            c = coefficient(self.levels[:, step, m - 1].to(device=x.device, dtype=x.dtype), self.s.coef_bits)
            z = mix(z, codes[k[:, m]], c)
        return z.reshape(x.shape)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def _pad(t: Tensor) -> Tensor:
    """A chunk padded to CHUNK rows with copies of its last row."""
    return torch.cat([t, t[-1:].expand(CHUNK - len(t), *t.shape[1:])]) if len(t) < CHUNK else t


@torch.no_grad()
def encode(denoiser, tiles: Tensor, sigmas: Tensor, settings: Settings, *, progress=None) -> tuple[Tensor, Tensor,
                                                                                                    Tensor]:
    """(indices (N, T - 1, M), levels (N, T - 1, M - 1), reconstruction (N, *shape)) of tiles (N, *shape) in
    [-1, 1], with the ddpm sampler on `sigmas` (T + 1 values ending at 0). progress: called after each chunk."""
    if len(sigmas) != settings.steps + 1:
        raise ValueError(f"the grid has {len(sigmas) - 1} steps but the settings say {settings.steps}")
    out = [], [], []
    for a, b in _chunks(len(tiles)):
        chunk = _pad(tiles[a:b])
        source = Encoder(chunk, settings)
        x = sigmas[0].item() * start_noise(settings, tuple(chunk.shape[1:]), CHUNK, chunk.device, chunk.dtype)
        x = ddpm(denoiser, x, sigmas, noise=source)
        for part, value in zip(out, (source.indices, source.levels, x)):
            part.append(value[:b - a])
        if progress is not None:
            progress(b - a)
    return tuple(torch.cat(part) for part in out)


@torch.no_grad()
def decode(denoiser, indices: Tensor, levels: Tensor, sigmas: Tensor, settings: Settings, shape: tuple[int, ...],
           *, device, dtype=torch.float32, progress=None) -> Tensor:
    """The tiles (N, *shape) that `encode` reconstructed from these indices and levels."""
    out = []
    for a, b in _chunks(len(indices)):
        source = Decoder(_pad(indices[a:b]), _pad(levels[a:b]), settings, shape)
        x = sigmas[0].item() * start_noise(settings, shape, CHUNK, device, dtype)
        out.append(ddpm(denoiser, x, sigmas, noise=source)[:b - a])
        if progress is not None:
            progress(b - a)
    return torch.cat(out)


def generate(denoiser, n: int, sigmas: Tensor, settings: Settings, shape: tuple[int, ...], *, device,
             generator: torch.Generator | None = None) -> Tensor:
    """Compressed generation (Sec. 3): n samples from uniformly random indices, the decoder's own code path."""
    m = settings.atoms
    indices = torch.randint(settings.k, (n, settings.steps - 1, m), generator=generator)
    levels = torch.randint(2 ** settings.coef_bits, (n, settings.steps - 1, max(m - 1, 0)), generator=generator)
    return decode(denoiser, indices, levels, sigmas, settings, shape, device=device)
