"""Sampling from a trained model: the grid its config names, per-sample seeded noise, optional guidance."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from diffkit import grids, samplers
from diffkit.config import Config, path
from diffkit.onestep import reflow, shortcut, sid
from diffkit.precond import Precond
from diffkit.samplers.guidance import ClassifierFree
from diffkit.samplers.noise import GaussianNoise
from diffkit.train.fast import FastDenoiser


def grid(cfg: Config, steps: int | None = None) -> Tensor:
    """The sigma grid of cfg.sample, with `steps` overriding its step count."""
    s, p = cfg.sample, path(cfg)
    n = steps or s.steps
    lo, hi = s.sigma_min or p.sigma_min, s.sigma_max or p.sigma_max
    if s.grid == "karras":
        return grids.karras(n, lo, hi, s.rho)
    if s.grid == "uniform_t":
        return grids.uniform_t(p, n, float(p.t(lo)), float(p.t(hi)))
    if s.grid == "log_snr":
        return grids.log_snr_uniform(p, n, lo, hi)
    if s.grid == "distill":
        return reflow.distill_grid(n, path=p, sigma_start=hi)
    raise ValueError(f"unknown sample.grid {s.grid!r}; choose karras, uniform_t, log_snr or distill")


def sampler_name(cfg: Config, sampler: str | None) -> str:
    """The sampler a run uses: shortcut and SiD models have their own; others take `sampler` or the config's."""
    own = cfg.objective.name if cfg.objective.name in ("shortcut", "sid") else None
    if own and sampler not in (None, own):
        raise ValueError(f"a {own} model samples with its own sampler ({own}, --steps 1/2/4/...), not {sampler!r}")
    return own or sampler or cfg.sample.sampler


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Grid steps that spend at most `nfe` denoiser calls (Heun spends 2N - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


@torch.no_grad()
def sample(model: Precond, cfg: Config, shape: tuple[int, ...], n: int, *, sampler: str | None = None,
           steps: int | None = None, seed: int = 0, guidance: float | None = None, label: int | None = None,
           n_classes: int = 0, batch: int = 256, fast: bool = False, progress: bool = True) -> tuple[Tensor, int]:
    """n samples (n, *shape) and the NFE per sample. Sample i depends only on (seed, i), not on `batch`.

    fast: run the denoiser (guidance included) through FastDenoiser (diffkit.train.fast): compiled, bf16 and one
    CUDA graph per call on CUDA (elsewhere compiled in fp32: the same samples, for testing). Shortcut and SiD
    models ignore it.
    """
    name = sampler_name(cfg, sampler)
    steps = steps or cfg.sample.steps
    if label is not None and not 0 <= label < n_classes:
        raise ValueError(f"--label must be in [0, {n_classes - 1}] for this model" if n_classes else
                         "this model was trained without labels: --label and --guidance need a conditional model")
    draw = _one_step_method(model, cfg, name, steps, guidance, label, n_classes)
    device = next(model.parameters()).device
    out, nfe, compiled = [], 0, {}  # one FastDenoiser per batch size: each compiles once
    for start in tqdm(range(0, n, batch), desc=f"sampling {name}", disable=not progress):
        idx = range(start, min(start + batch, n))
        noise = GaussianNoise(seed, indices=idx, device=device)
        if draw is not None:
            x, nfe = draw(noise.sample(shape), noise)
            out.append(x.cpu())
            continue
        sigmas = grid(cfg, steps)
        x = sigmas[0].item() * noise.sample(shape)
        denoiser = _denoiser(model, len(idx), guidance, label, n_classes, device)
        if fast:  # compiled once per batch size (and guidance binding), then replayed
            denoiser = compiled[len(idx)] = compiled.get(len(idx)) or FastDenoiser(denoiser, device)
        counter = samplers.NFECounter(denoiser)
        out.append(samplers.get(name)(counter, x, sigmas, noise=noise).cpu())
        nfe = counter.nfe
    return torch.cat(out), nfe


def _one_step_method(model, cfg: Config, name: str, steps: int, guidance, label, n_classes):
    """For shortcut and SiD models: (z, noise) -> (samples, NFE); None for denoisers and the generic samplers."""
    args = cfg.objective.args
    if name == "shortcut":
        levels = args.get("levels", shortcut.LEVELS)
        guided = guidance is not None and guidance != 1

        def draw(z, noise):
            x = shortcut.shortcut_sample(model, z, steps, cond=_labels(label, z), guidance=guidance, null=n_classes,
                                         levels=levels)
            return x, steps * (2 if guided else 1)
        return draw
    if name == "sid":
        if guidance is not None:
            raise ValueError("a SiD generator is sampled without guidance (bake it into the teacher instead)")
        sigma_init = args.get("sigma_init", sid.SIGMA_INIT)

        def draw(z, noise):
            x = sid.sid_sample(model.generator, z, sigma_init=sigma_init, steps=steps, cond=_labels(label, z), noise=noise)
            return x, steps
        return draw
    return None


def _labels(label: int | None, z: Tensor) -> Tensor | None:
    """The class `label` for every row of z, or None (unconditional)."""
    return None if label is None else torch.full((len(z),), label, dtype=torch.long, device=z.device)


def _denoiser(model, b, guidance, label, n_classes, device):
    if label is None and guidance is None:
        return model
    cond = torch.full((b,), label if label is not None else 0, dtype=torch.long, device=device)
    if guidance is None or guidance == 1:
        return lambda x, s: model(x, s, cond)
    return ClassifierFree(model, cond, torch.full_like(cond, n_classes), guidance)
