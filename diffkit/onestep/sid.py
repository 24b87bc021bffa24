"""Score identity Distillation (SiD): a one-step generator distilled from a diffusion teacher, without data.

Zhou, Zheng, Wang, Yin & Huang, "Score identity Distillation: Exponentially Fast Distillation of Pretrained
Diffusion Models for One-Step Generation", ICML 2024 (arXiv 2404.04057), §4 and Algorithm 1; the constants
are the reference code's (mingyuanzhou/SiD, `training/sid_loss.py`, `run_sid.sh`).

Three denoisers work in the scale-free state x = x_0 + sigma eps: the frozen teacher f_phi (any diffkit
denoiser: a trained Precond, or an exact analytic.GaussianMixture), a fake denoiser f_psi that tracks the
generator's own distribution, and the generator G_theta, a denoiser called once at a fixed sigma_init:

    x_g = G_theta(sigma_init z, sigma_init),   z ~ N(0, I),   sigma_init = 2.5.

Why it works: by Tweedie's formula a denoiser is a score, so the score of the noised generator distribution,
which has no closed form, is estimated by f_psi, trained on the generator's samples. SiD's identities turn the
Fisher divergence between the teacher's and the generator's noised distributions into a loss whose gradient
needs only the two denoisers at x_t = x_g + sigma eps, with gradients through x_g alone. Each training step
alternates two updates (Algorithm 1):

  fake score  EDM's loss (Karras et al. 2022, Eq. 8, §5) on detached samples, ln sigma ~ N(-1.2, 1.2^2):
                  lambda(sigma) |f_psi(x_g + sigma eps, sigma) - x_g|^2,   lambda = (sigma^2 + sd^2) / (sigma sd)^2
  generator   sigma on EDM's rho = 7 grid at u ~ U[0, t_max / 1000], t_max = 800 (Karras et al. 2022, Eq. 5):
                  (f_phi - f_psi) . [(f_phi - x_g) - alpha (f_phi - f_psi)] / w
                = [(1 - alpha) |f_phi - f_psi|^2 + (f_phi - f_psi) . (f_psi - x_g)] / w   (SiD issue #8)
              with w = stopgrad(mean |x_g - f_phi|) per sample (>= 1e-5). Gradients reach theta through x_g:
              both denoisers' inputs and the explicit x_g; psi and phi are held fixed.

alpha = 1.2 is the paper's default. alpha = 0.5 is Flow Generator Matching's unbiased coefficient (Huang et
al. 2024): twice SiD's loss there is |delta|^2 + 2 delta . (f_psi - x_g), delta = f_phi - f_psi.

Fit to diffkit.train.loop. The trainable `SiDStudent` keeps generator and fake under one `.net`, so the
loop's checkpoint ("net.*"), EMA and torch.compile / DDP wrapping cover both, and every call goes through
`net(role, ...)`, that is through any wrapper. The teacher lives in the objective, frozen and outside the
checkpoint. `SiD.phases = ("fake", "generator")` makes the loop take two optimizer steps per training step
in the paper's order; each phase leaves the other network without gradients, so the optimizers skip it. The
EMA's generator is the one to sample. Losses are summed over elements and scaled (generator 100, fake 1),
as the reference code sums over pixels before dividing by the batch. Samples with NaNs in x_g or in either
denoiser's output contribute zero; if their NaNs reach the gradients, the loop skips the step.

`SiDMethod` is how the jobs train and sample it from a run's config, and `diffkit distill RUN` derives a SiD
(or FGM) run from a trained denoiser (diffkit.method).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffkit._tensor import per_sample
from diffkit.contracts import NoiseSource
from diffkit.grids import karras
from diffkit.method import Method, Option, Trained, labels_of, quote
from diffkit.samplers.consistency import consistency

ROLES = ("generator", "fake", "fake_frozen")
SIGMA_INIT = 2.5  # the generator's fixed input noise level (reference code, run_sid.sh)


class _Pair(nn.Module):
    """Generator and fake denoiser; forward(role, x, sigma, cond) dispatches so wrappers see every call."""

    def __init__(self, generator: nn.Module, fake: nn.Module):
        super().__init__()
        self.generator, self.fake = generator, fake

    def forward(self, role: str, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if role == "generator":
            return self.generator(x, sigma, cond)
        if role == "fake":
            return self.fake(x, sigma, cond)
        if role == "fake_frozen":  # f_psi as a function of its input only: psi gets no gradient
            params = {name: p.detach() for name, p in self.fake.named_parameters()}
            return functional_call(self.fake, params, (x, sigma, cond))
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


class SiDStudent(nn.Module):
    """The trainable part of SiD: generator G_theta and fake denoiser f_psi, both D(x, sigma, cond) modules."""

    def __init__(self, generator: nn.Module, fake: nn.Module):
        super().__init__()
        self.net = _Pair(generator, fake)

    @classmethod
    def from_teacher(cls, teacher: nn.Module) -> SiDStudent:
        """Generator and fake both start as copies of the teacher network (the paper's initialisation)."""
        return cls(*(copy.deepcopy(teacher).train().requires_grad_(True) for _ in range(2)))

    @property
    def generator(self) -> nn.Module:
        return self.net.generator

    @property
    def fake(self) -> nn.Module:
        return self.net.fake


class SiD:
    """loss(model, x0, cond, generator, phase) -> (B,) per-sample SiD loss; model is a SiDStudent.

    Data-free: x0 only fixes the batch's shape, dtype and device (cond, the labels, come from the data as in
    the reference code). phase "fake" gives the fake-score loss, phase "generator" the generator loss.
    teacher: D(x, sigma) or D(x, sigma, cond); an nn.Module teacher is frozen here (eval, no gradients).
    """

    phases = ("fake", "generator")

    def __init__(self, teacher: Callable[..., Tensor], *, alpha: float = 1.2, sigma_init: float = SIGMA_INIT,
                 t_max: float = 800, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                 generator_scale: float = 100.0, fake_scale: float = 1.0):
        if not 0 < t_max <= 1000:
            raise ValueError(f"t_max must be in (0, 1000], got {t_max}")
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)
        self.teacher, self.alpha, self.sigma_init, self.t_max = teacher, alpha, sigma_init, t_max
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.generator_scale, self.fake_scale = generator_scale, fake_scale

    def generate(self, model: SiDStudent, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """x_g = G(sigma_init z, sigma_init) through model.net (with gradients, unless the caller disables them)."""
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=z.dtype, device=z.device)
        return model.net("generator", self.sigma_init * z, sigma, cond)

    def generator_sigma(self, u: Tensor) -> Tensor:
        """sigma at u in [0, t_max / 1000] on EDM's rho grid, from sigma_min (u = 0) upwards."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + (1 - u) * (lo - hi)) ** self.rho

    def fake_loss(self, model: SiDStudent, x_g: Tensor, cond: Tensor | None, sigma: Tensor,
                  eps: Tensor) -> Tensor:
        """fake_scale lambda(sigma) |f_psi(x_g + sigma eps, sigma) - x_g|^2 per sample, x_g detached; samples with
        NaN in x_g or f_psi give 0."""
        bad = _has_nan(x_g)
        # x_g is data here, so NaN samples can be swapped for zeros and kept out of psi's gradient entirely.
        x_g = torch.where(per_sample(bad, x_g).bool(), 0, x_g.detach())
        d = model.net("fake", x_g + per_sample(sigma, x_g) * eps, sigma, cond)
        sd = self.sigma_data
        lam = ((sigma**2 + sd**2) / (sigma * sd) ** 2).to(x_g.dtype)
        loss = self.fake_scale * lam * ((d - x_g) ** 2).flatten(1).sum(1)
        return torch.where(bad | _has_nan(d), torch.zeros_like(loss), loss)

    def generator_loss(self, model: SiDStudent, x_g: Tensor, cond: Tensor | None, sigma: Tensor,
                       eps: Tensor) -> Tensor:
        """generator_scale (f_phi - f_psi) . [(f_phi - x_g) - alpha (f_phi - f_psi)] / w per sample; samples with
        NaN in x_g, f_phi or f_psi give 0."""
        x_t = x_g + per_sample(sigma, x_g) * eps
        f_phi = _call(self.teacher, x_t, sigma, cond)
        f_psi = model.net("fake_frozen", x_t, sigma, cond)
        w = (x_g - f_phi).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
        delta = f_phi - f_psi
        loss = self.generator_scale * (delta * ((f_phi - x_g) - self.alpha * delta)).flatten(1).sum(1) / w
        return torch.where(_has_nan(x_g) | _has_nan(f_phi) | _has_nan(f_psi), torch.zeros_like(loss), loss)

    def __call__(self, model: SiDStudent, x0: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None, phase: str) -> Tensor:
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; expected one of {self.phases}")
        b, shape, dtype = x0.shape[0], x0.shape, x0.dtype
        z = _draw(torch.randn, shape, generator, dtype, x0.device)
        if phase == "fake":
            # Fake-score step (Alg. 1): EDM's denoising loss on fresh generator samples, theta fixed.
            with torch.no_grad():
                x_g = self.generate(model, z, cond)
            ln_sigma = self.p_mean + self.p_std * _draw(torch.randn, b, generator, torch.float64, x0.device)
            eps = _draw(torch.randn, shape, generator, dtype, x0.device)
            return self.fake_loss(model, x_g, cond, ln_sigma.exp().to(dtype), eps)
        # Generator step (Alg. 1): SiD's loss at x_t = x_g + sigma eps, psi and phi fixed.
        x_g = self.generate(model, z, cond)
        u = self.t_max / 1000 * _draw(torch.rand, b, generator, torch.float64, x0.device)
        eps = _draw(torch.randn, shape, generator, dtype, x0.device)
        return self.generator_loss(model, x_g, cond, self.generator_sigma(u).to(dtype), eps)


def _draw(fn: Callable[..., Tensor], shape, generator: torch.Generator | None, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """A draw from `generator` on its own device, moved to `device`: a seed fixes the batch's draws anywhere."""
    here = generator.device if generator is not None else torch.device("cpu")
    return fn(shape, generator=generator, dtype=dtype, device=here).to(device)


def _has_nan(x: Tensor) -> Tensor:
    return torch.isnan(x).flatten(1).any(1)


def _call(denoiser: Callable[..., Tensor], x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
    """D(x, sigma) for unconditional denoisers (the analytic ones take no cond), D(x, sigma, cond) otherwise."""
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


def sid_sample(generator: nn.Module | Callable[..., Tensor], z: Tensor, *, sigma_init: float = SIGMA_INIT,
               steps: int = 1, cond: Tensor | None = None, sigma_min: float = 0.002,
               noise: NoiseSource | None = None) -> Tensor:
    """Samples (B, ...) from a SiD generator G (the EMA's) and z ~ N(0, I) (B, ...), with `steps` calls of G.

    SiD trains G for one step: x = G(sigma_init z, sigma_init). steps > 1 is consistency models' multistep
    sampling (diffkit.samplers.consistency) from sigma_init z on `sid_grid`. G has been trained only at
    sigma_init, so below it runs on what it kept from the teacher: measure before use.
    noise: where the re-noising draws come from (a NoiseSource; default the global RNG).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    denoiser = generator if cond is None else (lambda x, sigma: generator(x, sigma, cond))
    return consistency(denoiser, sigma_init * z, sid_grid(steps, sigma_init, sigma_min), noise=noise)


def sid_grid(steps: int, sigma_init: float = SIGMA_INIT, sigma_min: float = 0.002) -> Tensor:
    """The levels sigma_init = sigma_0 > ... > sigma_{steps-1} of the Karras grid karras(steps + 1, sigma_min,
    sigma_init), then 0: its last level, sigma_min, is left out, since denoising at it changes nothing."""
    return torch.cat([karras(steps + 1, sigma_min, sigma_init)[:steps], torch.zeros(1, dtype=torch.float64)])


# SiD from a trained start: Adam beta1 = 0, no clipping, and an EMA whose half-life ramps up as 0.05 x the steps
# so far (Zhou et al. 2024, run_sid.sh). The EMA generator is the one sampled, and it starts as the teacher: a
# fixed decay of 0.999 keeps 0.999^1000 = 37% of the teacher after 1000 steps. The paper's lr 1e-5 is for
# 56M-parameter UNets at batch 256+; the one-step benchmark (benchmarks/results/onestep.md) trains the digits MLP
# with these settings.
SID_TRAIN = ["train.lr=3e-4", "train.adam_beta1=0", "train.warmup=0", "train.cosine=false", "train.grad_clip=.inf",
             "train.steps=4000", "train.ema_decay=0.999", "train.ema_rampup=0.05"]
ALPHAS = {"sid": [], "fgm": ["objective.args.alpha=0.5"]}  # `diffkit distill --method`: SiD's alpha or FGM's


class SiDMethod(Method):
    """SiD as a run's method: a generator/fake pair distilled from model.init's EMA weights, one call per step."""

    name = "sid"
    objective_class = SiD
    own_args = ("teacher",)
    samplers = ("sid",)
    likelihood = None  # a one-step generator has no probability-flow ODE
    finetunes = False  # model.init is its teacher
    command = "distill"
    command_help = "distil a trained run into a one-step generator (SiD, or FGM = SiD at alpha 0.5)"
    options = (Option("method", str, "sid", "sid (alpha 1.2) or fgm (alpha 0.5)"),)

    def objective(self, cfg, path, *, label_dropout: float, null: int | None, teacher: nn.Module | None) -> SiD:
        if teacher is None:
            raise ValueError("objective.name=sid distils a teacher: set model.init to the teacher's run folder "
                             "(or use `diffkit distill RUN --method sid`)")
        return SiD(teacher, **cfg.objective.args)

    def trainable(self, denoiser: nn.Module) -> SiDStudent:
        return SiDStudent.from_teacher(denoiser)

    def draw(self, model: SiDStudent, cfg, *, steps: int, guidance: float | None, label: int | None,
             n_classes: int, sampler: str) -> Callable:
        if guidance is not None:
            raise ValueError("a SiD generator is sampled without guidance (bake it into the teacher instead)")
        sigma_init = cfg.objective.args.get("sigma_init", SIGMA_INIT)

        def draw(z: Tensor, noise: NoiseSource) -> tuple[Tensor, int]:
            x = sid_sample(model.generator, z, sigma_init=sigma_init, steps=steps, cond=labels_of(label, z),
                           noise=noise)
            return x, steps
        return draw

    def derive(self, teacher: Trained, options: dict, out_dir: Path) -> list[str]:
        method = options["method"]
        if method not in ALPHAS:
            raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(ALPHAS)}")
        if teacher.cfg.objective.name != "denoising":
            raise ValueError(f"distill needs a denoising teacher; {teacher.folder} is a "
                             f"{teacher.cfg.objective.name} run")
        return ["objective.name=sid", "objective.args={}", f"model.init={quote(teacher.folder)}", "sample.steps=1",
                *SID_TRAIN, *ALPHAS[method]]
