"""Gradient clipping by global norm (train.grad_clip: a number, inf = off, or "auto"), and its per-step log.

clip(g, tau) = g * min(1, tau/||g||) with ||g|| the norm of all gradients together (torch's
get_total_norm and clip_grads_with_norm_). Why tau = 1 is the common default (training-stack.md §3): clipping
helps only when most steps stay below tau and a few exceed it; the log shows whether that holds for a run.

"auto" clips to the 0.9 quantile of the last 200 steps' pre-clip norms (no clipping until 10 steps are
seen): a running version of AutoClip (Seetharaman et al. 2020), which clips to a percentile of all past norms.

Under FSDP the gradients are shards (DTensors); torch's norm of them reduces across the processes, so the
norm is the global one a single process computes, and every process clips by the same factor.

Every step's pre-clip norm is kept on the device and read back only at log time (`drain`): logging it
costs no host sync per step (the loop's one read per step stays its finite-step flag).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

AUTO_QUANTILE, AUTO_WINDOW, AUTO_MIN_SEEN = 0.9, 200, 10


def check(value) -> None:
    """A ValueError unless `value` is a positive number or "auto"."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"train.grad_clip must be a positive number, .inf (off) or 'auto', got {value!r}")
    elif not value > 0:
        raise ValueError(f"train.grad_clip must be > 0 (.inf turns clipping off) or 'auto', got {value}")


class Clipper:
    """Clips a model's gradients in place and remembers each step's pre-clip norm and threshold on the device."""

    def __init__(self, setting: float | str, device: torch.device):
        check(setting)
        self.auto = setting == "auto"
        self.fixed = None if self.auto else float(setting)
        self.history = torch.full((AUTO_WINDOW,), math.nan, device=device) if self.auto else None
        self.seen = 0
        self.norms: list[Tensor] = []
        self.thresholds: list[Tensor] = []

    def threshold(self, device: torch.device) -> Tensor:
        if self.seen < AUTO_MIN_SEEN:
            return torch.tensor(math.inf, device=device)
        return torch.nanquantile(self.history, AUTO_QUANTILE)

    def __call__(self, parameters) -> Tensor:
        """Clip the gradients of `parameters`; return the pre-clip global norm (a device scalar)."""
        params = [p for p in parameters if p.grad is not None]
        grads = [p.grad for p in params]
        norm = nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # gradients sharded by FSDP: reduced over the processes, replicated on each
            norm = norm.full_tensor()
        if self.auto:
            tau = self.threshold(norm.device)
            coef = (tau / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
            slot = self.seen % AUTO_WINDOW  # a non-finite norm does not enter the window
            self.history[slot] = torch.where(torch.isfinite(norm), norm, self.history[slot])
            self.seen += 1
        else:
            tau = torch.tensor(self.fixed, device=norm.device)
            nn.utils.clip_grads_with_norm_(params, self.fixed, norm)
        self.norms.append(norm.detach())
        self.thresholds.append(tau)
        return norm

    def state_dict(self) -> dict:
        """The auto threshold's window, for checkpoints: a resumed run clips as an uninterrupted one does."""
        return {"seen": self.seen, "history": None if self.history is None else self.history.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        if self.history is not None and state["history"] is not None:
            self.history.copy_(torch.tensor(state["history"]))

    def drain(self) -> dict:
        """The norms since the last drain, as log fields: every pre-clip norm, its median and max, and the
        fraction of those steps that were clipped (the one host read of the interval)."""
        norms, taus = torch.stack(self.norms).float(), torch.stack(self.thresholds).float()
        clipped = (norms > taus).float().mean()
        values = torch.cat([norms, norms.median().reshape(1), clipped.reshape(1), taus[-1:]]).tolist()
        self.norms, self.thresholds = [], []
        *per_step, median, frac, tau = values
        return {"grad_norms": per_step, "grad_norm_median": median, "grad_norm_max": max(per_step),
                "clipped_fraction": frac, "clip_threshold": tau}
