"""Quantized autoencoders as a run's method: `objective.name: tokenizer`, `model.net: autoencoder`.

The network and its bottlenecks (continuous, VQ with the straight-through estimator, VQ with the rotation trick,
SimVQ, FSQ) are diffkit.nets.autoencoder; this module trains and measures them. The objective is the
reconstruction error plus the bottleneck's own loss (VQ-VAE, van den Oord et al. 2017, Eq. 3, with the codebook
term replaced by the codebook's moving average; SimVQ's commitment terms; none for FSQ):

    loss(x) = mean_pixels (decode(q(encode(x))) - x)^2 + aux_q

Codebook health (Fifty et al. 2024 and Zhu et al. 2024 measure the same): on held-out data, `usage` is the
fraction of codes used at least once, `perplexity` exp(H) of the code histogram (K for uniform use, 1 for
collapse), `dead_codes` the codes never used. The loop logs them, with the held-out reconstruction error, every
`train.log_every` steps (`TokenizerMethod.monitor`).

A tokenizer generates nothing by itself: `diffkit eval RUN` scores its reconstructions, and a latent diffusion run
(`data.tokenizer: RUN`, diffkit.latent) trains on its latents and samples through its decoder.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor, nn

from diffkit.method import Method
from diffkit.nets.autoencoder import Autoencoder


class Tokenizer(nn.Module):
    """The trainable model for diffkit.train.loop: `.net` is the Autoencoder (the loop wraps, saves and averages it
    as it does a Precond's net). Latents are the encoder's output; `decode` quantizes them first, so sampled
    latents are decoded from codes, as the decoder was trained (Rombach et al. 2022, Sec. 3.1)."""

    def __init__(self, net: Autoencoder):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        return self.net(x)

    def encode(self, x: Tensor) -> Tensor:
        """Latents (B, latent_dim, h, w) of images x (B, C, H, W)."""
        return self.net.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images from latents z: quantized to codes, then decoded."""
        return self.net.decode(self.net.quantize(z)[0])


class Reconstruction:
    """loss(model, x0) -> (B,): the per-image mean squared reconstruction error plus the bottleneck's loss
    (a batch mean, added to every row)."""

    def __init__(self, *, aux_weight: float = 1.0):
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.aux_weight = aux_weight

    def __call__(self, model: Tokenizer, x0: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        x_hat, _, aux = model(x0)
        return (x_hat - x0).flatten(1).pow(2).mean(1) + self.aux_weight * aux


def code_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """usage (fraction of codes used), perplexity (exp of the code histogram's entropy) and dead_codes, over
    every index in `indices`."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"usage": used / codebook_size, "perplexity": math.exp(entropy), "dead_codes": codebook_size - used}


@torch.no_grad()
def reconstruct(model: Tokenizer, x: Tensor, *, batch: int = 256) -> tuple[Tensor, dict[str, float]]:
    """(reconstructions of x on x's device, code statistics over x; {} for a continuous bottleneck)."""
    device = next(model.parameters()).device
    outs, codes = [], []
    for start in range(0, len(x), batch):
        x_hat, indices, _ = model(x[start:start + batch].to(device))
        outs.append(x_hat.to(x.device))
        if indices is not None:
            codes.append(indices.cpu())
    stats = code_stats(torch.cat(codes), model.net.codebook_size) if codes else {}
    return torch.cat(outs), stats


class TokenizerMethod(Method):
    """A quantized autoencoder as a run's method: model.args are the Autoencoder's (bottleneck, codebook_size,
    latent_dim, channels, downsample), objective.args Reconstruction's."""

    name = "tokenizer"
    objective_class = Reconstruction
    nets = ("autoencoder",)
    likelihood = None
    generates = False

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.data.conditional:
            raise ValueError("a tokenizer is trained without labels: set data.conditional=false")
        if cfg.data.tokenizer is not None:
            raise ValueError("a tokenizer trains on images, not on another tokenizer's latents: unset data.tokenizer")

    def wrap(self, net: Autoencoder, cfg, path) -> Tokenizer:
        return Tokenizer(net)

    def objective(self, cfg, path, *, label_dropout: float, null: int | None, teacher=None) -> Reconstruction:
        return Reconstruction(**cfg.objective.args)

    def facts(self, cfg) -> dict:
        defaults = {k: p.default for k, p in inspect.signature(Autoencoder).parameters.items()}
        args = defaults | cfg.model.args
        return {"method": self.name, "bottleneck": args["bottleneck"], "codebook_size": args["codebook_size"],
                **cfg.objective.args}

    def reconstruct(self, model: Tokenizer, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        return reconstruct(model, x)

    def monitor(self, cfg, held: Callable[[], Tensor]) -> Callable[[nn.Module], dict[str, float]]:
        """What the loop logs every log_every steps: reconstruction error (MSE, PSNR in dB) and code statistics
        on the first 512 held-out images."""
        x = held()[:512]

        def measure(model: Tokenizer) -> dict[str, float]:
            x_hat, stats = reconstruct(model, x)
            mse = (x_hat - x).pow(2).mean().item()
            return {"held_out_mse": mse, "held_out_psnr": 10 * math.log10(4 / max(mse, 1e-20)), **stats}
        return measure
