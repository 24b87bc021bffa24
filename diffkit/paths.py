"""Noise paths x_t = alpha(t) x_0 + beta(t) eps, with data at t = 0 and noise at t = 1.

A path is two things: its noise level sigma(t) = beta(t) / alpha(t) in the scale-free state x_t / alpha
(Karras et al. 2022, "EDM", §2 and Table 1), and a scaling rule alpha(sigma) that says how the state is
scaled on the way:

    "ve"      alpha = 1                     (VE / score SDE, EDM)
    "vp"      alpha^2 + beta^2 = 1          (DDPM, cosine)
    "linear"  alpha + beta = 1              (rectified flow / flow matching)

beta, log-SNR, the time derivatives (for velocity targets) and the inverse t(sigma) all follow, so a
resolution-shifted path (Hoogeboom et al. 2023, "simple diffusion", §3.1) is only a rescaled sigma(t).

Training densities over t live here too, because each one is a statement about a path's time axis.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_SCALINGS = ("ve", "vp", "linear")


def _as_tensor(t: Tensor | float) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)


def alpha_of_sigma(sigma: Tensor, scaling: str) -> Tensor:
    """alpha as a function of the scale-free noise level, for one of the three scaling rules."""
    if scaling == "ve":
        return torch.ones_like(sigma)
    if scaling == "vp":
        return torch.rsqrt(1 + sigma**2)
    if scaling == "linear":
        return 1 / (1 + sigma)
    raise ValueError(f"unknown scaling {scaling!r}; expected one of {_SCALINGS}")


def _d_alpha_d_sigma(sigma: Tensor, scaling: str) -> Tensor:
    if scaling == "ve":
        return torch.zeros_like(sigma)
    if scaling == "vp":
        return -sigma * (1 + sigma**2) ** -1.5
    return -1 / (1 + sigma) ** 2


class Path:
    """Base class: subclasses give sigma(t), its derivative, its inverse, a scaling rule and a t range.

    t_min and t_max bound the part of the time axis that samplers use by default (sigma_max must be finite).
    """

    scaling: str = "ve"
    t_min: float = 0.0
    t_max: float = 1.0

    def sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / d t."""
        raise NotImplementedError

    def t(self, sigma: Tensor | float) -> Tensor:
        """Exact inverse of sigma(t)."""
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return alpha_of_sigma(self.sigma(t), self.scaling)

    def beta(self, t: Tensor | float) -> Tensor:
        sigma = self.sigma(t)
        return alpha_of_sigma(sigma, self.scaling) * sigma

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return _d_alpha_d_sigma(self.sigma(t), self.scaling) * self.d_sigma(t)

    def d_beta(self, t: Tensor | float) -> Tensor:
        # beta = alpha(sigma) * sigma, so d beta = (alpha'(sigma) sigma + alpha(sigma)) d sigma.
        sigma = self.sigma(t)
        dab = _d_alpha_d_sigma(sigma, self.scaling) * sigma + alpha_of_sigma(sigma, self.scaling)
        return dab * self.d_sigma(t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """log(alpha^2 / beta^2) = -2 log sigma."""
        return -2 * torch.log(self.sigma(t))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class VPLinear(Path):
    """DDPM (Ho et al. 2020) in continuous time: beta(t) linear from N*beta_start to N*beta_end.

    alpha(t)^2 = exp(-(beta_min t + beta_d t^2 / 2)), so sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    (EDM Table 1, VP column). `alphas_cumprod()` gives DDPM's exact discrete table.
    """

    scaling = "vp"
    t_min = 1e-3

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
        self.beta_start, self.beta_end, self.num_steps = beta_start, beta_end, num_steps

    @property
    def _beta_min(self) -> float:
        return self.num_steps * self.beta_start

    @property
    def _beta_d(self) -> float:
        return self.num_steps * (self.beta_end - self.beta_start)

    def sigma(self, t):
        t = _as_tensor(t)
        return torch.sqrt(torch.expm1(0.5 * self._beta_d * t**2 + self._beta_min * t))

    def d_sigma(self, t):
        t = _as_tensor(t)
        e = torch.exp(0.5 * self._beta_d * t**2 + self._beta_min * t)
        return 0.5 * (self._beta_d * t + self._beta_min) * e / self.sigma(t)

    def t(self, sigma):
        # Solve beta_d t^2 / 2 + beta_min t = log(1 + sigma^2) for t >= 0.
        c = torch.log1p(_as_tensor(sigma) ** 2)
        return (torch.sqrt(self._beta_min**2 + 2 * self._beta_d * c) - self._beta_min) / self._beta_d

    def alphas_cumprod(self) -> Tensor:
        """DDPM's discrete prod_{s<=i} (1 - beta_s), float64, shape (num_steps,)."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)


class VPCosine(Path):
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): alpha_bar(t) = f(t)/f(0), f = cos^2((t+s)/(1+s) pi/2)."""

    scaling = "vp"
    t_min = 1e-3
    t_max = 1 - 1e-3  # alpha_bar(1) = 0: sigma is infinite at t = 1.

    def __init__(self, s: float = 0.008, num_steps: int = 1000):
        self.s, self.num_steps = s, num_steps

    def _angle(self, t):
        return (_as_tensor(t) + self.s) / (1 + self.s) * math.pi / 2

    def alpha(self, t):
        return torch.cos(self._angle(t)) / math.cos(self.s / (1 + self.s) * math.pi / 2)

    def sigma(self, t):
        a = self.alpha(t)
        return torch.sqrt(1 - a**2) / a

    def d_sigma(self, t):
        # sigma = sqrt(1/a^2 - 1)  =>  d sigma = -a' / (a^3 sigma).
        a = self.alpha(t)
        d_a = -torch.sin(self._angle(t)) * (math.pi / 2 / (1 + self.s)) / math.cos(self.s / (1 + self.s) * math.pi / 2)
        return -d_a / (a**3 * self.sigma(t))

    def t(self, sigma):
        a = alpha_of_sigma(_as_tensor(sigma), "vp")
        angle = torch.arccos(a * math.cos(self.s / (1 + self.s) * math.pi / 2))
        return angle * 2 / math.pi * (1 + self.s) - self.s

    def alphas_cumprod(self) -> Tensor:
        """The discrete 'squaredcos_cap_v2' table: betas = min(1 - f((i+1)/N)/f(i/N), 0.999), float64."""
        i = torch.arange(self.num_steps, dtype=torch.float64)
        f = lambda t: torch.cos(self._angle(t)) ** 2  # noqa: E731
        betas = torch.clamp(1 - f((i + 1) / self.num_steps) / f(i / self.num_steps), max=0.999)
        return torch.cumprod(1 - betas, 0)


class VE(Path):
    """Variance exploding (Song et al. 2021, score SDE): geometric sigma(t) = sigma_min (sigma_max/sigma_min)^t."""

    scaling = "ve"

    def __init__(self, sigma_lo: float = 0.01, sigma_hi: float = 50.0):
        self.sigma_lo, self.sigma_hi = sigma_lo, sigma_hi

    def sigma(self, t):
        return self.sigma_lo * (self.sigma_hi / self.sigma_lo) ** _as_tensor(t)

    def d_sigma(self, t):
        return self.sigma(t) * math.log(self.sigma_hi / self.sigma_lo)

    def t(self, sigma):
        return torch.log(_as_tensor(sigma) / self.sigma_lo) / math.log(self.sigma_hi / self.sigma_lo)


class EDM(Path):
    """EDM (Karras et al. 2022): sigma(t) = t, alpha = 1; t runs over [sigma_min, sigma_max] = [0.002, 80]."""

    scaling = "ve"

    def __init__(self, sigma_lo: float = 0.002, sigma_hi: float = 80.0):
        self.t_min, self.t_max = sigma_lo, sigma_hi

    def sigma(self, t):
        return _as_tensor(t).clone()

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def t(self, sigma):
        return _as_tensor(sigma).clone()


class RectifiedFlow(Path):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023): alpha = 1 - t, beta = t.

    Its velocity d x_t / d t = eps - x_0 is the flow-matching target.
    """

    scaling = "linear"
    t_min = 1e-3
    t_max = 1 - 1e-3  # sigma = t / (1 - t) is infinite at t = 1.

    def alpha(self, t):
        return 1 - _as_tensor(t)

    def beta(self, t):
        return _as_tensor(t).clone()

    def sigma(self, t):
        t = _as_tensor(t)
        return t / (1 - t)

    def d_sigma(self, t):
        return 1 / (1 - _as_tensor(t)) ** 2

    def t(self, sigma):
        sigma = _as_tensor(sigma)
        return sigma / (1 + sigma)


class Shifted(Path):
    """A path with its log-SNR shifted by -2 log(scale): sigma(t) = scale * base.sigma(t).

    Simple diffusion (Hoogeboom et al. 2023, Eq. 4) shifts by 2 log(base_size / size) for images of side
    `size`, i.e. scale = size / base_size: more noise at higher resolution. For rectified flow this is
    SD3's time shift t' = s t / (1 + (s - 1) t) with s = scale.
    """

    def __init__(self, base: Path, scale: float):
        if scale <= 0:
            raise ValueError(f"Shifted needs scale > 0, got {scale}")
        self.base, self.scale = base, scale
        self.scaling, self.t_min, self.t_max = base.scaling, base.t_min, base.t_max

    @classmethod
    def for_resolution(cls, base: Path, size: int, base_size: int = 64) -> Shifted:
        return cls(base, size / base_size)

    def sigma(self, t):
        return self.scale * self.base.sigma(t)

    def d_sigma(self, t):
        return self.scale * self.base.d_sigma(t)

    def t(self, sigma):
        return self.base.t(_as_tensor(sigma) / self.scale)


# Training densities over t (each returns t of shape (n,), float64, on the generator's device).


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class Uniform:
    """t ~ U[t_lo, t_hi] (DDPM, flow matching); defaults to the path's own range."""

    def __init__(self, t_lo: float | None = None, t_hi: float | None = None):
        self.t_lo, self.t_hi = t_lo, t_hi

    def sample(self, path: Path, n: int, generator: torch.Generator | None = None) -> Tensor:
        lo = path.t_min if self.t_lo is None else self.t_lo
        hi = path.t_max if self.t_hi is None else self.t_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=_device(generator))


class LogNormal:
    """ln sigma ~ N(p_mean, p_std^2) (EDM §5, P_mean = -1.2, P_std = 1.2), mapped to t by the path's inverse."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, path: Path, n: int, generator: torch.Generator | None = None) -> Tensor:
        ln_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64, device=_device(generator))
        return path.t(ln_sigma.exp())


class LogitNormal:
    """logit(t) ~ N(mean, std^2) (Esser et al. 2024, SD3 §3.1), scaled into the path's t range."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def sample(self, path: Path, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64, device=_device(generator)))
        return path.t_min + (path.t_max - path.t_min) * u


DENSITIES = {"uniform": Uniform, "lognormal": LogNormal, "logit_normal": LogitNormal}
