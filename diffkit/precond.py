"""Parametrizations: what a network predicts, and how that becomes a denoiser.

Every prediction is affine in (x_0, eps) at fixed t on a path x_t = alpha x_0 + beta eps,
pred = p_x0 x_0 + p_eps eps, with one row of coefficients per prediction (`_ROWS`):

    prediction   p_x0      p_eps
    eps          0         1
    x0           1         0
    v            -beta     alpha      (Salimans & Ho 2022, §4: v = alpha eps - beta x_0)
    velocity     alpha'    beta'      (d x_t / d t, flow matching; eps - x_0 for rectified flow)
    score        0         -1/beta    (grad log p_t(x_t) = -eps / beta)

With x_t, a prediction forms the linear system

    [x_t ]   [alpha  beta ] [x_0]
    [pred] = [p_x0   p_eps] [eps],     det = alpha p_eps - beta p_x0,

so `from_x0_eps` is its second row, `to_x0_eps` its inverse, and `convert` between any two predictions is
exact. `Precond` turns a raw network F into a denoiser in the scale-free state x = x_t / alpha with one
forward (EDM, Karras et al. 2022, Eq. 7):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)

For a path prediction the net sees the inputs it was trained on, c_in x = x_t and c_noise = t, and c_skip,
c_out are the x_0 row of the inverse with the first row divided by alpha (x = x_0 + sigma eps):

    x_0 = (p_eps x - sigma F) / (p_eps - sigma p_x0).

"edm" is EDM's own choice of all four scalings (Table 1, sigma_data).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from diffkit._tensor import per_sample
from diffkit.paths import Path

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")

# (p_x0, p_eps) of each prediction at time t, the table above. Constant entries stay Python floats, so the
# eps and x0 rows cost nothing and round nothing.
_ROWS: dict[str, Callable[[Path, Tensor], tuple[Tensor | float, Tensor | float]]] = {
    "eps": lambda path, t: (0.0, 1.0),
    "x0": lambda path, t: (1.0, 0.0),
    "v": lambda path, t: (-path.beta(t), path.alpha(t)),
    "velocity": lambda path, t: (path.d_alpha(t), path.d_beta(t)),
    "score": lambda path, t: (0.0, -1 / path.beta(t)),
}


def _check(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown prediction {kind!r}; expected one of {allowed}")


def _row(kind: str, path: Path, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    _check(kind, PREDICTIONS)
    return tuple(per_sample(c, like) for c in _ROWS[kind](path, t))


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, t: Tensor, path: Path) -> tuple[Tensor, Tensor]:
    """Recover (x_0, eps) from a prediction of `kind` at x_t (B, ...) and t (B,) on `path`."""
    p_x0, p_eps = _row(kind, path, t, x_t)
    alpha, beta = per_sample(path.alpha(t), x_t), per_sample(path.beta(t), x_t)
    det = alpha * p_eps - beta * p_x0
    return (p_eps * x_t - beta * pred) / det, (alpha * pred - p_x0 * x_t) / det


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, t: Tensor, path: Path) -> Tensor:
    """The prediction of `kind` that corresponds to (x_0, eps) at time t (B,)."""
    p_x0, p_eps = _row(kind, path, t, x0)
    return p_x0 * x0 + p_eps * eps


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
        p_x0, p_eps = _ROWS[self.prediction](self.path, t)
        det = p_eps - sigma * p_x0  # of [[1, sigma], [p_x0, p_eps]]: the system in x = x_t / alpha
        return p_eps / det, -sigma / det, self.path.alpha(t), t

    def raw(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        """The network's own output F(c_in x, c_noise, cond), what objectives regress.

        extra: (B, k) further scalars for nets built with extra_scalars = k (a shortcut model's step size).
        """
        _, _, c_in, c_noise = self.scalings(self._sigma(x, sigma))
        return self._net(x, c_in, c_noise, cond, extra)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.scalings(self._sigma(x, sigma))
        f = self._net(x, c_in, c_noise, cond, extra)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * f

    def _net(self, x: Tensor, c_in: Tensor, c_noise: Tensor, cond: Tensor | None, extra: Tensor | None) -> Tensor:
        kwargs = {} if extra is None else {"extra": extra}
        return self.net(per_sample(c_in, x) * x, c_noise.to(x.dtype), cond, **kwargs).to(x.dtype)

    @staticmethod
    def _sigma(x: Tensor, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
