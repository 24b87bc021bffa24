"""UniPC: a unified predictor-corrector multistep sampler (Zhao, Bai, Rao, Zhou, Lu 2023, arXiv 2302.04867).

In the scale-free state x = x_0 + sigma eps (alpha = 1, lambda = -log sigma) the PF-ODE is dx/dlambda = D - x,
and one step of length h = lambda' - lambda = log(s / s') is exactly (see diffkit.samplers.ode)

    x' = (s'/s) x + integral_0^h e^{tau - h} D(lambda + tau) dtau.                                      (*)

UniPC (§3, data-prediction form) keeps D_0 = D(lambda) exactly and adds the divided differences
D1_m = (D_m - D_0) / r_m of outputs D_m taken at lambda + r_m h:

    x' = (s'/s) x + (1 - e^{-h}) D_0 + B(h) sum_m a_m D1_m.                                             (**)

This is the paper's data-prediction update with alpha divided out. That update runs on -h, so the paper's
B_1(h) = h ("bh1") and B_2(h) = e^h - 1 ("bh2") enter here as B(h) = -B(-h) = h and 1 - e^{-h}.
The a_m solve R a = g / B(h) (§3.1, the paper's R_p(h) a_p = g_p(h) / B(h) with row k divided by h^{k-1}):
row k of R is (r_1^{k-1}, ..., r_K^{k-1}) and g_k = M_k / h^k with M_k = integral_0^h e^{tau - h} tau^k dtau
(= k! h^{k+1} phi_{k+1}(-h)), so that (**) integrates the terms of D's Taylor expansion up to tau^K exactly.

- UniP-p (predictor, §3.2, Corollary 3.2): the r_m < 0 of the p - 1 previous outputs; order p.
- UniC-p (corrector, §3.1, Theorem 3.1): redo the step just taken with one more difference, from the output D
  at the predicted point (r = 1): order p + 1. The next predictor starts from that same output (the paper does
  not evaluate the corrected point), so the corrector costs no denoiser call.

Where a single coefficient is solved for (UniP-2, UniC-1) it is fixed at its h -> 0 limit a_1 = 1/2, as the
authors' code and diffusers do: an O(h) change on an O(h^2) term, so the order stands. With two or more, B(h) a
does not depend on B (R and g fix it), so the variants differ only through the steps that use a_1 = 1/2; and
UniP-p for p >= 3 is then the exponential Adams-Bashforth step of `diffkit.samplers.ode.multistep`.

Final steps. The last step, to sigma = 0, is x = D(x, sigma_min) as in every diffkit sampler: (**) of order 1
as h -> inf. With `lower_order_final`, step i of n uses order at most n - i, counting that last step, as
diffusers does by default (final_sigmas_type="zero"): the step to sigma_min uses order <= 2, the one before
<= 3. diffusers applies this at every step count (its docstring says below 15 steps; its code does not check),
and so do we. The point at sigma_min is not corrected: the last step reads D there before a corrector could
use it, so a correction would cost one more call. The authors' code skips that corrector too; diffusers
computes it, then returns x = D of the uncorrected point.
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from diffkit.contracts import Denoiser
from diffkit.samplers.base import Callback, denoise, prepare
from diffkit.samplers.ode import _phi_moments

VARIANTS = ("bh1", "bh2")


def _bh(h: float, variant: str) -> float:
    """B(h) of (**): h for bh1, 1 - e^{-h} for bh2 (the paper's B_1, B_2 at -h, sign flipped)."""
    return h if variant == "bh1" else -math.expm1(-h)


def _coefficients(rs: list[float], h: float, b: float) -> list[float]:
    """The a_m of (**) for differences at lambda + r_m h: R a = g / B(h) (§3.1), or 1/2 for a single one."""
    if len(rs) == 1:
        return [0.5]
    moments = _phi_moments(h, len(rs) + 1)
    g = [moments[k] / h**k / b for k in range(1, len(rs) + 1)]
    return np.linalg.solve(np.vander(rs, increasing=True).T, g).tolist()


def _update(x: Tensor, s: float, s_next: float, points: list[tuple[float, Tensor]], variant: str,
            d_next: Tensor | None = None) -> Tensor:
    """(**) from (s, x) to s_next with the outputs `points` = [(lambda_j, D_j)], newest (at s) first.

    d_next, the output at the point reached (r = 1), makes it the corrector (UniC); without it, the predictor (UniP).
    """
    h = math.log(s / s_next)
    lam0, d0 = points[0]
    rs = [(lam - lam0) / h for lam, _ in points[1:]]
    diffs = [(d - d0) / r for r, (_, d) in zip(rs, points[1:])]
    if d_next is not None:
        rs.append(1.0)
        diffs.append(d_next - d0)
    x_next = (s_next / s) * x - math.expm1(-h) * d0
    if rs:
        b = _bh(h, variant)
        x_next = x_next + b * sum(a * d for a, d in zip(_coefficients(rs, h, b), diffs))
    return x_next


def unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator=None, noise=None,
          callback: Callback | None = None, order: int = 2, variant: str = "bh2", corrector: bool = True,
          lower_order_final: bool = True) -> Tensor:
    """UniPC-p with data prediction: x (B, ...) at sigmas[0] -> samples (B, ...). NFE = len(sigmas) - 1.

    order: p >= 1, the predictor's order (p + 1 with the corrector); the first steps warm up with lower orders.
    variant: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1); diffusers suggests bh1 for unconditional sampling
        below 10 steps, bh2 otherwise.
    corrector: apply UniC at every point reached but sigma_min (see the module docstring).
    lower_order_final: step i of n uses order at most n - i (diffusers' default).
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"unipc needs an integer order >= 1, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}: use 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1)")
    s = prepare(x, sigmas)
    n = len(s) - 1
    history: list[tuple[float, Tensor]] = []  # (lambda_j, D_j), newest first
    x_last, p_last = None, 0  # the point the last predictor started from, and its order
    for i in range(n):
        d = denoise(denoiser, x, s[i], callback, i)
        if s[i + 1] == 0:  # the last step: (**) of order 1 as h -> inf
            x = d
            continue
        if corrector and x_last is not None:
            # corrector (UniC-p_last): redo the last step with the new output d as one more difference
            x = _update(x_last, s[i - 1], s[i], history[:p_last], variant, d_next=d)
        history = [(-math.log(s[i]), d)] + history[: order - 1]
        # predictor (UniP-p), warming up through orders 1, 2, ... and, with lower_order_final, back down
        p = min(order, len(history), n - i if lower_order_final else order)
        x_last, p_last = x, p
        x = _update(x, s[i], s[i + 1], history[:p], variant)
    return x
