"""The spectral parametrization (train.parametrization = "spectral"): per-layer init and lr multipliers.

The spectral condition for feature learning (Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature
Learning", Condition 1): every weight matrix W of fan-in n_in and fan-out n_out, and every update dW, should
have spectral norm Theta(sqrt(n_out / n_in)). Then each layer's features and their changes stay Theta(1) per
coordinate at any width (muP without the Tensor-Programs machinery). A conv kernel counts as the
(C_out, C_in*k*k) matrix. Written by hand: the `mup` package is unmaintained and has no Muon. The rules:

- init (their eq. 3): std = (1/sqrt(n_in)) * min(1, sqrt(n_out/n_in)), Gaussian, so ||W0||_2 ~ sqrt(n_out/n_in)
  (up to the aspect-ratio constant 1 + sqrt(min/max) of a Gaussian matrix). Weights that are all zero at
  construction (zero-initialised output layers) stay zero: they are deliberate. Embedding tables keep theirs.
- AdamW, Lion, Tiger: a step is sign-like, and a sign matrix aligned with a low-rank gradient has spectral
  norm lr*sqrt(n_in*n_out); so lr = Theta(1/n_in) gives ||dW|| = Theta(sqrt(n_out/n_in)) (their Sec. 3,
  muP's Adam table). Multiplier base/n_in, 1 at fan-in `base` (train.spectral_base: the width whose lr
  you tuned); vectors (biases, gains) and embeddings keep multiplier 1.
- Muon: the orthogonalised update has ||O||_2 ~ 1, so lr*sqrt(n_out/n_in) meets the condition; torch's
  adjustment already multiplies lr by adjust(n_out, n_in), so our multiplier is sqrt(n_out/n_in)/adjust.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PARAMETRIZATIONS = ("standard", "spectral")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(n_out, n_in) of a weight as a matrix: a conv kernel (C_out, C_in, k, k) is (C_out, C_in*k*k)."""
    return weight.shape[0], weight[0].numel()


def _matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices the rules apply to: parameters of 2 or more dimensions, embedding tables excepted."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p for p in model.parameters() if p.ndim >= 2 and id(p) not in tables]


@torch.no_grad()
def init_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Re-draw every weight matrix of `model` with the spectral init std (zero-initialised ones stay zero)."""
    for w in _matrices(model):
        if not w.any():
            continue
        n_out, n_in = fans(w)
        std = min(1.0, math.sqrt(n_out / n_in)) / math.sqrt(n_in)
        w.copy_(torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) * std)


def sign_lr_multipliers(model: nn.Module, base: int) -> dict[int, float]:
    """id(param) -> lr multiplier base/n_in for AdamW, Lion and Tiger (matrices only; others take 1)."""
    return {id(w): base / fans(w)[1] for w in _matrices(model)}


def muon_scale(n_out: int, n_in: int, adjust: str) -> float:
    """The factor torch.optim.Muon multiplies its lr by (torch/optim/_muon.py, `_adjust_lr`)."""
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(n_out, n_in))
    return math.sqrt(max(1.0, n_out / n_in))


def muon_lr_multipliers(params: list[nn.Parameter], adjust: str) -> dict[int, float]:
    """id(param) -> multiplier that turns torch's adjusted Muon lr into lr*sqrt(n_out/n_in)."""
    return {id(p): math.sqrt(fans(p)[0] / fans(p)[1]) / muon_scale(*fans(p), adjust) for p in params}
