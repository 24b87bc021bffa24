"""One denoising objective for any path, parametrization, training density and weighting.

A training example draws t from the density, sigma = path.sigma(t), eps ~ N(0, I), and forms the scale-free
state x = x_0 + sigma eps (so x_t = alpha x). With the denoiser D = c_skip x + c_out F (diffkit.precond) the
loss lambda(sigma) |D - x_0|^2 equals lambda c_out^2 |F - F_target|^2, where F_target is the prediction's
exact target (EDM, Karras et al. 2022, Eq. 8 and §5). The weighting is stated in the x_0 space:

    "uniform"  lambda = 1 / c_out^2: plain MSE on the net's output (DDPM's eps loss, flow matching's
               velocity loss, EDM's effective target), whichever the parametrization
    "edm"      lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (EDM Eq. 8)
    "min_snr"  lambda = min(SNR, gamma), SNR = 1 / sigma^2             (Hang et al. 2023, Eq. 7)

Flow matching is this objective with RectifiedFlow, prediction "velocity" and "uniform" weighting.
Losses are per sample; the training loop reduces them. `DenoisingMethod` is how the jobs build it from a
run's config (diffkit.method).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffkit._tensor import per_sample
from diffkit.method import Method
from diffkit.paths import DENSITIES, LogNormal, Path, Uniform
from diffkit.precond import Precond, from_x0_eps

WEIGHTINGS = ("uniform", "edm", "min_snr")


def drop_labels(cond: Tensor | None, p: float, null: Tensor | int | None, *,
                generator: torch.Generator | None = None) -> Tensor | None:
    """cond (B, ...) with each row replaced by `null` with probability p, drawn from `generator` on its own
    device: label dropout, which trains the unconditional model beside the conditional one for classifier-free
    guidance (Ho & Salimans 2022, Alg. 1). No draw when cond is None or p = 0."""
    if cond is None or p == 0:
        return cond
    device = generator.device if generator is not None else torch.device("cpu")
    drop = (torch.rand(cond.shape[0], generator=generator, device=device) < p).to(cond.device)
    return torch.where(per_sample(drop, cond).bool(), torch.as_tensor(null, dtype=cond.dtype, device=cond.device), cond)


class Denoising:
    """loss(model, x0, cond, generator) -> (B,) per-sample loss for a Precond-wrapped network.

    label_dropout: probability of replacing a sample's condition by `null` (classifier-free guidance training,
    Ho & Salimans 2022, Alg. 1).
    """

    def __init__(self, path: Path, *, density: Uniform | LogNormal | None = None, weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, label_dropout: float = 0.0, null: Tensor | int | None = None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if not 0 <= label_dropout <= 1 or (label_dropout > 0 and null is None):
            raise ValueError("label_dropout must be in [0, 1], and needs a `null` condition when > 0")
        self.path, self.density, self.weighting = path, density or Uniform(), weighting
        self.min_snr_gamma, self.label_dropout, self.null = min_snr_gamma, label_dropout, null

    def target(self, model: Precond, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """F_target: the network output that makes D(x0 + sigma eps, sigma) = x0 exactly."""
        if model.prediction != "edm":
            return from_x0_eps(x0, eps, model.prediction, t, self.path)
        sigma = self.path.sigma(t)
        c_skip, c_out, _, _ = model.scalings(sigma)
        x = x0 + per_sample(sigma, x0) * eps
        return (x0 - per_sample(c_skip, x0) * x) / per_sample(c_out, x0)

    def weight(self, model: Precond, sigma: Tensor) -> Tensor:
        """The F-space weight lambda(sigma) c_out(sigma)^2, (B,)."""
        if self.weighting == "uniform":
            return torch.ones_like(sigma)
        _, c_out, _, _ = model.scalings(sigma)
        if self.weighting == "edm":
            sd = model.sigma_data
            lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        else:
            lam = torch.clamp(sigma**-2, max=self.min_snr_gamma)
        return lam * c_out**2

    def __call__(self, model: Precond, x0: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        b, device = x0.shape[0], (generator.device if generator is not None else torch.device("cpu"))
        # All randomness comes from `generator` on its own device, so a seed fixes the batch's draws.
        t = self.density.sample(self.path, b, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
        cond = drop_labels(cond, self.label_dropout, self.null, generator=generator)
        sigma = self.path.sigma(t)
        f = model.raw(x0 + per_sample(sigma, x0) * eps, sigma, cond)
        err = ((f - self.target(model, x0, eps, t)) ** 2).reshape(b, -1).mean(1)
        return self.weight(model, sigma).to(err.dtype) * err


class DenoisingMethod(Method):
    """Denoising / flow matching as a run's method: `objective.density`, `density_args`, `weighting`,
    `min_snr_gamma` and `label_dropout` configure it; it takes no `objective.args`."""

    name = "denoising"
    objective_class = Denoising

    def check_args(self, args: dict) -> None:
        if args:
            raise ValueError("objective.args configures a one-step method (shortcut, reflow, sid); denoising takes "
                             "objective.density, density_args, weighting, min_snr_gamma and label_dropout")

    def objective(self, cfg, path: Path, *, label_dropout: float, null: int | None, teacher=None) -> Denoising:
        o = cfg.objective
        if o.density not in DENSITIES:
            raise ValueError(f"unknown objective.density {o.density!r}; choose one of {', '.join(DENSITIES)}")
        return Denoising(path, density=DENSITIES[o.density](**o.density_args), weighting=o.weighting,
                         min_snr_gamma=o.min_snr_gamma, label_dropout=label_dropout, null=null)

    def facts(self, cfg) -> dict:
        return {"density": cfg.objective.density, "weighting": cfg.objective.weighting}
