"""Scaling-law fit on digits: L(N, D) = E + A/N^alpha + B/D^beta over model width and training length.

    diffkit bench scaling [--quick] [--out DIR] [--work DIR]

Digits MLP denoisers (depth 2, embedding width = width) at widths 16..512, AdamW lr 1e-3, batch 128, constant
lr after 50 warm-up steps; each width is one run scored (held-out objective, EMA) at 125..2000 steps, so N is
the parameter count and D = steps x batch the samples seen. The fit (diffkit.scaling: Huber on log-loss from a
grid of starts, Hoffmann et al. 2022) uses the runs below the largest width and the longest length; the
largest ones are held out and predicted. Writes scaling.json / .md / .png under --out. JSON keys:
`scaling_fit` (E, A, B, alpha, beta), `scaling_intervals` (90% bootstrap), `scaling_holdout_rel_error` (the
largest |predicted - measured| / measured over the held-out runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_runs import Digits  # noqa: E402

from diffkit import scaling  # noqa: E402
from diffkit.report import save_figure, table  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BATCH = 128


def sweep(work: Path, widths, steps) -> list[dict]:
    rows = []
    for width in widths:
        d = Digits(width, 2, [f"model.args={{width: {width}, depth: 2, emb: {width}}}", "train.cosine=false",
                              f"train.batch={BATCH}"])
        for r in d.curve(list(steps), work / f"w{width}"):
            rows.append({"width": width, "N": d.params, "steps": r["step"], "D": r["step"] * BATCH,
                         "loss": r["loss"], "seconds": r["seconds"]})
    return rows


def figure(rows: list[dict], fit: scaling.Fit, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for width in sorted({r["width"] for r in rows}):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    widths, steps = ((16, 32, 64, 128, 256, 512), (125, 250, 500, 1000, 2000)) if not args.quick else \
        ((8, 16, 32, 64), (2, 4, 8, 16))
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(args.work or Path(tmp), widths, steps)
    for r in rows:
        r["held_out"] = r["width"] == max(widths) or r["steps"] == max(steps)
    train_rows = [r for r in rows if not r["held_out"]]
    cols = lambda rs: ([r["N"] for r in rs], [r["D"] for r in rs], [r["loss"] for r in rs])  # noqa: E731
    held = [r for r in rows if r["held_out"]]
    boot = scaling.bootstrap(*cols(train_rows), resamples=100 if not args.quick else 5,
                             at=[(r["N"], r["D"]) for r in held if r["width"] == max(widths) and r["steps"] == max(steps)])
    fit = boot["fit"]
    for r in rows:
        r["predicted"] = float(fit.predict(r["N"], r["D"]))
        r["rel_error"] = (r["predicted"] - r["loss"]) / r["loss"]
    result = {"command": "diffkit bench scaling" + (" --quick" if args.quick else ""), "torch": torch.__version__,
              "device": f"CPU ({platform.machine()}, 1 thread)", "rows": rows, "scaling_fit": fit.params(),
              "scaling_intervals": boot["intervals"], "bootstrap_resamples": boot["resamples"],
              "scaling_holdout_rel_error": max(abs(r["rel_error"]) for r in held),
              "fit_rel_error": max(abs(r["rel_error"]) for r in train_rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    figure(rows, fit, args.out / "scaling.png")
    p = fit.params()
    text = ["# Scaling-law fit on digits", "",
            f"Command: `{result['command']}` on {result['device']}, torch {result['torch']}.", "",
            f"Fit on {len(train_rows)} runs (width < {max(widths)} and steps < {max(steps)}), {len(held)} held out: "
            f"L = {p['E']:.4g} + {p['A']:.4g}/N^{p['alpha']:.3g} + {p['B']:.4g}/D^{p['beta']:.3g}.", "",
            table([{"parameter": k, "fit": p[k], "90% low": boot["intervals"][k][0], "90% high": boot["intervals"][k][1]}
                   for k in scaling.NAMES], ["parameter", "fit", "90% low", "90% high"]), "",
            f"Largest relative error on the held-out runs: **{result['scaling_holdout_rel_error']:.2%}** "
            f"(on the fitted runs: {result['fit_rel_error']:.2%}; target: held-out within 5%).", "",
            table(rows, ["width", "N", "steps", "D", "loss", "predicted", "rel_error", "held_out"]), "",
            "![scaling](scaling.png)", ""]
    (args.out / "scaling.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
