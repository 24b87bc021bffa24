"""Calibrated grids of a trained run: computed by `diffkit calibrate RUN`, kept in the run folder, used by
`diffkit sample/eval RUN --grid calibrated`.

The grid is diffkit.samplers.calibrate's, fitted against the model's own tight-tolerance ODE solution
(rk45) from calibration noise: n per-sample seeded draws whose indices start at CALIBRATION_INDEX, so they
never coincide with the samples of any `diffkit sample` seed (which are indices 0..n-1). A conditional model
is calibrated as it will be sampled: plain (the null label), for one --label, or under a guidance scale
(classes evenly over the batch when no label is given). Each grid is one JSON file,
grids/<sampler>-<steps>steps[-label<k>][-w<scale>].json, with the sigmas, the calibration error next to the
config's own grid's, the cost, and the checkpoint step it was fitted at.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from diffkit import generate, report, samplers
from diffkit.config import Config
from diffkit.grids import check_grid
from diffkit.samplers.calibrate import calibrated_grid, check_sampler
from diffkit.samplers.noise import GaussianNoise

CALIBRATION_INDEX = 10**9  # first per-sample noise index of the calibration batch


def grid_file(run_dir: Path, sampler: str, steps: int, *, guidance: float | None = None,
              label: int | None = None) -> Path:
    """Where the grid calibrated for these settings lives in a run folder."""
    name = f"{sampler}-{steps}steps" + (f"-label{label}" if label is not None else "") + \
        (f"-w{guidance:g}" if guidance is not None else "")
    return Path(run_dir) / "grids" / f"{name}.json"


def _command(run_dir: Path, sampler: str, steps: int, guidance: float | None, label: int | None) -> str:
    return f"diffkit calibrate {run_dir} --sampler {sampler} --steps {steps}" + \
        (f" --label {label}" if label is not None else "") + (f" --guidance {guidance:g}" if guidance is not None else "")


def calibrate(run_dir: Path, model: torch.nn.Module, cfg: Config, shape: tuple[int, ...], n_classes: int, *,
              step: int, sampler: str, steps: int, n: int = 256, seed: int = 0, guidance: float | None = None,
              label: int | None = None, progress: bool = True) -> dict:
    """Fit the grid of `steps` steps for `sampler` on n calibration draws and store it; returns its record."""
    check_sampler(sampler)  # before the rk45 reference, the costly part
    if steps < 1 or n < 1:
        raise ValueError(f"--steps and --n must be positive, got {steps} and {n}")
    generate.check_labels(label, guidance, n_classes)
    device = next(model.parameters()).device
    indices = range(CALIBRATION_INDEX, CALIBRATION_INDEX + n)
    default = generate.grid(cfg, steps)
    sigma_max = default[0].item()
    x = sigma_max * GaussianNoise(seed, indices=indices, device=device).sample(shape)
    d = generate.denoiser(model, indices, guidance=guidance, label=label, n_classes=n_classes, device=device)
    if progress:
        print(f"calibrating {sampler} at {steps} steps on {n} draws (reference: rk45 at rtol 1e-6) ...", flush=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        reference = samplers.rk45(d, x, torch.tensor([sigma_max, 1e-4, 0.0], dtype=torch.float64), rtol=1e-6,
                                  atol=1e-6)
        ref_seconds = time.perf_counter() - t0
        grid, info = calibrated_grid(d, x, sigma_max, steps, sampler=sampler, reference=reference)
        fn = samplers.get(sampler)
        default_error = (fn(d, x, default) - reference).reshape(n, -1).norm(dim=1).median().item()
    record = {"sampler": sampler, "steps": steps, "guidance": guidance, "label": label, "sigmas": grid.tolist(),
              "calibration_error": info["calibration_error"], "config_grid": cfg.sample.grid,
              "config_grid_error": default_error, "error": "median over the calibration draws of |x - x_rk45|",
              "n": n, "seed": seed, "first_index": CALIBRATION_INDEX, "checkpoint_step": step,
              "sampler_runs": info["sampler_runs"], "seconds": info["seconds"] + ref_seconds}
    path = grid_file(run_dir, sampler, steps, guidance=guidance, label=label)
    path.parent.mkdir(exist_ok=True)
    report.atomic_write(path, json.dumps(record, indent=2))
    return record


def load(run_dir: Path, sampler: str, steps: int, *, guidance: float | None = None, label: int | None = None,
         step: int | None = None) -> torch.Tensor:
    """The stored calibrated grid for these settings; none stored is an error naming the command that makes it.

    step: the run's checkpoint step now; a grid fitted at another step still serves, with a warning."""
    path = grid_file(run_dir, sampler, steps, guidance=guidance, label=label)
    if not path.exists():
        what = f"{sampler} at {steps} steps" + (f", label {label}" if label is not None else "") + \
            (f", guidance {guidance:g}" if guidance is not None else "")
        raise FileNotFoundError(f"{run_dir} has no calibrated grid for {what}: make it with "
                                f"`{_command(run_dir, sampler, steps, guidance, label)}`")
    try:
        record = json.loads(path.read_text())
        sigmas = torch.tensor(record["sigmas"], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a calibrated grid ({err}); delete it and run "
                         f"`{_command(run_dir, sampler, steps, guidance, label)}`") from err
    check_grid(sigmas)
    if step is not None and record.get("checkpoint_step") != step:
        warnings.warn(f"{path.name} was calibrated at step {record.get('checkpoint_step')} and the run is now at "
                      f"step {step}; re-run `{_command(run_dir, sampler, steps, guidance, label)}` to refit it",
                      stacklevel=2)
    return sigmas
