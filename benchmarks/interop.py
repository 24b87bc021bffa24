"""Interop payoff: a diffusers model (trained by diffkit's loop, exported, reloaded) sampled with diffusers' own
schedulers vs diffkit's samplers and calibrated grids, classifier FD to the digits held-out split, NFE 4/6/8/10.

    diffkit bench interop [--quick] [--out DIR] [--work DIR]

Trains configs/digits-diffusers.yaml (diffusers' UNet2DModel, vp_linear, v-prediction) with diffkit's loop,
exports it (`diffkit export --to diffusers`), loads the folder back with load_diffusers, then samples the same
n latents (seed 0) with:
- diffusers: DPM-Solver++(2M) and UniPC (bh2, order 2) on their default and karras timesteps, and DDIM (trailing),
  from the exported scheduler config, through `scheduler_sample` (diffusers' pipeline loop). UniPC bh1 is left out:
  in diffusers 0.42.1 its last step to sigma = 0 returns NaN (B(h) = h with h infinite);
- diffkit: dpmpp_2m and unipc on EDM's karras grid over the model's sigma range and on a grid calibrated to the
  loaded model (samplers.calibrate.calibrated_grid on 64 calibration draws, their rk45 solution shared).
Every sample is clamped to [-1, 1] (as a pipeline's image output is) and scored by diffkit.eval.metrics.digits_fd.
Writes interop.json / .md under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffkit import config as configs
from diffkit import export, grids, run, samplers
from diffkit.eval.metrics import digits_fd
from diffkit.interop.diffusers import load_diffusers, scheduler_sample
from diffkit.nets.diffusers_unet import import_diffusers
from diffkit.report import results, table
from diffkit.samplers.calibrate import calibrated_grid

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits-diffusers.yaml"
QUICK = ["model.args={block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4, attention_head_dim: 4}",
         "train.steps=20", "train.batch=32", "train.warmup=2", "sample.steps=2"]
PEERS = {  # label: (scheduler class, options over the exported config)
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M (karras)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC bh2": ("UniPCMultistepScheduler", {}),
    "UniPC bh2 (karras)": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM (trailing)": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}
OURS = [("dpmpp_2m", "karras"), ("unipc", "karras"), ("dpmpp_2m", "calibrated"), ("unipc", "calibrated")]


def _train_and_load(work: Path, quick: bool):
    """Train the recipe, export it, load the export; returns (loaded model, seconds per stage)."""
    t0 = time.perf_counter()
    run.train_run(configs.load(CONFIG, QUICK if quick else []), work / "run", progress=False)
    t1 = time.perf_counter()
    export.export_run(work / "run", "diffusers", work / "exported")
    return load_diffusers(work / "exported"), {"train_seconds": t1 - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench interop", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny net, 20 steps, NFE 4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, help="keep the run and the exported pipeline here (default: a temp dir)")
    parser.add_argument("--n", type=int, help="samples per row (default 1000; --quick 32)")
    args = parser.parse_args(argv)
    diffusers = import_diffusers()
    n, nfes = args.n or (32 if args.quick else 1000), (4,) if args.quick else (4, 6, 8, 10)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        loaded, info = _train_and_load(work, args.quick)
        scheduler_config = dict(loaded.scheduler_config)
    held, _ = configs.dataset(configs.from_dict({}), "test")
    train_x, _ = configs.dataset(configs.from_dict({}), "train")
    floor = digits_fd(train_x[:n], held)
    latents = torch.randn((n, *loaded.shape), generator=torch.Generator().manual_seed(0))
    rows = []

    def score(side: str, label: str, nfe: int, x: torch.Tensor, seconds: float) -> None:
        fd = digits_fd(x.clamp(-1, 1), held)
        rows.append({"side": side, "sampler": label, "nfe": nfe, "digits_fd": fd, "fd_over_floor": fd / floor,
                     "seconds": seconds})

    t0 = time.perf_counter()
    for label, (cls, options) in PEERS.items():
        for nfe in nfes:
            scheduler = getattr(diffusers, cls).from_config(scheduler_config, **options)
            t = time.perf_counter()
            score("diffusers", label, nfe, scheduler_sample(loaded, scheduler, latents, nfe), time.perf_counter() - t)
    info["diffusers_seconds"] = time.perf_counter() - t0

    path, t0 = loaded.path, time.perf_counter()
    x_start = latents * (1 + path.sigma_max**2) ** 0.5  # the same VP latents in the scale-free state
    cal = torch.randn((8 if args.quick else 64, *loaded.shape), generator=torch.Generator().manual_seed(1))
    cal = cal * (1 + path.sigma_max**2) ** 0.5
    with torch.no_grad():
        reference = samplers.rk45(loaded.denoiser, cal, torch.tensor([path.sigma_max, 1e-4, 0.0], dtype=torch.float64),
                                  rtol=1e-6, atol=1e-6)
        calibration = []
        for sampler, grid in OURS:
            for nfe in nfes:
                if grid == "karras":
                    sigmas = grids.karras(nfe, path.sigma_min, path.sigma_max)
                else:
                    sigmas, fit = calibrated_grid(loaded.denoiser, cal, path.sigma_max, nfe, sampler=sampler,
                                                  reference=reference, family_evals=5 if args.quick else 60,
                                                  max_evals=0 if args.quick else 10 * nfe)
                    calibration.append({"sampler": sampler, "nfe": nfe, "sigmas": sigmas.tolist(), **fit})
                t = time.perf_counter()
                x = samplers.get(sampler)(loaded.denoiser, x_start, sigmas)
                score("diffkit", f"{sampler} ({grid} grid)", nfe, x, time.perf_counter() - t)
    info["diffkit_seconds"] = time.perf_counter() - t0

    best = {}
    for row in rows:
        key = (row["side"], row["nfe"])
        if key not in best or row["digits_fd"] < best[key]["digits_fd"]:
            best[key] = row
    head = [{"nfe": nfe, "best diffusers": best["diffusers", nfe]["sampler"],
             "diffusers FD": best["diffusers", nfe]["digits_fd"], "best diffkit": best["diffkit", nfe]["sampler"],
             "diffkit FD": best["diffkit", nfe]["digits_fd"],
             "ratio": best["diffkit", nfe]["digits_fd"] / best["diffusers", nfe]["digits_fd"]} for nfe in nfes]
    command = "diffkit bench interop" + (" --quick" if args.quick else "") + (f" --n {args.n}" if args.n else "")
    data = {"command": command, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "n": n, "nfes": list(nfes),
            "real_data_floor": floor, "scheduler_config": {k: v for k, v in scheduler_config.items()
                                                          if k != "trained_betas"},
            "best_by_nfe": head, "rows": rows, "calibration": calibration, **info}
    lines = [
        "# diffkit's samplers on a diffusers model", "",
        f"Command: `{command}` on {data['device']}, torch {data['torch']}, "
        f"diffusers {data['diffusers']}. The model: configs/digits-diffusers.yaml, diffusers' UNet2DModel trained "
        f"by diffkit's loop ({info['train_seconds']:.0f} s), exported with `diffkit export --to diffusers`, loaded "
        "back with `load_diffusers`. Every row samples the same latents (seed 0); diffusers' rows run its "
        "schedulers from the exported scheduler config in its pipeline loop. Classifier FD to the held-out split "
        f"({n} samples; real-data floor {floor:.3f}).", "",
        "Best per NFE:", "", table(head, ["nfe", "best diffusers", "diffusers FD", "best diffkit", "diffkit FD", "ratio"]),
        "", "Every row:", "", table(rows, ["side", "sampler", "nfe", "digits_fd", "fd_over_floor", "seconds"]), "",
        f"Calibration ({len(cal)} draws against their rk45 solution; calibrated_grid stage 1 plus "
        f"{'no' if args.quick else '10 x NFE'} stage-2 evaluations) took {sum(c['seconds'] for c in calibration):.0f} s "
        "in all:", "", table(calibration, ["sampler", "nfe", "calibration_error", "sampler_runs", "seconds"]), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    results(args.out, "interop", data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
