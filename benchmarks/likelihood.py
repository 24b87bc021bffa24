"""Likelihood and flows on digits: bits/dim and sample quality of TARFLOW next to diffusion and peer flows.

On sklearn's digits (17 pixel levels, held-out split), side by side:
- bits/dim under uniform dequantization (diffkit.data.dequantize; one draw per held-out image, seed 0) of
  TARFLOW (configs/digits-tarflow.yaml, trained on dequantized pixels, exact log-density), of the digits
  diffusion model (configs/digits.yaml, exact probability-flow ODE likelihood, diffkit.likelihood), of zuko's
  MAF and NSF and of a diagonal Gaussian (benchmarks/flow_peers.py), every model trained for the same steps;
- sample quality (the digits classifier's Fréchet distance to the held-out split; real-data floor = train vs
  held-out) of TARFLOW: the bits/dim model, and the noise-augmented class-conditional one
  (configs/digits-tarflow-cfg.yaml) without and with its Tweedie denoising step and with guidance, next to
  the diffusion model at 35 NFE;
- wall-clock of training and of sampling for each.

    diffkit bench likelihood [--quick] [--out DIR] [--work DIR]

Writes likelihood.json / .md / .png under --out (default benchmarks/results). Runs go to --work (default: a
temporary folder); a work folder that already holds them resumes instead of retraining.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffkit import config as configs
from diffkit import generate, report, run
from diffkit.eval import metrics

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
GUIDANCE = (1.0, 2.0)  # per-class sampling of the conditional flow: plain conditional, and guided


def _peers():
    spec = importlib.util.spec_from_file_location("flow_peers", HERE / "flow_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 1)


def _samples(folder: Path, n: int, *, sampler: str | None = None, steps: int | None = None,
             guidance: float | None = None, per_class: bool = False) -> tuple[torch.Tensor, float]:
    """n samples of a trained run (seed 0) and the seconds they took; per_class: n / 10 of each label."""
    cfg, model, shape, n_classes = run.load_run(folder)
    t0 = time.perf_counter()
    if per_class:
        parts = [generate.sample(model, cfg, shape, n // n_classes, sampler=sampler, steps=steps, seed=c,
                                 guidance=guidance, label=c, n_classes=n_classes, progress=False)[0]
                 for c in range(n_classes)]
        x = torch.cat(parts)
    else:
        x, _ = generate.sample(model, cfg, shape, n, sampler=sampler, steps=steps, seed=0, progress=False)
    return x, round(time.perf_counter() - t0, 1)


def bench(work: Path, quick: bool) -> dict:
    steps, n, held_n = (60, 200, 32) if quick else (3000, 1000, None)
    budget = [f"train.steps={steps}", f"train.checkpoint_every={max(steps // 3, 1)}"]
    cfg = configs.load(CONFIGS / "digits.yaml")
    train_x, _ = configs.dataset(cfg, "train")
    held, _ = configs.dataset(cfg, "test")
    floor = metrics.digits_fd(train_x, held)
    rows, shown, times = [], {"held-out data": held[:64]}, {}

    # The diffusion model: its probability-flow ODE likelihood and its samples at 35 NFE (Heun, 18 steps).
    diffusion = work / "diffusion"
    _, times["diffusion_train_s"] = _timed(lambda: run.train_run(configs.load(CONFIGS / "digits.yaml", budget),
                                                                 diffusion, progress=False))
    lik, times["diffusion_likelihood_s"] = _timed(lambda: run.likelihood_run(diffusion, n=held_n, progress=False))
    x, sample_s = _samples(diffusion, n, sampler="heun", steps=18)
    fd_teacher = metrics.digits_fd(x, held)
    rows.append({"model": "diffusion (EDM MLP), PF-ODE", "bits_per_dim": lik["bits_per_dim"], "digits_fd": fd_teacher,
                 "how": "heun, 35 NFE", "train_s": times["diffusion_train_s"], "sample_s": sample_s})
    shown["diffusion, 35 NFE"] = x[:64]

    # TARFLOW trained on dequantized pixels: its exact bits/dim, and its own samples.
    tarflow = work / "tarflow"
    _, train_s = _timed(lambda: run.train_run(configs.load(CONFIGS / "digits-tarflow.yaml", budget), tarflow,
                                              progress=False))
    lik_tf = run.likelihood_run(tarflow, n=held_n, progress=False)
    x, sample_s = _samples(tarflow, n)
    rows.append({"model": "TARFLOW (dequantized)", "bits_per_dim": lik_tf["bits_per_dim"],
                 "digits_fd": metrics.digits_fd(x, held), "how": "inverse", "train_s": train_s, "sample_s": sample_s})
    shown["TARFLOW (dequantized)"] = x[:64]

    # The noise-augmented conditional TARFLOW: raw samples, Tweedie-denoised, per class, guided.
    cond = work / "tarflow-cfg"
    _, train_s = _timed(lambda: run.train_run(configs.load(CONFIGS / "digits-tarflow-cfg.yaml", budget), cond,
                                              progress=False))
    lik_cond = run.likelihood_run(cond, n=held_n, progress=False)
    variants = [("unconditional, raw", {"sampler": "tarflow_raw"}), ("unconditional, denoised", {}),
                *((f"per class, w={w:g}, denoised", {"guidance": w, "per_class": True}) for w in GUIDANCE)]
    for name, options in variants:
        x, sample_s = _samples(cond, n, **options)
        rows.append({"model": f"TARFLOW sigma=0.05 ({name})", "bits_per_dim": lik_cond["bits_per_dim"],
                     "digits_fd": metrics.digits_fd(x, held), "how": name, "train_s": train_s, "sample_s": sample_s})
        shown[f"TARFLOW {name}"] = x[:64]

    # Peer flows (zuko) and the Gaussian baseline, the same steps and batch.
    peers = _peers()
    batch = cfg.train.batch
    for name, label in (("gaussian", "diagonal Gaussian"), ("maf", "MAF (zuko)"), ("nsf", "NSF (zuko)")):
        r = peers.fit_and_score(name, train_x, held, steps=steps, batch=batch, seed=0)
        rows.append({"model": label, "bits_per_dim": r["bpd"], "how": f"{r['params']} params",
                     "train_s": r["train_seconds"]})

    flows = [r for r in rows if "(zuko)" in r["model"]]
    best_peer = min(flows, key=lambda r: r["bits_per_dim"])
    tarflow_fd = [r for r in rows if r["model"].startswith("TARFLOW")]
    best_tf = min(tarflow_fd, key=lambda r: r["digits_fd"])
    return {
        "digits_bpd_tarflow": lik_tf["bits_per_dim"],
        "digits_bpd_best_peer_flow": {"name": best_peer["model"], "bits_per_dim": best_peer["bits_per_dim"]},
        "digits_bpd_diffusion_ode": lik["bits_per_dim"],
        "digits_fd_tarflow": {"variant": best_tf["model"], "digits_fd": best_tf["digits_fd"]},
        "digits_fd_teacher_35nfe": fd_teacher,
        "real_data_floor_fd": floor, "steps": steps, "n_samples": n, "rows": rows, "shown": shown,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench likelihood", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not a measurement)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = bench(args.work or Path(tmp), args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    shown = r.pop("shown")
    report.panels(args.out / "likelihood.png", shown, title="digits: held-out data, diffusion at 35 NFE, TARFLOW")
    command = f"diffkit bench likelihood{' --quick' if args.quick else ''}"
    ratio_bpd = r["digits_bpd_tarflow"] - r["digits_bpd_best_peer_flow"]["bits_per_dim"]
    ratio_fd = r["digits_fd_tarflow"]["digits_fd"] / r["digits_fd_teacher_35nfe"]
    text = ["# Likelihood and flows on digits", "",
            f"Command: `{command}` on CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch "
            f"{torch.__version__}; {r['steps']} training steps per model, {r['n_samples']} samples per FD row. "
            "Bits/dim of the held-out split under uniform dequantization (17 levels; lower is better); Fréchet "
            f"distance in the digits classifier's feature space (real-data floor {r['real_data_floor_fd']:.3g}).", "",
            report.table(r["rows"], ["model", "bits_per_dim", "digits_fd", "how", "train_s", "sample_s"]), "",
            f"TARFLOW bits/dim {r['digits_bpd_tarflow']:.4g} against the best peer flow "
            f"({r['digits_bpd_best_peer_flow']['name']}) {r['digits_bpd_best_peer_flow']['bits_per_dim']:.4g} "
            f"(difference {ratio_bpd:+.3g}; target <= 0); diffusion ODE {r['digits_bpd_diffusion_ode']:.4g}.", "",
            f"Best TARFLOW FD {r['digits_fd_tarflow']['digits_fd']:.4g} ({r['digits_fd_tarflow']['variant']}) = "
            f"{ratio_fd:.3g}x the diffusion model's 35-NFE FD {r['digits_fd_teacher_35nfe']:.4g} (target <= 2x).", "",
            "![samples](likelihood.png)", ""]
    out = {"command": command, "device": "cpu", "torch": torch.__version__, **r}
    report.results(args.out, "likelihood", out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
