"""The scaling-law section of `diffkit bench optimizers`: L(N, D) = E + A/N^alpha + B/D^beta over model width and
training length on digits.

Digits MLP denoisers (depth 2, embedding width = width) at widths 16..512, AdamW lr 3e-3 (the best of the
optimizer and lr-transfer sweeps from width 64 to 512; 1e-3 left the wide runs lr-limited), batch 128, 50 warm-up
steps; every (width, steps) point is its own run with the lr decayed to 0 by cosine at its last step (as in
Hoffmann et al. 2022: the loss of a constant-lr run part-way is not the loss of a run planned for that length),
scored by the held-out objective (EMA) over 16 fixed noise draws (4 elsewhere; more draws, less evaluation
noise). N is the parameter count, D = steps x batch the samples seen. The fit (diffkit.scaling: Huber on
log-loss from a grid of starts) uses the runs below the largest width and the longest length; the largest ones
are held out and predicted.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_runs import SmallRun  # noqa: E402

from diffkit import scaling as law  # noqa: E402
from diffkit.report import save_figure, table  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BATCH, LR, DRAWS = 128, 3e-3, 16


def sweep(work: Path, widths, steps) -> list[dict]:
    rows = []
    for width in widths:
        for n in steps:
            d = SmallRun(width, 2, [f"model.args={{width: {width}, depth: 2, emb: {width}}}", "train.cosine=true",
                                    f"train.batch={BATCH}", f"train.lr={LR}"])
            ema = d.train(n, work / f"scaling-w{width}-s{n}")
            rows.append({"width": width, "N": d.params, "steps": n, "D": n * BATCH,
                         "loss": d.heldout_loss(ema.model, DRAWS), "seconds": d.seconds})
    return rows


def section(work: Path, quick: bool = False) -> dict:
    """Runs the sweep, fits the law on the smaller runs and predicts the held-out ones."""
    widths, steps = ((16, 32, 64, 128, 256, 512), (125, 250, 500, 1000, 2000)) if not quick else \
        ((8, 16, 32, 64), (2, 4, 8, 16))
    rows = sweep(work, widths, steps)
    for r in rows:
        r["held_out"] = r["width"] == max(widths) or r["steps"] == max(steps)
    fitted, held = [r for r in rows if not r["held_out"]], [r for r in rows if r["held_out"]]
    cols = lambda rs: ([r["N"] for r in rs], [r["D"] for r in rs], [r["loss"] for r in rs])  # noqa: E731
    boot = law.bootstrap(*cols(fitted), resamples=100 if not quick else 5,
                         at=[(r["N"], r["D"]) for r in held if r["width"] == max(widths) and r["steps"] == max(steps)])
    fit = boot["fit"]
    for r in rows:
        r["predicted"] = float(fit.predict(r["N"], r["D"]))
        r["rel_error"] = (r["predicted"] - r["loss"]) / r["loss"]
    return {"widths": list(widths), "steps": list(steps), "rows": rows, "fit": fit.params(),
            "intervals": boot["intervals"], "bootstrap_resamples": boot["resamples"],
            "holdout_rel_error": max(abs(r["rel_error"]) for r in held),
            "fit_rel_error": max(abs(r["rel_error"]) for r in fitted)}


def figure(result: dict, path: Path) -> None:
    fit, rows = law.Fit(**result["fit"], loss=float("nan")), result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for width in result["widths"]:
        mine = [r for r in rows if r["width"] == width]
        line, = ax.plot([r["D"] for r in mine], [r["loss"] for r in mine], "o", label=f"width {width}")
        d = np.geomspace(min(r["D"] for r in mine), max(r["D"] for r in mine), 50)
        ax.plot(d, fit.predict(mine[0]["N"], d), "-", color=line.get_color(), lw=1)
        held = [r for r in mine if r["held_out"]]
        ax.plot([r["D"] for r in held], [r["loss"] for r in held], "x", color="k", ms=9)
    ax.set(xscale="log", yscale="log", xlabel="samples seen D", ylabel="held-out loss",
           title="L(N, D) fit (lines); x = held-out runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(result: dict) -> list[str]:
    p, rows, iv = result["fit"], result["rows"], result["intervals"]
    held = sum(r["held_out"] for r in rows)
    return [f"Fit on {len(rows) - held} runs (width < {max(result['widths'])} and steps < {max(result['steps'])}), "
            f"{held} held out: L = {p['E']:.4g} + {p['A']:.4g}/N^{p['alpha']:.3g} + {p['B']:.4g}/D^{p['beta']:.3g}.", "",
            table([{"parameter": k, "fit": p[k], "90% low": iv[k][0], "90% high": iv[k][1]} for k in law.NAMES],
                  ["parameter", "fit", "90% low", "90% high"]), "",
            f"Largest relative error on the held-out runs: **{result['holdout_rel_error']:.2%}** "
            f"(on the fitted runs: {result['fit_rel_error']:.2%}; target: held-out within 5%).", "",
            table(rows, ["width", "N", "steps", "D", "loss", "predicted", "rel_error", "held_out"]), "",
            "![scaling](training_stack-scaling.png)"]
