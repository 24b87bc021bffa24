"""Exponential moving average of a model's parameters (Polyak averaging), updated after each optimizer step.

The decay can be given as a half-life in samples, as EDM does (Karras et al. 2022, App. F.1):
beta = 0.5 ** (batch / half_life). With a ramp-up ratio r > 0 (EDM's `ema_rampup_ratio`, 0.05 in EDM and
SiD), the half-life after n updates is at most r n updates, so an average that starts from an initial network
(a distilled generator starting as its teacher) forgets it in proportion to the training done so far.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of `model`; `update(model)` moves it towards the model's current weights."""

    def __init__(self, model: nn.Module, decay: float, rampup: float = 0.0):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if rampup < 0:
            raise ValueError(f"EMA ramp-up ratio must be >= 0 (0 turns it off), got {rampup}")
        self.decay, self.rampup = decay, rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def decay_for_half_life(half_life_samples: float, batch: int) -> float:
        return 0.5 ** (batch / half_life_samples)

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update (n >= 1): `decay`, or less while the ramp-up caps the half-life at r n."""
        if self.rampup == 0 or self.decay == 0:
            return self.decay
        half_life = math.log(0.5) / math.log(self.decay)  # in updates
        return 0.5 ** (1 / min(half_life, self.rampup * n))

    @torch.no_grad()
    def update(self, model: nn.Module, n: int | None = None) -> None:
        """Move towards `model`'s weights; n, the update's number from 1, is needed only with a ramp-up."""
        if self.rampup and n is None:
            raise ValueError("an EMA with a ramp-up needs the update's number n")
        ema = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1 - self.decay_at(n))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
