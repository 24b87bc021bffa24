"""Gradient checkpointing for a net's blocks: keep only each block's inputs in the forward pass and recompute
its activations in the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

One extra forward per step buys activation memory of about one block plus the blocks' inputs instead of every
block's intermediates. `torch.utils.checkpoint` does the work (training-stack.md §11): non-reentrant, as torch
recommends, and with the RNG state preserved, so dropout draws the same mask when a block is recomputed and the
gradients equal the plain ones. A module that counts what its forward sees (an MoE layer's expert loads) asks
`recomputing()` so that the backward pass's second forward is not counted again.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_state = threading.local()


def recomputing() -> bool:
    """Whether the forward running now is a checkpointed block's recomputation in the backward pass."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recompute():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _contexts():
    return contextlib.nullcontext(), _recompute()  # (the first forward, the recomputation)


def run_block(block: nn.Module, enabled: bool, *args: Tensor) -> Tensor:
    """block(*args), checkpointed when `enabled` and gradients are being recorded (a no-grad forward has no
    activations to save, so it runs the block plainly)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)
    return block(*args)
