"""Low-rank compression of a trained digits model: quality vs rank for SVD, CR and ID (diffkit.lowrank.compress).

A section of `diffkit bench finetune` (benchmarks/finetune.py).

One digits MLP denoiser (width 256, depth 4, AdamW, constant lr after 50 warm-up steps) trained with diffkit's loop;
its EMA's nn.Linear layers (all of them: noise embedding, input, adaLN modulation, blocks, output) compressed to
rank r = 2..128 by each method. A layer whose smaller side is below r stays dense. CR draws r columns (merged
repeats, so the kept rank can be lower) with probabilities from the layer's inputs on 512 training examples at
training noise levels (CR of W X), once with seed 0; "cr (W I)" is CR without those inputs. Scored by the held-out
denoising loss (4 fixed noise draws) and the classifier Fréchet distance of 500 samples (the config's heun, 18
steps) to the held-out split.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_runs import SmallRun  # noqa: E402

from diffkit import lowrank, report  # noqa: E402

RANKS = (2, 4, 8, 16, 32, 64, 128)
METHODS = {"svd": ("svd", True), "id": ("id", True), "cr": ("cr", True), "cr (W I)": ("cr", False)}


PANELS = 2


def run(work: Path, quick: bool) -> dict:
    """Train (or resume) the model in `work`, compress it at each rank by each method, score; the section's JSON."""
    width, depth, steps, n_fd = (256, 4, 1500, 500) if not quick else (32, 2, 4, 50)
    ranks = RANKS if not quick else (2, 8)
    d = SmallRun(width, depth, ["train.cosine=false"])
    model = d.train(steps, work / "lowrank-digits").model
    gen = torch.Generator()

    def calibrate(m):  # the inputs each layer sees in training: training images at training noise levels
        gen.manual_seed(0)
        d.objective(m, d.x[:512], None, generator=gen)

    def score(m) -> dict:
        return {"loss": d.heldout_loss(m),
                "digits_fd": d.quality(SimpleNamespace(model=m), n_fd)["digits_fd"]}

    full = sum(p.numel() for p in model.parameters())
    base = {"params": full, **score(model)}
    rows = []
    for label, (method, calibrated) in METHODS.items():
        for rank in ranks:
            t0 = time.perf_counter()
            small, layers = lowrank.compress(model, rank, method=method, calibrate=calibrate if calibrated else None)
            seconds = time.perf_counter() - t0
            params = sum(p.numel() for p in small.parameters())
            factored = [r for r in layers if r["rank"] is not None]
            rows.append({"method": label, "rank": rank, "params": params, "params_fraction": params / full,
                         "layers_factored": len(factored), "layers": len(layers),
                         "mean_rel_error": sum(r["rel_error"] for r in factored) / max(len(factored), 1),
                         "compress_seconds": seconds, **score(small)})
    smallest = {}  # per method: the fewest parameters with FD within 1.5x of the uncompressed model's
    for label in METHODS:
        ok = [r for r in rows if r["method"] == label and r["digits_fd"] <= 1.5 * base["digits_fd"]]
        smallest[label] = min(ok, key=lambda r: r["params"])["rank"] if ok else None
    result = {"model": {"width": width, "depth": depth, "steps": steps, "params": full}, "uncompressed": base,
              "rows": rows, "fd_samples": n_fd, "smallest_rank_within_1.5x_fd": smallest}
    return result


def _fraction(result: dict, method: str, rank: int) -> float:
    return next(r["params_fraction"] for r in result["rows"] if r["method"] == method and r["rank"] == rank)


def markdown(result: dict) -> list[str]:
    m, base = result["model"], result["uncompressed"]
    return [f"Digits MLP (width {m['width']}, depth {m['depth']}, {m['steps']} steps, {m['params']} parameters): "
            f"uncompressed held-out loss {base['loss']:.4g}, classifier FD {base['digits_fd']:.4g} "
            f"({result['fd_samples']} samples). Every nn.Linear compressed at rank r (kept dense where its smaller "
            "side is below r); params counts the whole compressed model; mean_rel_error is the mean over factored "
            "layers of ||W - W_r||_F / ||W||_F.", "",
            "Smallest model with FD within 1.5x of the uncompressed one: " + "; ".join(
                f"{k}: " + (f"rank {r}, {_fraction(result, k, r):.0%} of the parameters" if r else "none")
                for k, r in result["smallest_rank_within_1.5x_fd"].items()) + ".", "",
            report.table(result["rows"], ["method", "rank", "params", "params_fraction", "layers_factored",
                                          "mean_rel_error", "loss", "digits_fd", "compress_seconds"])]


def plot(axes, result: dict) -> None:
    """FD and held-out loss vs rank, one line per method, the uncompressed model dashed; on two given axes."""
    for ax, key, name in zip(axes, ("digits_fd", "loss"), ("classifier FD", "held-out loss")):
        for method in dict.fromkeys(r["method"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["method"] == method]
            ax.plot([r["rank"] for r in rows], [r[key] for r in rows], "o-", label=method)
        ax.axhline(result["uncompressed"][key], color="k", ls="--", lw=1, label="uncompressed")
        ax.set(xscale="log", yscale="log", xlabel="rank r of every Linear", ylabel=name, title=f"{name} vs rank")
    axes[0].legend(fontsize=8)
