"""Peer normalizing flows on sklearn digits in bits per dimension: zuko's MAF and NSF, and a diagonal Gaussian.

The likelihood benchmark compares diffkit's flows with the best normalizing flows of a maintained library, zuko
(Rozet et al., https://github.com/probabilists/zuko): a masked autoregressive flow (MAF; Papamakarios et al. 2017,
"Masked Autoregressive Flow for Density Estimation") and a neural spline flow with rational-quadratic splines
(NSF; Durkan et al. 2019, "Neural Spline Flows"), both fully autoregressive. Each uses zuko's recommended
settings: 3 transforms, 3 hidden layers, Adam at lr 1e-3, features standardized (zuko asks for it: its splines act
on [-5, 5]). NSF takes the README's hidden width 128 (693,696 parameters); MAF's width, 288, gives it a comparable
count (666,528). Both train for the same number of steps at the same batch size. The diagonal Gaussian baseline is
fitted in closed form (128 parameters).

Data and what is counted (diffkit.data.dequantize and dequantized_bits, as for every diffkit model). diffkit.data.digits scales the 17
integer levels k = 0..16 to x_k = k / 8 - 1, so one level is delta = 2 / (L - 1) = 1/8 wide in scaled units. Training
batches are dequantized afresh, x_k + delta w with w ~ U[-1/2, 1/2)^D (Theis et al. 2016, "A note on the
evaluation of generative models"). The held-out split is scored under the same dequantization, averaged over
DRAWS draws, and

    bits/dim = -(log p(x_k + delta w) + D log delta) / (D ln 2),

where D log delta is the Jacobian of the scaling into units of the integer grid: this bounds -log2 P(k) / D of the
discrete data from above (Ho et al. 2019, "Flow++", Sec. 3.1), the same figure the diffusion models report.

    python -m benchmarks.flow_peers [--quick] [--steps 3000] [--batch 256] [--seed 0] [--json FILE]

prints a table of held-out and train bits/dim, parameter count, training seconds and steps per model (and writes
it to --json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from diffkit import data
from diffkit.report import table

DIGITS_LEVELS = 17  # diffkit.data.digits: pixel values k = 0..16 scaled to k / 8 - 1
DRAWS = 4  # dequantization draws per held-out image
LR = 1e-3
FLOWS = {  # zuko's constructor arguments per flow, on top of the number of features
    "maf": {"transforms": 3, "hidden_features": [288] * 3},
    "nsf": {"transforms": 3, "hidden_features": [128] * 3},
}
MODELS = ("gaussian", *FLOWS)

LogProb = Callable[[Tensor], Tensor]
"""log_prob(x) -> log-density (B,) in nats of x (B, D) in the data's scaled units."""


def gaussian_fit(train: Tensor, *, levels: int) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (D,) of the diagonal Gaussian most likely on dequantized train (N, D).

    The expectation over the noise is closed-form: E_w[log N(x + delta w; m, s^2)] = -log(2 pi s^2) / 2
    - ((x - m)^2 + delta^2 / 12) / (2 s^2) per dimension, maximised at m = mean(x), s^2 = var(x) + delta^2 / 12.
    """
    delta = 2 / (levels - 1)  # one level's width in the loader's units (diffkit.data.dequantize)
    mean = train.mean(0)
    return mean, ((train - mean).pow(2).mean(0) + delta**2 / 12).sqrt()


def standardized(base: LogProb, mean: Tensor, scale: Tensor) -> LogProb:
    """log p(x) = log base((x - mean) / scale) - sum log scale: base applied to standardized features."""
    return lambda x: base((x - mean) / scale) - scale.log().sum()


def standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I), (B,), for z (B, D)."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi))


def score(log_prob: LogProb, test: Tensor, *, levels: int, draws: int, generator: torch.Generator) -> float:
    """Bits per dimension of test (N, D), averaged over its images and `draws` dequantizations of each."""
    with torch.no_grad():
        log_p = sum(log_prob(data.dequantize(test, levels=levels, generator=generator)) for _ in range(draws)) / draws
    return data.dequantized_bits(log_p, dims=test.shape[1], levels=levels).mean().item()


def _train(flow: torch.nn.Module, log_prob: LogProb, train: Tensor, *, levels: int, steps: int, batch: int,
           generator: torch.Generator) -> None:
    """Maximum likelihood on freshly dequantized batches drawn with replacement, Adam at zuko's lr."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=LR)
    for _ in range(steps):
        x = data.dequantize(train[torch.randint(len(train), (batch,), generator=generator)], levels=levels,
                            generator=generator)
        loss = -log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fit_and_score(name: str, train: Tensor, test: Tensor, *, steps: int, batch: int, seed: int,
                  levels: int = DIGITS_LEVELS, draws: int = DRAWS) -> dict:
    """Fit model `name` ("gaussian", "maf" or "nsf") to train (N, ...) and score it on test (M, ...).

    Both splits are on the grid of `levels` levels in [-1, 1] (diffkit.data.digits). Returns {"model", "bpd"
    (held-out bits/dim), "train_bpd" (on train), "params", "train_seconds", "steps", "batch"}; the Gaussian takes
    no steps (0, 0).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    train, test = train.flatten(1), test.flatten(1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    mean, scale = gaussian_fit(train, levels=levels)
    if name == "gaussian":
        log_prob, params, steps, batch = standardized(standard_normal, mean, scale), 2 * train.shape[1], 0, 0
    else:
        import zuko

        with torch.random.fork_rng(devices=[]):  # zuko initialises from the global generator
            torch.manual_seed(seed)
            flow = getattr(zuko.flows, name.upper())(train.shape[1], **FLOWS[name])
        log_prob = standardized(lambda z: flow().log_prob(z), mean, scale)
        params = sum(p.numel() for p in flow.parameters())
        _train(flow, log_prob, train, levels=levels, steps=steps, batch=batch, generator=generator)
    seconds = time.perf_counter() - start
    bpd = score(log_prob, test, levels=levels, draws=draws, generator=generator)
    # the same figure on the training split shows how far a model has overfitted
    train_bpd = score(log_prob, train, levels=levels, draws=draws, generator=generator)
    return {"model": name, "bpd": bpd, "train_bpd": train_bpd, "params": params, "train_seconds": round(seconds, 1),
            "steps": steps, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow_peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (a smoke test, not a measurement)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--json", type=str, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    train, test = data.digits("train")[0], data.digits("test")[0]
    rows = [fit_and_score(name, train, test, steps=steps, batch=args.batch, seed=args.seed) for name in args.models]
    flows = [r for r in rows if r["model"] in FLOWS]
    best = min(flows, key=lambda r: r["bpd"]) if flows else None
    print(table(rows, ["model", "bpd", "train_bpd", "params", "train_seconds", "steps", "batch"]))
    if best is not None:
        print(f"best peer flow: {best['model']} at {best['bpd']:.4f} bits/dim ({len(test)} held-out digits, "
              f"{DRAWS} dequantization draws each)")
    if args.json:
        result = {"rows": rows, "draws": DRAWS, "seed": args.seed, "torch": torch.__version__,
                  "best_peer_flow": best and {"name": best["model"], "bpd": best["bpd"]}}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
