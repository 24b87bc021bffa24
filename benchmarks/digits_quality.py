"""Digits quality of `diffkit demo`: classifier Fréchet distance of its samples to the held-out split, next to
the real-data floor (train split vs held-out split), and how few denoiser calls reach the 35-NFE quality.

    diffkit bench digits [--fast] [--out DIR]

Runs the demo (training included), then sweeps the few-step settings on the demo's model: dpmpp_2m and UniPC
on EDM's grid and on grids calibrated to the model (`diffkit calibrate`, 256 calibration draws) at NFE 3, 4,
5, 6, 8, 10, and heun at 9 NFE (the setting diffkit.samplers.advice warns about). Writes
digits_quality.json / .md / .png under --out (default benchmarks/results). JSON keys: `digits_fd_by_nfe` (the
best row per NFE) and `digits_min_nfe_within_10pct_of_35nfe` (the fewest NFE whose FD is within 10% of the
best 35-NFE FD).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffkit import demo, run
from diffkit.report import results, table
from diffkit.samplers.advice import FewStepWarning

SWEEP_NFES = (3, 4, 5, 6, 8, 10)
SWEEP = [("dpmpp_2m", "karras"), ("unipc", "karras"), ("dpmpp_2m", "calibrated"), ("unipc", "calibrated")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench digits", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the seconds-long demo variant (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo.main(Path(tmp), fast=args.fast, progress=False)
        result = json.loads((folder / "metrics.json").read_text())
        cfg = run.load_run(folder)[0]
        n, sweep = result["n_samples"], [(s, g, nfe) for nfe in SWEEP_NFES for s, g in SWEEP] + [("heun", "karras", 9)]
        done = {(r["sampler"], r["grid"], r["nfe"]) for r in result["samples"]}
        t0 = time.perf_counter()
        for sampler, grid, nfe in (row for row in sweep if row not in done):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewStepWarning)  # heun at 9 NFE is measured on purpose
                x, used = demo.sample(folder, sampler, grid, nfe, n, 0)
            result["samples"].append({"sampler": sampler, "grid": grid, "nfe": used, **run.evaluate(cfg, x)})
        result["sweep_seconds"] = time.perf_counter() - t0
        result["calibration"] = [json.loads(p.read_text()) for p in sorted((folder / "grids").glob("*.json"))]
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "samples.png", args.out / "digits_quality.png")
    result.update(command="diffkit bench digits" + (" --fast" if args.fast else ""), torch=torch.__version__,
                  device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    floor = result["real_data_floor"]["digits_fd"]
    for row in result["samples"]:
        row["fd_over_floor"] = row["digits_fd"] / floor
    by_nfe = {}
    for row in sorted(result["samples"], key=lambda r: r["nfe"]):
        if row["nfe"] not in by_nfe or row["digits_fd"] < by_nfe[row["nfe"]]["digits_fd"]:
            by_nfe[row["nfe"]] = row
    best35 = by_nfe[35]["digits_fd"]
    within = [nfe for nfe, row in by_nfe.items() if row["digits_fd"] <= 1.1 * best35]
    result["digits_fd_by_nfe"] = {str(k): v for k, v in by_nfe.items()}
    result["digits_min_nfe_within_10pct_of_35nfe"] = min(within)
    costs = [{"sampler": c["sampler"], "steps": c["steps"], "seconds": c["seconds"], "sampler_runs": c["sampler_runs"],
              "calibration_error": c["calibration_error"], "karras_grid_error": c["config_grid_error"]}
             for c in result["calibration"]]
    text = [
        "# Digits quality of `diffkit demo`", "", f"Command: `{result['command']}` on {result['device']}, torch "
        f"{result['torch']}; training took {result['train_seconds']:.0f} s, the few-step sweep (calibration included) "
        f"{result['sweep_seconds']:.0f} s. {n} samples per row, EMA weights, seed 0.", "",
        f"Real-data floor (train split vs held-out split): Fréchet distance {floor:.3f}.", "",
        table(result["samples"], ["sampler", "grid", "nfe", "digits_fd", "fd_over_floor", "digits_kid"]), "",
        "Best row per NFE:", "", table(list(by_nfe.values()), ["nfe", "sampler", "grid", "digits_fd"]), "",
        f"Fewest NFE within 10% of the best 35-NFE FD ({best35:.3g}): "
        f"**{result['digits_min_nfe_within_10pct_of_35nfe']}** (target: 6 or fewer).", "",
        "Calibration (`diffkit calibrate RUN --sampler S --steps N`, 256 draws; errors are median distances to the "
        "model's rk45 solution on the calibration draws):", "",
        table(costs, ["sampler", "steps", "seconds", "sampler_runs", "calibration_error", "karras_grid_error"]), "",
        "![samples](digits_quality.png)", ""]
    results(args.out, "digits_quality", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
