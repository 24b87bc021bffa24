"""Broadcasting a per-sample quantity against a batch: the one tensor helper every layer needs."""
from __future__ import annotations

import torch
from torch import Tensor


def per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """Reshape a scalar or (B,) tensor to (B, 1, ..., 1) so it broadcasts against x (B, ...), in x's dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"expected a scalar or a ({x.shape[0]},) tensor per sample, got shape {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))
