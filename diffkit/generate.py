"""Sampling from a trained model: the grid its config names, per-sample seeded noise, optional guidance."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from tqdm import tqdm

from diffkit import grids, latent, registry, samplers
from diffkit.config import Config, path
from diffkit.precond import Precond
from diffkit.samplers.advice import FewStepWarning, few_step_warning
from diffkit.samplers.guidance import ClassifierFree
from diffkit.samplers.noise import GaussianNoise
from diffkit.train.fast import FastDenoiser


def grid(cfg: Config, steps: int | None = None) -> Tensor:
    """The sigma grid of cfg.sample, with `steps` overriding its step count."""
    s, p = cfg.sample, path(cfg)
    return grids.named(s.grid, p, steps or s.steps, sigma_min=s.sigma_min or p.sigma_min,
                       sigma_max=s.sigma_max or p.sigma_max, rho=s.rho)


def sampler_name(cfg: Config, sampler: str | None) -> str:
    """The sampler a run uses: its method's own (shortcut, SiD), or `sampler`, or the config's."""
    return registry.get(cfg.objective.name).sampler_name(sampler, cfg.sample.sampler)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Grid steps that spend at most `nfe` denoiser calls (Heun spends 2N - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


@torch.no_grad()
def sample(model: Precond, cfg: Config, shape: tuple[int, ...], n: int, *, sampler: str | None = None,
           steps: int | None = None, sigmas: Tensor | None = None, seed: int = 0, guidance: float | None = None,
           label: int | None = None, n_classes: int = 0, batch: int = 256, fast: bool = False,
           progress: bool = True) -> tuple[Tensor, int]:
    """n samples (n, *shape) and the NFE per sample. Sample i depends only on (seed, i), not on `batch`.

    shape is the model's (a latent run's latents); the samples are images, decoded by the run's tokenizer.

    sigmas: a grid to sample on instead of the config's (e.g. a calibrated one; `steps` is then its length).
    Guidance without a label samples the classes evenly: sample i gets class i mod n_classes.
    fast: run the denoiser (guidance included) through FastDenoiser (diffkit.train.fast): compiled, bf16 and one
    CUDA graph per call on CUDA (elsewhere compiled in fp32: the same samples, for testing). Methods with their
    own sampler (shortcut, SiD) ignore it.
    """
    method = registry.get(cfg.objective.name)
    if not method.generates:
        raise ValueError(f"a {cfg.objective.name} run does not generate samples: `diffkit eval RUN` scores its "
                         "reconstructions, and a latent diffusion run (data.tokenizer: RUN) samples through it")
    name = method.sampler_name(sampler, cfg.sample.sampler)
    if sigmas is not None and method.samplers:
        raise ValueError(f"a {cfg.objective.name} run samples with its own sampler ({name}); it takes no grid")
    steps = len(sigmas) - 1 if sigmas is not None else steps or cfg.sample.steps
    check_labels(label, guidance, n_classes)
    draw = method.draw(model, cfg, sampler=name, steps=steps, guidance=guidance, label=label,
                       n_classes=n_classes) if method.samplers else None
    if draw is None:
        sigmas = grid(cfg, steps) if sigmas is None else sigmas
        if advice := few_step_warning(name, sigmas):
            warnings.warn(advice, FewStepWarning, stacklevel=4)  # the caller, past torch.no_grad
    device = next(model.parameters()).device
    out, nfe, compiled = [], 0, {}  # one FastDenoiser per batch size: each compiles once
    for start in tqdm(range(0, n, batch), desc=f"sampling {name}", disable=not progress):
        idx = range(start, min(start + batch, n))
        noise = GaussianNoise(seed, indices=idx, device=device)
        if draw is not None:
            x, nfe = draw(noise.sample(shape), noise)
            out.append(x.cpu())
            continue
        x = sigmas[0].item() * noise.sample(shape)
        d = denoiser(model, idx, guidance=guidance, label=label, n_classes=n_classes, device=device)
        if fast:  # compiled once per batch size (and guidance binding), then replayed
            d = compiled[len(idx)] = compiled.get(len(idx)) or FastDenoiser(d, device)
        counter = samplers.NFECounter(d)
        out.append(samplers.get(name)(counter, x, sigmas, noise=noise).cpu())
        nfe = counter.nfe
    return latent.decode(cfg, torch.cat(out)), nfe


def check_labels(label: int | None, guidance: float | None, n_classes: int) -> None:
    """A label or guidance scale the model can take, else a ValueError that says why."""
    if (label is not None or guidance is not None) and not n_classes:
        raise ValueError("this model was trained without labels: --label and --guidance need a conditional model")
    if label is not None and not 0 <= label < n_classes:
        raise ValueError(f"--label must be in [0, {n_classes - 1}] for this model")


def denoiser(model: Precond, indices: range, *, guidance: float | None, label: int | None, n_classes: int,
             device: torch.device):
    """The denoiser that samples `indices` of a run: plain, of class `label`, or guided (Ho & Salimans 2022).

    Guidance without a label gives sample i the class i mod n_classes, so the classes come out evenly."""
    if label is None and guidance is None:
        return model
    cond = torch.tensor([label if label is not None else i % n_classes for i in indices], device=device)
    if guidance is None or guidance == 1:
        return lambda x, s: model(x, s, cond)
    return ClassifierFree(model, cond, torch.full_like(cond, n_classes), guidance)
