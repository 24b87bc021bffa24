"""Scaling-law fits: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", eq. 2), fitted as in their Approach 3 (App. D.2).

Written by hand on SciPy (no maintained package fits it). In log space with E = e^e, A = e^a, B = e^b the model
is log L = logsumexp(e, a - alpha log N, b - beta log D); the fit minimises the Huber loss (delta = 1e-3) of
its residuals against the observed log-losses with L-BFGS-B from a grid of starting points and keeps the best
(the surface has many local minima). Huber on log-loss makes a few bad runs matter little. Intervals come from
a bootstrap over runs (each resample refitted from the full fit and a few grid starts).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp, softmax

DELTA = 1e-3
NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class Fit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float  # the Huber objective at the optimum

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in NAMES}


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])
    r = logsumexp(terms, axis=0) - log_l
    p = softmax(terms, axis=0)
    dr = np.clip(r, -DELTA, DELTA)  # d huber / d r
    grad = np.array([dr @ p[0], dr @ p[1], dr @ p[2], -(dr * p[1]) @ log_n, -(dr * p[2]) @ log_d])
    return huber(DELTA, r).sum(), grad


def _starts(log_l: np.ndarray) -> list[np.ndarray]:
    """Hoffmann et al.'s grid, coarsened: E below the smallest loss, A and B over decades, exponents 0.1..1."""
    low = log_l.min()
    grid = ([low + np.log(f) for f in (0.3, 0.7, 0.95)], [0.0, 8.0], [0.0, 8.0], [0.2, 0.8], [0.2, 0.8])
    return [np.array(s) for s in itertools.product(*grid)]


def _best(starts, log_n, log_d, log_l) -> Fit:
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                       bounds=[(None, None)] * 3 + [(0.0, 3.0)] * 2)
        if best is None or res.fun < best.fun:
            best = res
    e, a, b, alpha, beta = best.x
    return Fit(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta), float(best.fun))


def fit(n, d, loss, *, starts: list[np.ndarray] | None = None) -> Fit:
    """The best fit of L(N, D) over the starting grid (or the `starts` given: arrays (e, a, b, alpha, beta))."""
    log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
    if not len(log_l) == len(log_n) == len(log_d) or len(log_l) < 5:
        raise ValueError(f"need at least 5 runs with N, D and a loss each, got {len(log_n)}, {len(log_d)}, {len(log_l)}")
    return _best(starts or _starts(log_l), log_n, log_d, log_l)


def bootstrap(n, d, loss, *, resamples: int = 200, level: float = 0.9, seed: int = 0,
              at: list[tuple[float, float]] = ()) -> dict:
    """The full fit, and `level` percentile intervals of its parameters and of its predictions at the (N, D)
    points `at`, from refits to runs resampled with replacement."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    full = fit(n, d, loss)
    x_full = np.log([full.E, full.A, full.B]).tolist() + [full.alpha, full.beta]
    rng = np.random.default_rng(seed)
    coarse = _starts(np.log(loss))[::16]
    draws = []
    for _ in range(resamples):
        i = rng.integers(0, len(loss), len(loss))
        f = fit(n[i], d[i], loss[i], starts=[np.array(x_full), *coarse])
        draws.append([*f.params().values(), *(f.predict(pn, pd) for pn, pd in at)])
    lo, hi = np.percentile(np.array(draws, float), [50 * (1 - level), 50 * (1 + level)], axis=0)
    keys = [*NAMES, *(f"L({pn:g}, {pd:g})" for pn, pd in at)]
    return {"fit": full, "level": level, "resamples": resamples,
            "intervals": {k: (float(a), float(b)) for k, a, b in zip(keys, lo, hi)}}
