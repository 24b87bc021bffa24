"""Shortcut models: one network, one training phase, sampling with any power-of-two number of steps.

Frans, Hafner, Levine & Abbeel 2024, "One Step Diffusion via Shortcut Models" (arXiv 2410.12557), §3 with
Algorithm 1 (training) and Algorithm 2 (sampling), and the reference code kvfrans/shortcut-models
(`targets_shortcut.py`, `helper_inference.py`). The paper runs time from noise (t = 0) to data (t = 1); here
it runs the other way (diffkit's convention): x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0 = dx_t/dt,
sampling from t = 1 to t = 0. A shortcut s(x_t, t, d) is the average velocity over a step of size d, so

    x_{t-d} ~ x_t - d s(x_t, t, d)                                     (shortcut Euler step)
    s(x_t, t, 2d) = (s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)) / 2    (self-consistency)
    s(x_t, t, d_min) = v as in flow matching                                   (the d -> 0 end)

and the loss is flow matching at the smallest step d_min = 2^-K (K = `levels`) on most of the batch, plus
self-consistency, |s(x_t, t, 2d) - stopgrad(target)|^2, on a fraction of it.

The net is a diffkit net built with extra_scalars=1 inside Precond(net, RectifiedFlow(), "velocity"), but
it is called directly at (x_t, c_noise = t, cond, extra = log2(1/d) / K): Precond works in the scale-free
state x_t / alpha with sigma = t / (1 - t), which is undefined at t = 1, where every shortcut sample starts
and where the paper's time grid reaches. The Precond wrapper still records path and prediction in the
checkpoint, and at d = d_min (extra = 1) and t < 1, `model(x, sigma, extra=...)` is an ordinary flow
denoiser that diffkit's generic samplers can use. d is encoded as log2(1/d) / K in [0, 1] (0: one step over
the whole interval, 1: d_min): the paper feeds the integer log2(1/d) to a timestep embedder, and the
rescaling puts it on the same [0, 1] scale as t for the net's Fourier features.

`ShortcutMethod` is how the jobs train and sample it from a run's config (diffkit.method).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from diffkit._tensor import per_sample
from diffkit.method import Method, labels_of
from diffkit.paths import RectifiedFlow
from diffkit.precond import Precond

LEVELS = 7  # d_min = 2^-7: 128 steps, as the paper's `denoise_timesteps`


def step_counts(levels: int = LEVELS) -> list[int]:
    """The step counts a shortcut model trained with `levels` samples with: 1, 2, 4, ..., 2^levels."""
    return [2**i for i in range(levels + 1)]


def _check_model(model: Precond) -> None:
    if type(model.path) is not RectifiedFlow or model.prediction != "velocity":
        raise ValueError("shortcut models need Precond(net, paths.RectifiedFlow(), 'velocity') with a net built "
                         f"with extra_scalars=1; got path {model.path!r}, prediction {model.prediction!r}")


def shortcut_velocity(model: Precond, x_t: Tensor, t: Tensor, d: Tensor, cond: Tensor | None = None, *,
                      levels: int = LEVELS) -> Tensor:
    """s(x_t, t, d): the raw net at x_t (B, ...), t (B,), step size d (B,); see the module docstring for why raw."""
    extra = (torch.log2(1 / d) / levels).reshape(-1, 1).to(x_t.dtype)
    return model.net(x_t, t.to(x_t.dtype), cond, extra=extra).to(x_t.dtype)


def _guided(model: Precond, x: Tensor, t: Tensor, d: Tensor, cond: Tensor, null: Tensor | int, w: float,
            levels: int) -> Tensor:
    """v_u + w (v_c - v_u) from one batched call of 2B rows (w = 1: conditional, w = 0: unconditional)."""
    nulls = torch.as_tensor(null, dtype=cond.dtype, device=cond.device).expand_as(cond)
    v_c, v_u = shortcut_velocity(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([d, d]),
                                 torch.cat([cond, nulls]), levels=levels).chunk(2)
    return v_u + w * (v_c - v_u)


class Targets(NamedTuple):
    """One training batch: the net is regressed as s(x_t, t, d, cond) ~ target (rows [0, n) self-consistency)."""

    x_t: Tensor  # (B, ...)
    t: Tensor  # (B,) float64, a multiple of d in [d, 1]
    d: Tensor  # (B,) float64, the step size the net is conditioned on
    cond: Tensor | None  # (B, ...) after label dropout
    target: Tensor  # (B, ...), no gradient


class Shortcut:
    """loss(model, x0, cond, generator, ema) -> (B,) per-sample shortcut-model loss (Algorithm 1).

    levels: K, so step sizes are powers of two from 1 down to d_min = 2^-K.
    bootstrap_fraction: share of each batch given self-consistency targets, its first rows (the reference
      code's default is 1/8, `bootstrap_every = 8`). The rest is flow matching at d_min.
    Shortcut sizes are spread evenly over the self-consistency rows, as in the reference code.
    clip: x' and the self-consistency target are clipped to [-clip, clip] as the reference code does (None: off).
    label_dropout, null: conditions replaced by `null` with this probability (Ho & Salimans 2022, Alg. 1), on
      every row: the reference code drops them on the flow-matching rows only, which leaves the unconditional
      model without shortcuts, so inference-time guidance would work only at 2^K steps.
    cfg_scale: bake classifier-free guidance v_u + w (v_c - v_u) into the targets at the finest
      self-consistency level (2d = 2^-(K-1)), whence it propagates to coarser steps (`bootstrap_cfg`).
      A model trained so is sampled without guidance for steps < 2^K.

    `uses_ema`: the training loop passes `ema=` (the frozen EMA copy of the model), whose weights build the
    self-consistency targets as in the reference code (`bootstrap_ema = 1`); without it the live weights do.
    """

    uses_ema = True

    def __init__(self, *, levels: int = LEVELS, bootstrap_fraction: float = 0.25, clip: float | None = 4.0,
                 label_dropout: float = 0.0, null: Tensor | int | None = None, cfg_scale: float | None = None):
        if levels < 1 or not 0 <= bootstrap_fraction <= 1:
            raise ValueError(f"need levels >= 1 and bootstrap_fraction in [0, 1], got {levels}, {bootstrap_fraction}")
        if not 0 <= label_dropout <= 1 or (label_dropout > 0 and null is None):
            raise ValueError("label_dropout must be in [0, 1], and needs a `null` condition when > 0")
        if cfg_scale is not None and label_dropout == 0:
            raise ValueError("cfg_scale needs an unconditional model too: set label_dropout > 0 and `null`")
        self.levels, self.bootstrap_fraction, self.clip = levels, bootstrap_fraction, clip
        self.label_dropout, self.null, self.cfg_scale = label_dropout, null, cfg_scale

    def _clip(self, x: Tensor) -> Tensor:
        return x if self.clip is None else x.clamp(-self.clip, self.clip)

    def _teacher(self, teacher: Precond, x: Tensor, t: Tensor, d: Tensor, cond: Tensor | None,
                 finest: Tensor) -> Tensor:
        """One d-step velocity of the target network, guided on the `finest` rows when cfg_scale is set."""
        v = shortcut_velocity(teacher, x, t, d, cond, levels=self.levels)
        if self.cfg_scale is not None and finest.any():
            v[finest] = _guided(teacher, x[finest], t[finest], d[finest], cond[finest], self.null, self.cfg_scale,
                                self.levels)
        return v

    @torch.no_grad()
    def targets(self, model: Precond, x0: Tensor, cond: Tensor | None = None, *,
                generator: torch.Generator | None = None, ema: Precond | None = None) -> Targets:
        """Draw (t, d, eps) for the batch x0 (B, ...) and build the regression targets (reference code steps 1-5)."""
        _check_model(model)
        if self.cfg_scale is not None and cond is None:
            raise ValueError("cfg_scale is for conditional models: pass the batch's conditions")
        b, k = x0.shape[0], self.levels
        n = int(b * self.bootstrap_fraction)
        # All randomness comes from `generator` on its own device, so a seed fixes the batch's draws.
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
        if cond is not None and self.label_dropout > 0:
            drop = (torch.rand(b, generator=generator, device=device) < self.label_dropout).to(cond.device)
            null = torch.as_tensor(self.null, dtype=cond.dtype, device=cond.device)
            cond = torch.where(per_sample(drop, cond).bool(), null, cond)
        # Shortcut sizes 2d = 2^-level, level in 0..K-1, spread evenly over the self-consistency rows as the
        # reference code does (here from a random offset, so batches of fewer than K rows stay unbiased);
        # d_min on the flow-matching rows.
        level = (torch.arange(n, device=device) + torch.randint(k, (1,), generator=generator, device=device)) % k
        step = torch.cat([2.0 ** -level.double(), torch.full((b - n,), 2.0**-k, dtype=torch.float64, device=device)])
        # t on the grid of multiples of the step, t in {step, 2 step, ..., 1}, so one step lands at t - step >= 0
        # (the reference code's t in {0, ..., 1 - step} with time reversed).
        t = (torch.floor(torch.rand(b, generator=generator, dtype=torch.float64, device=device) / step) + 1) * step
        step, t, level = step.to(x0.device), t.to(x0.device), level.to(x0.device)
        x_t = (1 - per_sample(t, x0)) * x0 + per_sample(t, x0) * eps
        target = eps - x0  # flow-matching velocity (Alg. 1, the d = d_min rows)
        if n:
            # Two d-steps with the EMA weights: s1 at (x_t, t), s2 at x' = x_t - d s1, t - d (Alg. 1, bootstrap).
            teacher, d = ema if ema is not None else model, step[:n] / 2
            c = None if cond is None else cond[:n]
            finest = level == k - 1
            s1 = self._teacher(teacher, x_t[:n], t[:n], d, c, finest)
            x_mid = self._clip(x_t[:n] - per_sample(d, s1) * s1)
            s2 = self._teacher(teacher, x_mid, t[:n] - d, d, c, finest)
            target = torch.cat([self._clip((s1 + s2) / 2), target[n:]])
        return Targets(x_t, t, step, cond, target)

    def __call__(self, model: Precond, x0: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None, ema: Precond | None = None) -> Tensor:
        x_t, t, d, cond, target = self.targets(model, x0, cond, generator=generator, ema=ema)
        pred = shortcut_velocity(model, x_t, t, d, cond, levels=self.levels)
        return ((pred - target) ** 2).reshape(x0.shape[0], -1).mean(1)


@torch.no_grad()
def shortcut_sample(model: Precond, z: Tensor, steps: int, *, cond: Tensor | None = None,
                    guidance: float | None = None, null: Tensor | int | None = None, levels: int = LEVELS) -> Tensor:
    """x_0 from noise z (B, ...) by `steps` shortcut Euler steps of size d = 1/steps from t = 1 (Algorithm 2).

    steps: a power of two up to 2^levels (levels as in training). One net call per step; with `guidance` w
    (v_u + w (v_c - v_u), w = 1 is plain conditional) each call is one batch of 2B rows, with `null` the
    unconditional label.
    """
    _check_model(model)
    valid = step_counts(levels)
    if not isinstance(steps, int) or steps not in valid:
        raise ValueError(f"steps must be a power of two from 1 to {valid[-1]} for levels={levels} "
                         f"({', '.join(map(str, valid))}), got {steps!r}")
    guided = guidance is not None and guidance != 1
    if guided and (cond is None or null is None):
        raise ValueError("guidance needs `cond` and the `null` condition")
    d = torch.full((z.shape[0],), 1 / steps, dtype=torch.float64, device=z.device)
    x = z
    for i in range(steps):
        t = 1 - i * d
        v = (_guided(model, x, t, d, cond, null, guidance, levels) if guided
             else shortcut_velocity(model, x, t, d, cond, levels=levels))
        x = x - per_sample(d, x) * v  # shortcut Euler step from t to t - d
    return x


class ShortcutMethod(Method):
    """Shortcut models as a run's method: a flow whose net also takes the step size, sampled by its own sampler."""

    name = "shortcut"
    objective_class = Shortcut
    own_args = ("label_dropout", "null")
    trains_flow = True
    extra_scalars = 1
    nets = ("mlp", "unet", "dit")  # diffusers' UNet has no input for the step size d
    samplers = ("shortcut",)
    likelihood = None  # its net also takes the step size d; at d_min it is a flow, not wired here

    def check(self, cfg) -> None:
        super().check(cfg)
        # Checked with the config, not after training, when the job samples the model with sample.steps.
        valid = step_counts(cfg.objective.args.get("levels", LEVELS))
        if cfg.sample.steps not in valid:
            raise ValueError(f"sample.steps={cfg.sample.steps}: a shortcut model samples with a power of two steps "
                             f"({', '.join(map(str, valid))} for its levels)")

    def objective(self, cfg, path, *, label_dropout: float, null: int | None, teacher=None) -> Shortcut:
        return Shortcut(label_dropout=label_dropout, null=null, **cfg.objective.args)

    def draw(self, model: Precond, cfg, *, steps: int, guidance: float | None, label: int | None,
             n_classes: int, sampler: str) -> Callable:
        levels = cfg.objective.args.get("levels", LEVELS)
        guided = guidance is not None and guidance != 1

        def draw(z: Tensor, noise) -> tuple[Tensor, int]:
            x = shortcut_sample(model, z, steps, cond=labels_of(label, z), guidance=guidance, null=n_classes,
                                levels=levels)
            return x, steps * (2 if guided else 1)
        return draw
