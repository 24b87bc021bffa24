"""Embeddings of the scalar noise condition and of class labels, shared by every backbone."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierEmbedding(nn.Module):
    """Fixed random Fourier features [cos(2 pi f c), sin(2 pi f c)] of a scalar, f ~ N(0, scale^2).

    Gaussian Fourier features (Tancik et al. 2020), as NCSN++ embeds its noise level (Song et al. 2021, App. H).
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding needs an even dim, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        angle = 2 * math.pi * c.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """One learned vector per class plus one for "no label" (index num_classes), for classifier-free guidance.

    Only the labels' shape and dtype are checked here: checking their values would read them back to the host on
    every call (a sync on CUDA, a graph break under torch.compile). Values are checked once where data enters
    (train.loop) or a label is chosen (generate.sample).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be ({batch},) integers in [0, {self.num_classes}] ({self.num_classes} = no label), "
                             f"got {tuple(labels.shape)} {labels.dtype}")
        return self.table(labels)


class Conditioning(nn.Module):
    """(c_noise, labels, extra scalars) -> one (B, dim) vector that every block of an image backbone reads.

    c_noise and each extra scalar (e.g. the step size d of shortcut models, Frans et al. 2024) get Fourier
    features, concatenated and mapped by a two-layer MLP, as DDPM maps its timestep (Ho et al. 2020, App. B);
    the label embedding is added after the MLP, as in ADM (Dhariwal & Nichol 2021). Blocks apply SiLU to it.
    """

    def __init__(self, dim: int, *, features: int, num_classes: int = 0, extra_scalars: int = 0):
        super().__init__()
        self.extra_scalars = extra_scalars
        self.fourier = FourierEmbedding(features)
        self.mlp = nn.Sequential(nn.Linear((1 + extra_scalars) * features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = LabelEmbedding(num_classes, dim) if num_classes else None

    def forward(self, c_noise: Tensor, cond: Tensor | None, extra: Tensor | None, batch: int) -> Tensor:
        if self.labels is None and cond is not None:
            raise ValueError("this net is unconditional (num_classes=0): pass cond=None, or build it with num_classes")
        if self.extra_scalars and (extra is None or extra.shape != (batch, self.extra_scalars)):
            got = None if extra is None else tuple(extra.shape)
            raise ValueError(f"extra must be a ({batch}, {self.extra_scalars}) tensor of extra scalars, got {got}")
        if not self.extra_scalars and extra is not None:
            raise ValueError("this net takes no extra scalars (extra_scalars=0): pass extra=None")
        scalars = c_noise.expand(batch).reshape(batch, 1)
        if extra is not None:
            scalars = torch.cat([scalars, extra.to(scalars.dtype)], dim=1)
        e = self.mlp(self.fourier(scalars).reshape(batch, -1))
        return e if self.labels is None else e + self.labels(cond, batch)
