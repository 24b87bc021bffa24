"""`diffkit sample | eval` on a diffusers folder: what a run folder's checkpoint gives those jobs, made from the
folder (diffkit.interop.diffusers.load_diffusers) and the command's options.

A diffusers folder has no diffkit config: the one made here carries only the sampling settings (default
dpmpp_2m, 20 steps, EDM's karras grid over the model's sigma range) and, for eval, the data named by --data.
The grid is built on the scheduler's path (`Schedule.grid_path`: for flow matching, the shifted path).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffkit import config as configs
from diffkit import grids
from diffkit.config import Config
from diffkit.interop.diffusers import load_diffusers

DEFAULTS = {"sampler": "dpmpp_2m", "steps": 20, "grid": "karras"}


def sampling(folder: Path, grid: str | None, sampler: str | None, steps: int | None, guidance: float | None,
             *, data: str | None = None, device: torch.device | str = "cpu"):
    """(config, denoiser, shape, classes, sampler name, sigmas) for sampling a diffusers folder, as run.sampling
    gives them for a run folder."""
    if grid == "calibrated":
        raise ValueError(f"{folder} is a diffusers folder: calibrated grids are stored in run folders; pass a named "
                         f"grid ({', '.join(grids.NAMED[:-1])})")
    if guidance is not None:
        raise ValueError(f"{folder} is a diffusers folder, whose null label diffkit does not know: --guidance needs "
                         "a diffkit run (or diffkit.samplers.guidance.ClassifierFree from Python with your null label)")
    loaded = load_diffusers(folder, device=device)
    if loaded.shape is None:
        raise ValueError(f"{folder}: the model config gives no sample_size / in_channels, so the sample shape is "
                         "unknown; sample it from Python (diffkit.interop.load_diffusers)")
    if loaded.conditioning == "encoder_hidden_states":
        raise ValueError(f"{folder} holds a text-conditioned model: pass its encoder hidden states as cond from "
                         "Python (diffkit.interop.load_diffusers); the CLI samples unconditional and class models")
    settings = {key: value if value is not None else DEFAULTS[key]
                for key, value in (("sampler", sampler), ("steps", steps), ("grid", grid))}
    cfg = configs.from_dict({"data": {"name": data or "digits"}, "sample": settings})
    p = loaded.schedule.grid_path
    sigmas = grids.named(cfg.sample.grid, p, cfg.sample.steps, sigma_min=p.sigma_min, sigma_max=p.sigma_max,
                         rho=cfg.sample.rho)
    return cfg, loaded.denoiser, loaded.shape, loaded.num_classes, cfg.sample.sampler, sigmas


def check_data(cfg: Config, shape: tuple[int, ...], folder: Path) -> None:
    """The held-out data of --data must have the model's sample shape."""
    x, _ = configs.dataset(cfg, "test")
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{folder} makes samples of shape {tuple(shape)}, but --data {cfg.data.name} has shape "
                         f"{tuple(x.shape[1:])}: pass the data the model was trained on")
