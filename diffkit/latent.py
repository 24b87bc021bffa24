"""Latent diffusion: a run whose `data.tokenizer` names a trained tokenizer run models that tokenizer's latents.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), Sec. 3: the autoencoder is
trained first and frozen; the diffusion model learns the distribution of its latents z = E(x); a sample z is
decoded by D(z). Any path, prediction, net and sampler of diffkit works unchanged on the latents: the data flow
is data -> encode -> path -> network -> loss, and noise -> sampler -> latent -> decode.

As Rombach et al. do (their scale factor, Sec. 4.3.2 and App. G), latents are rescaled by one number so that
their standard deviation over the run's training data is model.sigma_data, the scale the preconditioning
expects. The number is recomputed from the frozen encoder and the training data whenever it is needed (it is
deterministic), so a latent run stores nothing beyond its own config.
The latents are the encoder's output before quantization; decoding quantizes first (diffkit.codecs.tokenizer).
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from diffkit import config as configs
from diffkit import registry
from diffkit.config import Config
from diffkit.train import checkpoint


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _load(folder: str, newest: str) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """The tokenizer of `folder`, built once per newest checkpoint folder name `newest` (the cache key): its
    weights are read and checksummed only when a newer checkpoint appears."""
    ck = checkpoint.load_latest(Path(folder))
    if ck is None:
        raise FileNotFoundError(f"data.tokenizer={folder} has no intact checkpoint (each fails its checksums)")
    cfg = configs.from_dict(ck.config["config"])
    if registry.get(cfg.objective.name).generates:
        raise ValueError(f"data.tokenizer={folder} is a {cfg.objective.name} run, not a tokenizer run "
                         "(objective.name: tokenizer)")
    shape = tuple(ck.config["shape"])
    model = configs.model(cfg, shape, 0)
    model.load_state_dict(ck.ema)
    return model.to(_device()).eval().requires_grad_(False), shape, ck.step


def tokenizer(folder: str | Path) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """(the frozen EMA tokenizer of the run in `folder`, the image shape it was trained on, its step): the newest
    intact checkpoint, built once per checkpoint."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"data.tokenizer={folder}: run folder not found (train it first: "
                                "diffkit train configs/photos-vq.yaml --out FOLDER)")
    newest = checkpoint.latest(Path(folder))
    if newest is None:
        raise FileNotFoundError(f"data.tokenizer={folder} has no checkpoints: train the tokenizer first")
    return _load(str(Path(folder).resolve()), newest.name)


@torch.no_grad()
def _encode(model: torch.nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.encode(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


_SCALES: dict[str, float] = {}


def scale(cfg: Config) -> float:
    """The factor that maps the tokenizer's latents of the run's training images to standard deviation sigma_data
    (for a reflow run, of the real images its teacher trained on)."""
    model, _, step = tokenizer(cfg.data.tokenizer)
    real = replace(cfg, data=replace(cfg.data, couples=None))  # a reflow run keeps its teacher's scale
    key = json.dumps([str(Path(cfg.data.tokenizer).resolve()), step, asdict(real.data), cfg.model.sigma_data])
    if key not in _SCALES:
        x, _ = configs.dataset(real, "train")
        _SCALES[key] = cfg.model.sigma_data / _encode(model, x).double().std().item()
    return _SCALES[key]


def encode(cfg: Config, x: Tensor) -> Tensor:
    """What the run trains on: images x (N, C, H, W) as scaled latents; x itself when data.tokenizer is unset, or
    for reflow couples (data.couples), which the teacher drew in its latent space."""
    if cfg.data.tokenizer is None or cfg.data.couples is not None:
        return x
    model, shape, _ = tokenizer(cfg.data.tokenizer)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer} was trained on images of shape {shape}, but this run's "
                         f"data has shape {tuple(x.shape[1:])}: use the same data.name, size and channels")
    return _encode(model, x) * scale(cfg)


@torch.no_grad()
def decode(cfg: Config, z: Tensor, batch: int = 512) -> Tensor:
    """Images from sampled latents z (the run's scale undone, quantized, decoded); z itself without a tokenizer."""
    if cfg.data.tokenizer is None:
        return z
    model, _, _ = tokenizer(cfg.data.tokenizer)
    device, s = next(model.parameters()).device, scale(cfg)
    return torch.cat([model.decode(z[i:i + batch].to(device) / s).to(z.device) for i in range(0, len(z), batch)])
