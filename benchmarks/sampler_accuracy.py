"""Sampler accuracy on exact Gaussian-mixture targets: diffkit's samplers next to diffusers' schedulers.

Every sampler starts from points drawn from the exact noised marginal at its own first sigma (x0 + sigma eps,
the same x0 and eps for all), so only discretization error remains. Besides fixed grids, diffkit's
`calibrated_grid` is run for each multistep sampler (dpmpp_2m, dpmpp_3m, UniPC) at every NFE on a separate
calibration batch (other seeds), each NFE started from the previous NFE's grid, and then scored on the test
points like everything else; its cost (sampler runs, seconds) is recorded per step count. Deterministic samplers are scored by the
per-sample endpoint error against the exact probability-flow solution (dopri8, rtol 1e-10, to sigma = 0), and
all by the sliced W2 distance of their samples to fresh exact data. diffusers' schedulers use their own DDPM
1000-step linear-beta discretization with prediction_type="sample" and the exact denoiser.

    diffkit bench samplers [--quick] [--out DIR]

Writes sampler_accuracy.json / .md / .png under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS  # noqa: E402
from targets import TARGETS  # noqa: E402

from diffkit import grids, report, samplers  # noqa: E402
from diffkit.eval.metrics import sliced_wasserstein  # noqa: E402
from diffkit.samplers.calibrate import calibrated_grid, resample  # noqa: E402

NFES = (2, 3, 4, 5, 6, 8, 10, 15, 20, 35, 50)
SIGMA_MAX = 157.40723  # diffusers' DDPM linear-beta sigma at t = 999, where trailing grids start
NOISE_START = 20.0  # a run that starts below this sigma starts near the data, not from noise: reported, not ranked


def ours() -> list[dict]:
    """Our configurations: sampler, grid, and how many grid steps an NFE budget buys."""
    configs = []
    for name in ("euler", "heun", "dpmpp_2m", "dpmpp_3m"):
        configs.append({"label": f"{name} (karras rho 7, sigma_min 0.002)", "sampler": name,
                        "grid": lambda n: grids.karras(n, 0.002, SIGMA_MAX)})
    for name in ("dpmpp_2m", "dpmpp_3m"):  # diffusers' own Karras range: same grid, our solver
        configs.append({"label": f"{name} (karras rho 7, sigma_min 0.01)", "sampler": name,
                        "grid": lambda n: grids.karras(n, 0.0100, SIGMA_MAX)})
    for sigma_min in (0.002, 0.01):  # UniPC-p (order p + 1 with its corrector), next to diffusers' UniPC rows
        for variant, p in (("bh2", 2), ("bh2", 3), ("bh1", 3)):
            configs.append({"label": f"unipc {variant} order {p} (karras rho 7, sigma_min {sigma_min:g})",
                            "sampler": "unipc", "options": {"order": p, "variant": variant},
                            "grid": lambda n, lo=sigma_min: grids.karras(n, lo, SIGMA_MAX)})
    return configs


CALIBRATED = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2, "variant": "bh2"})]


def calibrated_label(sampler: str, options: dict) -> str:
    return f"{sampler}{' ' + options['variant'] + ' order ' + str(options['order']) if options else ''} (calibrated grid)"


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if sampler == "heun" else nfe


class Scorer:
    """Start points, cached exact references per start sigma, and the scores of a sampler's output."""

    def __init__(self, gmm, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.gmm, self.x0 = gmm, gmm.sample(n, g)
        self.eps = torch.randn(self.x0.shape, generator=g, dtype=torch.float64)
        self.data = gmm.sample(n, torch.Generator().manual_seed(seed + 1))
        self.refs: dict[float, torch.Tensor] = {}

    def start(self, sigma: float) -> torch.Tensor:
        return self.x0 + sigma * self.eps

    def reference(self, sigma: float) -> torch.Tensor:
        key = round(sigma, 6)
        if key not in self.refs:
            self.refs[key] = self.gmm.flow(self.start(sigma), sigma)
        return self.refs[key]

    def score(self, out: torch.Tensor, sigma_start: float, deterministic: bool = True) -> dict:
        row = {"sliced_w2": sliced_wasserstein(out, self.data, generator=torch.Generator().manual_seed(0))}
        if deterministic:
            err = (out - self.reference(sigma_start)).norm(dim=1)
            row.update(median=err.median().item(), p90=err.quantile(0.9).item())
        return row


def bench_target(name: str, gmm, n: int, nfes, seed: int, calib_n: int, calib_evals) -> dict:
    sc = Scorer(gmm, n, seed)
    rows, calibration = [], []

    def score_ours(label, sampler, sigmas, nfe, extra=None, options=None):
        counter = samplers.NFECounter(gmm)
        out = samplers.get(sampler)(counter, sc.start(sigmas[0].item()), sigmas, **(options or {}))
        rows.append({"who": "diffkit", "label": label, "budget": nfe, "nfe": counter.nfe, "grid": sigmas.tolist(),
                     **sc.score(out, sigmas[0].item()), **(extra or {})})

    for cfg in ours():
        for nfe in nfes:
            if steps_for(cfg["sampler"], nfe) >= 1:
                score_ours(cfg["label"], cfg["sampler"], cfg["grid"](steps_for(cfg["sampler"], nfe)), nfe,
                           options=cfg.get("options"))
    calib = Scorer(gmm, calib_n, seed + 1000)  # other seeds: the grid never sees the test points
    for sampler, options in CALIBRATED:
        grid = None
        for nfe in nfes:
            grid, info = calibrated_grid(gmm, calib.start(SIGMA_MAX), SIGMA_MAX, nfe, sampler=sampler, options=options,
                                         reference=calib.reference(SIGMA_MAX), max_evals=calib_evals(nfe),
                                         init=None if grid is None else resample(grid, nfe))
            calibration.append({"sampler": calibrated_label(sampler, options), "nfe": nfe, **info})
            score_ours(calibrated_label(sampler, options), sampler, grid, nfe, {"calibration": info}, options)
    for peer in PEERS:
        for nfe in nfes:
            steps = peer.steps_for(nfe)
            if steps < 1:
                continue
            try:
                sch = peer.prepare(steps)
                sig = peer.sigmas(sch)
                out, used = peer.run(sch, gmm, sc.start(sig[0].item()))
            except Exception as err:  # a scheduler that cannot take this many steps is skipped, and said so
                rows.append({"who": "diffusers", "label": peer.name, "budget": nfe, "error": repr(err)[:200]})
                continue
            row = {"who": "diffusers", "label": peer.name, "budget": nfe, "nfe": used, "grid": sig.tolist(),
                   **sc.score(out, sig[0].item())}
            if sig[0].item() < NOISE_START:
                row["not_ranked"] = f"starts at sigma {sig[0].item():.3g}: near the data, not from noise"
            rows.append(row)
    return {"target": name, "dim": gmm.dim, "n": n, "calibration_points": calib_n, "rows": rows,
            "calibration": calibration, "verdict": verdict(rows, nfes)}


def best(rows, who: str, nfe: int) -> dict | None:
    ok = [r for r in rows if r["who"] == who and r["budget"] == nfe and "median" in r and np.isfinite(r["median"])
          and "not_ranked" not in r]
    return min(ok, key=lambda r: r["median"]) if ok else None


def verdict(rows, nfes) -> dict:
    per = {}
    for nfe in nfes:
        o, p = best(rows, "diffkit", nfe), best(rows, "diffusers", nfe)
        if o and p:
            per[str(nfe)] = {"ours": o["label"], "ours_median": o["median"], "diffusers": p["label"],
                             "diffusers_median": p["median"], "ratio_diffusers_over_ours": p["median"] / o["median"]}
    ratios = [v["ratio_diffusers_over_ours"] for v in per.values()]
    return {"per_nfe": per, "ours_at_least_as_accurate_at_every_nfe": bool(ratios) and min(ratios) >= 1.0,
            "ratio_at_nfe_10": per.get("10", {}).get("ratio_diffusers_over_ours"),
            "target_holds": bool(ratios) and min(ratios) >= 1.0}


def markdown(results: dict) -> str:
    lines = ["# Sampler accuracy on exact Gaussian-mixture targets", "",
             f"Command: `{results['command']}`. {results['device']}, torch {results['torch']}, diffusers {results['diffusers']}.",
             "Median per-sample endpoint error against the exact PF-ODE solution (lower is better); columns are NFE budgets.", ""]
    for t in results["targets"]:
        nfes = sorted({r["budget"] for r in t["rows"]})
        lines += [f"## {t['target']} (d = {t['dim']}, {t['n']} samples)", "",
                  "| sampler | " + " | ".join(map(str, nfes)) + " |", "|---|" + "---|" * len(nfes)]
        for who in ("diffkit", "diffusers"):
            for label in dict.fromkeys(r["label"] for r in t["rows"] if r["who"] == who):
                cells = []
                for nfe in nfes:
                    r = next((r for r in t["rows"] if r["label"] == label and r["budget"] == nfe and "median" in r), None)
                    cells.append("-" if r is None else f"({r['median']:.3g})" if "not_ranked" in r else f"{r['median']:.3g}")
                lines.append(f"| {who}: {label} | " + " | ".join(cells) + " |")
        v = t["verdict"]
        lines += ["", f"Values in parentheses start below sigma = {NOISE_START:g}, near the data rather than from noise "
                  "(e.g. diffusers' 1-step Karras schedules, whose sigma range collapses to sigma(t=0)); they are not ranked.",
                  "", "| NFE | best diffkit | median | best diffusers | median | diffusers / diffkit |", "|---|---|---|---|---|---|"]
        for nfe, row in v["per_nfe"].items():
            lines.append(f"| {nfe} | {row['ours']} | {row['ours_median']:.3g} | {row['diffusers']} | "
                         f"{row['diffusers_median']:.3g} | {row['ratio_diffusers_over_ours']:.2f} |")
        lines += ["", f"Target (the best diffkit row at least as accurate as the best diffusers row at every NFE from "
                  f"{min(nfes)} to {max(nfes)}): {'holds' if v['target_holds'] else 'does not hold'}.", "",
                  f"Calibration cost per step count ({t['calibration_points']} calibration points; sampler runs = "
                  "passes of the sampler over them; seconds on this machine):", "",
                  "| calibrated | " + " | ".join(str(c["nfe"]) for c in t["calibration"] if c["sampler"] == t["calibration"][0]["sampler"]) + " |",
                  "|---|" + "---|" * sum(c["sampler"] == t["calibration"][0]["sampler"] for c in t["calibration"])]
        for label in dict.fromkeys(c["sampler"] for c in t["calibration"]):
            cells = [f"{c['sampler_runs']} runs, {c['seconds']:.1f} s" for c in t["calibration"] if c["sampler"] == label]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results["targets"]), figsize=(6 * len(results["targets"]), 4.5), squeeze=False)
    for ax, t in zip(axes[0], results["targets"]):
        for who, style in (("diffkit", "-"), ("diffusers", ":")):
            for label in dict.fromkeys(r["label"] for r in t["rows"] if r["who"] == who):
                pts = [(r["nfe"], r["median"]) for r in t["rows"] if r["label"] == label and "median" in r]
                if pts:
                    ax.loglog(*zip(*pts), style, marker="o", ms=3, label=f"{who}: {label}")
        ax.set_title(t["target"]), ax.set_xlabel("NFE"), ax.set_ylabel("median endpoint error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench samplers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (few samples and NFEs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import diffusers

    t0 = time.perf_counter()
    sizes = {"ring2d": 64, "digits64": 16} if args.quick else {"ring2d": 2000, "digits64": 400}
    calib = {"ring2d": 32, "digits64": 16} if args.quick else {"ring2d": 256, "digits64": 64}
    nfes = (5, 10) if args.quick else NFES
    calib_evals = (lambda nfe: 60) if args.quick else (lambda nfe: None)  # None: calibrated_grid's default
    results = {"command": "diffkit bench samplers" + (" --quick" if args.quick else ""),
               "device": f"CPU ({platform.processor() or platform.machine()}), float64", "torch": torch.__version__,
               "diffusers": diffusers.__version__, "sigma_max": SIGMA_MAX, "nfes": list(nfes), "targets": []}
    for name, make in TARGETS.items():
        results["targets"].append(bench_target(name, make(), sizes[name], nfes, args.seed, calib[name], calib_evals))
    results["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    report.results(args.out, "sampler_accuracy", results, markdown(results).split("\n"))
    plot(results, args.out / "sampler_accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
