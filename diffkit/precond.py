"""Parametrizations: what a network predicts, and how that becomes a denoiser.

Every prediction is an affine function of (x_0, eps) at fixed (x_t, t) on a path x_t = alpha x_0 + beta eps:

    eps        eps
    x0         x_0
    v          alpha eps - beta x_0                 (Salimans & Ho 2022, §4)
    velocity   alpha' x_0 + beta' eps = d x_t / d t (flow matching; eps - x_0 for rectified flow)
    score      -eps / beta = grad log p_t(x_t)

so `to_x0_eps` / `from_x0_eps` convert exactly between any two. `Precond` turns a raw network F into a
denoiser in the scale-free state x = x_t / alpha with one forward (EDM, Karras et al. 2022, Eq. 7):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)

Each prediction is only a choice of the four scalings. "edm" is EDM's own choice (Table 1, sigma_data);
the others feed the net the path's x_t and t, the inputs it was trained on.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffkit._tensor import per_sample
from diffkit.paths import Path

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


def _coefficients(path: Path, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(per_sample(f(t), x) for f in (path.alpha, path.beta, path.d_alpha, path.d_beta))


def _check(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown prediction {kind!r}; expected one of {allowed}")


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, t: Tensor, path: Path) -> tuple[Tensor, Tensor]:
    """Recover (x_0, eps) from a prediction of `kind` at x_t (B, ...) and t (B,) on `path`."""
    _check(kind, PREDICTIONS)
    a, b, da, db = _coefficients(path, t, x_t)
    if kind == "eps":
        return (x_t - b * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / b
    if kind == "v":
        r2 = a**2 + b**2
        return (a * x_t - b * pred) / r2, (b * x_t + a * pred) / r2
    if kind == "velocity":
        det = a * db - b * da
        return (db * x_t - b * pred) / det, (a * pred - da * x_t) / det
    eps = -b * pred  # score
    return (x_t - b * eps) / a, eps


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, t: Tensor, path: Path) -> Tensor:
    """The prediction of `kind` that corresponds to (x_0, eps) at time t (B,)."""
    _check(kind, PREDICTIONS)
    a, b, da, db = _coefficients(path, t, x0)
    return {
        "eps": lambda: eps,
        "x0": lambda: x0,
        "v": lambda: a * eps - b * x0,
        "velocity": lambda: da * x0 + db * eps,
        "score": lambda: -eps / b,
    }[kind]()


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, t: Tensor, path: Path) -> Tensor:
    """Convert a prediction of kind `src` into kind `dst` (both from PREDICTIONS)."""
    x0, eps = to_x0_eps(pred, src, x_t, t, path)
    return from_x0_eps(x0, eps, dst, t, path)


class Precond(nn.Module):
    """Wrap a raw network F(x, c_noise, cond) as a denoiser D(x, sigma, cond) in the scale-free state.

    prediction: one of PREDICTIONS (the net sees x_t = alpha x and c_noise = t) or "edm" (EDM Table 1:
    c_in = 1/sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma)/4).
    """

    def __init__(self, net: nn.Module, path: Path, prediction: str = "eps", sigma_data: float = 0.5):
        super().__init__()
        _check(prediction, PREDICTIONS + ("edm",))
        self.net, self.path, self.prediction, self.sigma_data = net, path, prediction, sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma (B,), each (B,)."""
        if self.prediction == "edm":
            sd = self.sigma_data
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
            c_in = 1 / torch.sqrt(sigma**2 + sd**2)
            return c_skip, c_out, c_in, torch.log(sigma) / 4
        t = self.path.t(sigma)
        a, b = self.path.alpha(t), self.path.beta(t)
        one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
        if self.prediction == "eps":  # x_0 = x - sigma eps
            c_skip, c_out = one, -sigma
        elif self.prediction == "x0":
            c_skip, c_out = zero, one
        elif self.prediction == "v":  # x_0 = (alpha x_t - beta v) / (alpha^2 + beta^2)
            c_skip, c_out = a**2 / (a**2 + b**2), -b / (a**2 + b**2)
        elif self.prediction == "velocity":  # x_0 = (beta' x_t - beta u) / (alpha beta' - beta alpha')
            da, db = self.path.d_alpha(t), self.path.d_beta(t)
            det = a * db - b * da
            c_skip, c_out = a * db / det, -b / det
        else:  # score: x_0 = x + sigma beta grad log p
            c_skip, c_out = one, sigma * b
        return c_skip, c_out, a, t

    def raw(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        """The network's own output F(c_in x, c_noise, cond), what objectives regress.

        extra: (B, k) further scalars for nets built with extra_scalars = k (a shortcut model's step size).
        """
        _, _, c_in, c_noise = self.scalings(self._sigma(x, sigma))
        kwargs = {} if extra is None else {"extra": extra}
        return self.net(per_sample(c_in, x) * x, c_noise.to(x.dtype), cond, **kwargs).to(x.dtype)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        c_skip, c_out, _, _ = self.scalings(self._sigma(x, sigma))
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * self.raw(x, sigma, cond, extra=extra)

    @staticmethod
    def _sigma(x: Tensor, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
