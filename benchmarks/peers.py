"""diffusers' schedulers driven by an exact denoiser, as sampler functions with our signature.

Each adapter builds the scheduler with prediction_type="sample" (the model returns x0_hat, so no peer-side
conversion is measured), walks `scheduler.timesteps`, and answers every model call with the exact
D(x, sigma) at the sigma the scheduler is at (its own `sigmas` table, or sqrt((1 - abar)/abar) for DDIM).
VP-space schedulers keep x_vp = x / sqrt(1 + sigma^2); Euler and Heun keep our scale-free x. The grid a
peer uses is its own (diffusers' DDPM 1000-step linear-beta discretization), logged in the results.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
import diffusers  # noqa: E402


@dataclass
class Peer:
    name: str
    make: callable  # () -> scheduler
    vp: bool  # sample kept in VP space
    nfe_per_step: tuple[int, int] = (1, 0)  # NFE = a * steps + b

    def steps_for(self, nfe: int) -> int:
        a, b = self.nfe_per_step
        return (nfe - b) // a

    def sigmas(self, scheduler) -> torch.Tensor:
        """One sigma per model call, then the final sigma."""
        if hasattr(scheduler, "sigmas"):
            return scheduler.sigmas.to(torch.float64)
        abar = scheduler.alphas_cumprod.to(torch.float64)[scheduler.timesteps]
        return torch.cat([torch.sqrt((1 - abar) / abar), torch.zeros(1, dtype=torch.float64)])

    def prepare(self, steps: int):
        scheduler = self.make()
        scheduler.set_timesteps(steps)
        return scheduler

    def run(self, scheduler, denoiser, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sample from x (scale-free, at the scheduler's first sigma); returns (x0, NFE)."""
        sig = self.sigmas(scheduler)
        sample = x / torch.sqrt(1 + sig[0] ** 2) if self.vp else x.clone()
        for i, t in enumerate(scheduler.timesteps):
            s = sig[i]
            if self.vp:
                x0_hat = denoiser(sample * torch.sqrt(1 + s**2), s.expand(len(x)))
            else:
                x_in = scheduler.scale_model_input(sample, t)
                x0_hat = denoiser(x_in * torch.sqrt(1 + s**2), s.expand(len(x)))
            sample = scheduler.step(x0_hat, t, sample).prev_sample
        return sample, len(scheduler.timesteps)


def _sample(cls, **kw):
    return lambda: cls(prediction_type="sample", **kw)


PEERS = [
    Peer("DDIM (trailing)", _sample(diffusers.DDIMScheduler, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"), True),
    Peer("Euler", _sample(diffusers.EulerDiscreteScheduler, timestep_spacing="trailing"), False),
    Peer("Euler (karras)", _sample(diffusers.EulerDiscreteScheduler, use_karras_sigmas=True), False),
    Peer("Heun", _sample(diffusers.HeunDiscreteScheduler, timestep_spacing="trailing"), False, (2, -1)),
    Peer("Heun (karras)", _sample(diffusers.HeunDiscreteScheduler, use_karras_sigmas=True), False, (2, -1)),
    Peer("DPM++ 2M", _sample(diffusers.DPMSolverMultistepScheduler, solver_order=2, final_sigmas_type="zero"), True),
    Peer("DPM++ 2M (karras)", _sample(diffusers.DPMSolverMultistepScheduler, solver_order=2, use_karras_sigmas=True, final_sigmas_type="zero"), True),
    Peer("DPM++ 3M", _sample(diffusers.DPMSolverMultistepScheduler, solver_order=3, final_sigmas_type="zero"), True),
    Peer("DPM++ 3M (karras)", _sample(diffusers.DPMSolverMultistepScheduler, solver_order=3, use_karras_sigmas=True, final_sigmas_type="zero"), True),
    Peer("UniPC bh2 (order 3)", _sample(diffusers.UniPCMultistepScheduler, solver_order=3), True),
    Peer("UniPC bh2 (order 3, karras)", _sample(diffusers.UniPCMultistepScheduler, solver_order=3, use_karras_sigmas=True), True),
    Peer("UniPC bh2 (order 2)", _sample(diffusers.UniPCMultistepScheduler, solver_order=2), True),
    Peer("DEIS (order 3)", _sample(diffusers.DEISMultistepScheduler, solver_order=3), True),
]
