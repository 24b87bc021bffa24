"""Optimizers and the learning-rate schedule.

AdamW by default, fused into one kernel per step on CUDA and CPU (its step count stays on the device, so a
step reads nothing back to the host). With "muon", `torch.optim.Muon` (Jordan et al. 2024) updates the 2-D
hidden weight matrices and AdamW the rest (biases, norms, embeddings, and the input/output layers a net lists
in its `muon_exclude` name prefixes), as the Muon authors recommend. Nothing here re-implements Newton-Schulz.
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
FUSED_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel


def build(model: nn.Module, kind: str = "adamw", *, lr: float = 1e-3, muon_lr: float = 0.02,
          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> list[torch.optim.Optimizer]:
    """One or two optimizers over model's trainable parameters; each param group remembers its base_lr."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    excluded = tuple(getattr(getattr(model, "net", model), "muon_exclude", ()))
    inner = lambda n: n.removeprefix("net.")  # noqa: E731  (Precond wraps the net as .net)
    use_muon = [p for n, p in named if kind == "muon" and p.ndim == 2 and not inner(n).startswith(excluded)]
    ids = {id(p) for p in use_muon}
    rest = [p for _, p in named if id(p) not in ids]
    fused = bool(rest) and all(p.device.type in FUSED_DEVICES for p in rest)
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay,
                                                           fused=fused or None)]
    if use_muon:
        opts.append(torch.optim.Muon(use_muon, lr=muon_lr, weight_decay=weight_decay))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def lr_factor(step: int, *, warmup: int, total: int, cosine: bool = True) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine or total <= warmup:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
