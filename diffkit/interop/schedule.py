"""diffusers scheduler configs <-> diffkit paths, in float64 and without importing diffusers.

A discrete VP scheduler is a table alphas_cumprod[i], i = 0..N-1 (DDPM, Ho et al. 2020, Eq. 4: abar_i =
prod_{s<=i} (1 - beta_s)), and its network reads the timestep i. `DiscreteVP` makes the table a diffkit path:

    timestep tau = N t - 1,   sigma(t) piecewise linear in t through the knots (tau = -1, sigma = 0) and
                              (tau = i, sigma_i = sqrt((1 - abar_i) / abar_i)),

so t = (i + 1) / N is timestep i exactly. Between integers this is diffusers' own interpolation: its
EulerDiscreteScheduler (interpolation_type "linear") takes sigma linear in the timestep and feeds the network that
fractional timestep; the knot at tau = -1 is DDIM's final alpha_bar = 1 (set_alpha_to_one). A table whose last
alpha_bar is 0 (rescale_betas_zero_snr, Lin et al. 2024, Alg. 1) has an infinite last sigma, which no grid can
hold: the path then ends at timestep N - 2 (t_max = (N - 1) / N). diffusers' Euler scheduler puts alpha_bar = 2^-24
there instead, a sigma below that of timestep N - 2 for the usual tables, so not a path.

Flow-matching schedulers (FlowMatchEulerDiscreteScheduler: x_t = (1 - t) x_0 + t eps, velocity prediction, the
network reads N t) are diffkit's RectifiedFlow; their `shift` (SD3's t' = s t / (1 + (s - 1) t)) picks the
sampling times only, so it shapes the default grid (a Shifted path), not the denoiser.

Export runs the other way: `scheduler_config` writes trained_betas with alpha_bar_i = alpha((i + 1) / N)^2 of
any VP-scaling diffkit path (shifted ones too), so a DDPM/DDIM scheduler reproduces the path at every timestep it
can visit; the net must read timestep N t - 1. Unshifted rectified flow exports as FlowMatchEulerDiscreteScheduler
(shift 1), whose timestep N t is the net's when it reads N t. A shifted rectified flow does not export: its net reads
the unshifted time, diffusers' flow nets the interpolation time t' = s t / (1 + (s - 1) t).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffkit import paths
from diffkit.paths import Path

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                 "KDPM2DiscreteScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Keys whose value changes what a scheduler does in ways no diffkit path or sampler reproduces: (key, allowed
# values, why). Sampler-only ones (clipping, thresholding, learned variance) may be waived with strict=False.
_PATH_KEYS = (("timestep_type", ("discrete",), "the network would read 0.25 log(sigma), not a timestep"),
              ("interpolation_type", ("linear",), "diffkit interpolates sigma linearly between timesteps"),
              ("use_flow_sigmas", (False,), "flow sigmas in a VP scheduler are not a VP path"),
              ("use_dynamic_shifting", (False,), "the shift would depend on the image size (mu) at sampling time"),
              ("invert_sigmas", (False,), "inverted sigmas run from data to noise"),
              ("shift_terminal", (None,), "a stretched terminal time is not supported"),
              ("stochastic_sampling", (False,), "stochastic flow sampling is not supported"))
_SAMPLER_KEYS = (("clip_sample", (False,), "the scheduler clips x0 inside its step; diffkit's samplers do not"),
                 ("thresholding", (False,), "dynamic thresholding of x0 is not a denoiser"),
                 ("variance_type", (None, "fixed_small", "fixed_small_log"),
                  "a learned variance is not used by diffkit's samplers"))


class DiscreteVP(Path):
    """A VP path given by a table alphas_cumprod (N,), with sigma piecewise linear in t = (tau + 1) / N."""

    scaling = "vp"

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone()
        if abar.ndim != 1 or len(abar) < 2 or not ((abar >= 0) & (abar < 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in [0, 1)")
        zero_snr = bool(abar[-1] == 0)
        if not (abar[1:] < abar[:-1]).all():
            raise ValueError("alphas_cumprod must decrease strictly (every beta > 0)")
        self.alphas_cumprod, self.num_steps = abar, len(abar)
        sigma = torch.sqrt((1 - abar[:-1]) / abar[:-1])
        # An infinite last sigma is out of range; its knot only keeps the table increasing.
        last = 2 * sigma[-1:] if zero_snr else torch.sqrt((1 - abar[-1:]) / abar[-1:])
        self.knots = torch.cat([abar.new_zeros(1), sigma, last])  # sigma at t = k / N
        self.t_min, self.t_max = 1 / self.num_steps, (self.num_steps - 1 if zero_snr else self.num_steps) / self.num_steps

    def _on(self, device: torch.device) -> Tensor:
        """The knots on `device`, copied there once (a denoiser call must not copy the table every time)."""
        if self.knots.device != device:
            self.knots = self.knots.to(device)
        return self.knots

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        knots = self._on(t.device)
        k = torch.clamp(torch.floor(t * self.num_steps), 0, self.num_steps - 1).long()
        return k, knots[k], knots[k + 1]

    def sigma(self, t):
        t = paths._as_tensor(t).to(torch.float64)
        k, lo, hi = self._segment(t)
        return lo + (t * self.num_steps - k) * (hi - lo)

    def d_sigma(self, t):
        t = paths._as_tensor(t).to(torch.float64)
        _, lo, hi = self._segment(t)
        return (hi - lo) * self.num_steps

    def t(self, sigma):
        sigma = paths._as_tensor(sigma).to(torch.float64)
        knots = self._on(sigma.device)
        k = torch.clamp(torch.searchsorted(knots, sigma, right=True) - 1, 0, self.num_steps - 1)
        lo, hi = knots[k], knots[k + 1]
        return (k + (sigma - lo) / (hi - lo)) / self.num_steps

    def __repr__(self) -> str:
        return f"DiscreteVP(num_steps={self.num_steps}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


@dataclass(frozen=True)
class Schedule:
    """What a scheduler config says about its model: the path and prediction of its denoiser, the network's
    time input (timestep = num_train_timesteps * t + time_offset), and the path whose time axis default grids use."""

    path: Path
    prediction: str
    num_train_timesteps: int
    time_offset: float
    grid_path: Path


def betas(config: dict) -> Tensor:
    """The scheduler's betas rebuilt in float64 (its own are float32): trained_betas or beta_schedule, then
    rescale_betas_zero_snr."""
    n, lo, hi = int(config.get("num_train_timesteps", 1000)), config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        b = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        b = torch.linspace(lo, hi, n, dtype=torch.float64)
    elif kind == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        b = torch.linspace(lo**0.5, hi**0.5, n, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999
        abar = paths.VPCosine(num_steps=n).alphas_cumprod()
        b = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    elif kind == "sigmoid":  # GeoDiff's
        b = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (hi - lo) + lo
    else:
        raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported; diffkit reads linear, "
                         "scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas")
    if config.get("rescale_betas_zero_snr", False):
        root = torch.sqrt(torch.cumprod(1 - b, 0))
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])  # Lin et al. 2024, Alg. 1
        abar = root**2
        b = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return b


def _check(config: dict, keys, strict_hint: str = "") -> None:
    for key, allowed, why in keys:
        if key in config and config[key] not in allowed:
            raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported ({why}){strict_hint}")


def from_config(config: dict, *, strict: bool = True) -> Schedule:
    """The Schedule of a diffusers scheduler config (the dict of scheduler_config.json).

    strict: refuse sampler-only keys no diffkit sampler reproduces (clip_sample, thresholding, learned
    variance); strict=False samples without them. Keys that change the path are always refused."""
    cls = config.get("_class_name", "")
    if cls not in VP_SCHEDULERS + FLOW_SCHEDULERS:
        raise ValueError(f"scheduler config: _class_name {cls!r} is not a scheduler diffkit reads; supported: "
                         f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}")
    _check(config, _PATH_KEYS)
    if strict:
        _check(config, _SAMPLER_KEYS, "; set it to false in scheduler_config.json, or load with strict=False to "
                                      "sample without it")
    n = int(config.get("num_train_timesteps", 1000))
    if cls in FLOW_SCHEDULERS:
        shift = float(config.get("shift", 1.0))
        flow = paths.RectifiedFlow()
        return Schedule(flow, "velocity", n, 0.0, flow if shift == 1 else paths.Shifted(flow, shift))
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"scheduler config: prediction_type {kind!r} is not supported; diffkit reads "
                         f"{', '.join(PREDICTIONS)}")
    path = DiscreteVP(torch.cumprod(1 - betas(config), 0))
    return Schedule(path, PREDICTIONS[kind], n, -1.0, path)


def exported_betas(path: Path, num_train_timesteps: int) -> Tensor:
    """float64 betas whose alpha_bar_i is alpha((i + 1) / N)^2 of a VP-scaling path; an infinite last sigma
    (vp_cosine at t = 1) gets diffusers' cap beta = 0.999 instead."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    abar = 1 / (1 + path.sigma(t) ** 2)
    b = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return torch.clamp(torch.nan_to_num(b, nan=1.0), max=0.999)


def scheduler_config(path: Path, prediction: str, num_train_timesteps: int, time_offset: float) -> dict:
    """The scheduler config that reproduces a path, prediction and the net's time input (timestep = N t +
    time_offset): a DDPMScheduler's (DDIMScheduler reads the same keys) for VP paths, a flow-matching one for
    rectified flow; anything else is a ValueError that says why."""
    if type(path) is paths.RectifiedFlow:
        if prediction != "velocity" or time_offset != 0:
            raise ValueError("a rectified-flow run exports as flow matching only with model.prediction: velocity and "
                             "model.args.time_offset: 0 (diffusers' flow nets read timestep N t)")
        return {"_class_name": FLOW_SCHEDULERS[0], "num_train_timesteps": num_train_timesteps, "shift": 1.0}
    if path.scaling != "vp":
        raise ValueError(f"{path!r} does not export to diffusers: VP paths export as DDPM/DDIM schedulers and unshifted "
                         "rectified flow as flow matching (a shifted flow's net reads the unshifted time)")
    if time_offset != -1:
        raise ValueError("a VP run exports only with model.args.time_offset: -1 (DDPM/DDIM timestep i is path time "
                         "(i + 1) / N)")
    names = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in names:
        raise ValueError(f"prediction {prediction!r} has no diffusers prediction_type; export needs eps, v or x0")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": num_train_timesteps,
            "trained_betas": exported_betas(path, num_train_timesteps).tolist(), "prediction_type": names[prediction],
            "clip_sample": False, "variance_type": "fixed_small", "timestep_spacing": "leading", "steps_offset": 0}
