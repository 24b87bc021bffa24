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
    """One learned vector per class plus one for "no label" (index num_classes), for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        if labels.shape != (batch,) or labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"labels must be ({batch},) integers in [0, {self.num_classes}] ({self.num_classes} = no label)")
        return self.table(labels)
