"""Exponential moving average of a model's parameters (Polyak averaging), updated after each optimizer step.

The decay can be given as a half-life in samples, as EDM does (Karras et al. 2022, App. F.1):
beta = 0.5 ** (batch / half_life).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of `model`; `update(model)` moves it towards the model's current weights."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def decay_for_half_life(half_life_samples: float, batch: int) -> float:
        return 0.5 ** (batch / half_life_samples)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
