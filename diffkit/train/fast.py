"""Running a network fast on a device with PyTorch's own tools, for training and for sampling.

    prepare(net, device, compile=True)   channels_last weights, then torch.compile
    autocast(device)                     bf16 autocast on CUDA (a no-op elsewhere)
    FastDenoiser(denoiser, device)       D(x, sigma) for samplers: no autograd, bf16, and on CUDA one CUDA graph
                                         replayed per call (torch.compile mode="reduce-overhead")

Nothing here rewrites a layer: the nets stay as written, and the speed comes from how they are run.
torch.compile uses inductor on CUDA; elsewhere it uses "aot_eager", which traces the same forward and backward
graphs without generating code, so CPU tests check the compiled path in seconds. Pass `backend` to choose.

Why in the library, and in train/: these decide how a model runs on a device, which train/ already owns
(TrainSettings.precision and .compile); they take any nn.Module or Denoiser and import no other diffkit layer,
so the training loop, generate.py and user code can all call them. benchmarks/throughput.py is the first caller.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from diffkit.contracts import Denoiser


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; elsewhere the run stays in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compiled(fn, device: torch.device, *, graphs: bool = False, mode: str | None = None, backend: str | None = None):
    """torch.compile(fn) for fixed shapes: inductor on CUDA (in `mode`, or with CUDA graphs when `graphs`), aot_eager
    elsewhere, or `backend`."""
    if backend is None and device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead" if graphs else mode, dynamic=False)
    return torch.compile(fn, backend=backend or "aot_eager", dynamic=False)


def prepare(net: nn.Module, device: torch.device, *, compile: bool = False, graphs: bool = False,
            mode: str | None = None, backend: str | None = None) -> nn.Module:
    """net on `device` with channels_last conv weights (cuDNN's fast layout), compiled if `compile`."""
    net = net.to(device=device, memory_format=torch.channels_last)
    return compiled(net, device, graphs=graphs, mode=mode, backend=backend) if compile else net


class FastDenoiser:
    """A denoiser for samplers, run without autograd under `autocast`, compiled unless compile=False.

    On CUDA (with the default backend) each call replays one CUDA graph of the whole D(x, sigma), so a
    sampler's step costs a graph launch plus its own few elementwise ops, with no host sync. A graph's output
    lives in a buffer the next replay overwrites, so each call returns a copy: samplers that keep past
    outputs (multistep, DPM++) stay correct.
    """

    def __init__(self, denoiser: Denoiser, device: torch.device, *, compile: bool = True, backend: str | None = None):
        self.device = torch.device(device)
        self.graphs = compile and backend is None and self.device.type == "cuda"
        self.fn = compiled(denoiser, self.device, graphs=True, backend=backend) if compile else denoiser

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad(), autocast(self.device):
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new graph iteration: the last output was copied
                return self.fn(x, sigma).clone()
            return self.fn(x, sigma)
