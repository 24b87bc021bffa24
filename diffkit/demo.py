"""`diffkit demo`: train the built-in default (sklearn digits) on CPU, sample it, and show the result.

Trains the default Config (an EDM-preconditioned MLP on 8x8 digits), samples it with the samplers of ROWS (at
35 NFE; at 10 and 5 NFE the few-step settings, among them dpmpp_2m on a grid calibrated to the model with
diffkit.calibration), scores each against the held-out split in the feature space of the shipped digits
classifier (Fréchet distance; the train-vs-held-out distance of real data is the floor), and writes the run
folder: samples.png (every row beside real data), loss_curve.png, metrics.json and report.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from diffkit import config as configs
from diffkit import calibration, generate, report, run
from diffkit.eval import metrics

# (sampler, grid, NFE): the common samplers at 35 NFE, and what works at few steps (heun and dpmpp_3m do not:
# diffkit.samplers.advice).
ROWS = [*((s, "karras", 35) for s in ("euler", "heun", "dpmpp_2m", "unipc")),
        *((s, "karras", 10) for s in ("euler", "dpmpp_2m", "unipc")), ("dpmpp_2m", "calibrated", 10),
        ("unipc", "karras", 5), ("dpmpp_2m", "calibrated", 5)]


def main(out: Path, *, seed: int = 0, fast: bool = False, progress: bool = True) -> Path:
    """Run the demo into a new folder under `out` and return it."""
    overrides = ["train.steps=150", "train.warmup=20", "train.checkpoint_every=150"] if fast else []
    cfg = configs.load(None, [f"train.seed={seed}", *overrides])
    run_dir = Path(out) / time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    run.train_run(cfg, run_dir, progress=progress)
    train_s = time.perf_counter() - t0
    n = 200 if fast else 1000
    held, _ = configs.dataset(cfg, "test")
    train_x, _ = configs.dataset(cfg, "train")
    floor = {"digits_fd": metrics.digits_fd(train_x, held), "digits_kid": metrics.digits_kid(train_x, held)}
    rows, panels = [], {"held-out data": held[:64]}
    for name, grid, nfe in ROWS:
        x, used = sample(run_dir, name, grid, nfe, n, seed)
        rows.append({"sampler": name, "grid": grid, "nfe": used, **run.evaluate(cfg, x)})
        panels[f"{name}, {grid}, {used} NFE"] = x[:64]
    report.panels(run_dir / "samples.png", panels, title="diffkit demo: digits, EMA weights")
    result = {"config": configs.describe(cfg), "train_seconds": train_s, "n_samples": n,
              "real_data_floor": floor, "samples": rows}
    report.atomic_write(run_dir / "metrics.json", json.dumps(result, indent=2))
    report.atomic_write(run_dir / "report.md", "\n".join([
        "# diffkit demo: digits", "",
        *(["**A smoke run (`diffkit demo --fast`): 150 training steps, so the samples are still noise. Run "
           "`diffkit demo` for the real result.**", ""] if fast else []),
        f"Trained {cfg.train.steps} steps in {train_s:.0f} s ("
        + ", ".join(f"{k} {v}" for k, v in configs.describe(cfg).items() if k != "steps") + f"). Each sampler drew {n} "
        "samples from the EMA weights; distances are to the held-out split in the digits classifier's feature "
        "space (lower is better).", "",
        f"Real-data floor (train split vs held-out split): Fréchet distance {floor['digits_fd']:.3f}, "
        f"KID {floor['digits_kid']:.4f}.", "",
        report.table(rows, ["sampler", "grid", "nfe", "digits_fd", "digits_kid"]), "",
        *(f"Note: {line}." for line in run.notes({**floor, **{k: min(r[k] for r in rows) for k in floor}}, n)), "",
        "The calibrated grids were fitted to this model by `diffkit calibrate` (stored in grids/).", "",
        "![samples](samples.png)", "", "![loss](loss_curve.png)", ""]))
    return run_dir


def sample(run_dir: Path, sampler: str, grid: str, nfe: int, n: int, seed: int):
    """n samples of a run and their NFE with `sampler` on `grid` at `nfe` denoiser calls; a calibrated grid is
    fitted first (on 256 calibration draws) unless the run already has it."""
    steps = generate.steps_for_nfe(sampler, nfe)
    if grid == "calibrated" and not calibration.grid_file(run_dir, sampler, steps).exists():
        run.calibrate_run(run_dir, sampler=sampler, steps=steps, progress=False)
    cfg, model, shape, _, name, sigmas = run.sampling(run_dir, grid, sampler, steps, None, None)
    return generate.sample(model, cfg, shape, n, sampler=name, steps=steps, sigmas=sigmas, seed=seed, progress=False)
