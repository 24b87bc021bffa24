"""One-step quality: shortcut, ReFlow (+ one-step distillation) and SiD next to their flow-matching teacher.

For each dataset (the 2-D checkerboard, sklearn digits) the benchmark trains a flow-matching teacher
(configs/<data>-fm.yaml), then with the same number of training steps a shortcut model (configs/<data>-shortcut.yaml),
a 2-rectified flow on couples drawn from the teacher, a one-step distillation of that 2-RF on its own
couples (both sets drawn with the teacher's best ODE sampler and grid at 35 NFE), and a SiD generator distilled
from the teacher (its own step count: a SiD step is two optimizer phases). Every model is scored at NFE 1, 2, 4
(the teacher also at 35 NFE; the teacher always with its best ODE sampler and grid) by the distance of its
samples to the held-out split: sliced Wasserstein for the checkerboard, the classifier Fréchet distance for
digits (its real-data floor is train split vs held-out split).

    diffkit bench onestep [--quick] [--out DIR] [--work DIR]

Writes onestep.json / .md and onestep-<data>.png under --out (default benchmarks/results). Runs go to --work
(default: a temporary folder); a work folder that already holds them resumes instead of retraining.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffkit import config as configs
from diffkit import generate, registry, report, run
from diffkit.eval import metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NFES = (1, 2, 4)
TEACHER_OPTIONS = [(s, g) for s in ("euler", "heun", "dpmpp_2m") for g in ("uniform_t", "distill", "karras")]
SETTINGS = {  # per dataset: training steps per model, couples, samples scored, the metric
    "checkerboard": {"steps": 3000, "sid_steps": 4000, "couples": 20000, "n": 2000, "metric": "sliced_wasserstein"},
    "digits": {"steps": 3000, "sid_steps": 4000, "couples": 10000, "n": 1000, "metric": "digits_fd"},
}


def score(folder: Path, cfg_overrides: list[str], metric: str, n: int, *, sampler: str | None, steps: int) -> tuple[float, int, torch.Tensor]:
    """(distance to held-out data, NFE, samples) of a trained run sampled with `sampler` on `steps` grid steps."""
    cfg, model, shape, n_classes = run.load_run(folder)
    cfg = configs.derive(cfg, cfg_overrides)
    x, nfe = generate.sample(model, cfg, shape, n, sampler=sampler, steps=steps, seed=0, progress=False)
    return run.evaluate(cfg, x)[metric], nfe, x


def teacher_rows(folder: Path, metric: str, n: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The teacher at each NFE and at 35 NFE, each with its best ODE sampler and grid."""
    rows, shown = [], {}
    for nfe in (*NFES, 35):
        best = None
        for sampler, grid in TEACHER_OPTIONS:
            steps = generate.steps_for_nfe(sampler, nfe)
            d, used, x = score(folder, [f"sample.grid={grid}"], metric, n, sampler=sampler, steps=steps)
            if used <= nfe and (best is None or d < best[0]):
                best = (d, used, x, {"sampler": sampler, "grid": grid, "steps": steps})
        rows.append({"method": "teacher" if nfe == 35 else "teacher (best ODE sampler)", "nfe": nfe,
                     "distance": best[0], **best[3],
                     "how": f"{best[3]['sampler']}, {best[3]['grid']} grid, {best[1]} NFE used"})
        if nfe in (1, 35):
            shown[f"teacher, {nfe} NFE"] = best[2]
    return rows, shown


def bench_dataset(data: str, work: Path, quick: bool) -> dict:
    s = dict(SETTINGS[data])
    if quick:
        s.update(steps=60, sid_steps=30, couples=512, n=256)
    metric, n, steps = s["metric"], s["n"], s["steps"]
    budget = [f"train.steps={steps}", f"train.checkpoint_every={max(steps // 6, 1)}"]
    times = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = round(time.perf_counter() - t0, 1)
        return out

    teacher, shortcut = work / f"{data}-teacher", work / f"{data}-shortcut"
    reflow2, distilled, sid = work / f"{data}-2rf", work / f"{data}-2rf-distilled", work / f"{data}-sid"
    timed("teacher", lambda: run.train_run(configs.load(CONFIGS / f"{data}-fm.yaml", budget), teacher, progress=False))
    timed("shortcut", lambda: run.train_run(configs.load(CONFIGS / f"{data}-shortcut.yaml", budget), shortcut,
                                            progress=False))
    # Couples (for the 2-RF from the teacher, for its distillation from the 2-RF) are drawn with the teacher's
    # best ODE sampler and grid at 35 NFE.
    rows, shown = teacher_rows(teacher, metric, n)
    best35 = next(row for row in rows if row["method"] == "teacher")
    ode = {k: best35[k] for k in ("sampler", "grid", "steps")}
    reflow = registry.commands()["reflow"]
    couples = {"n": s["couples"], **ode, "seed": 0}
    timed("reflow", lambda: run.derive_run(reflow, teacher, reflow2, options={**couples, "distill": 0},
                                           overrides=budget, progress=False))
    timed("reflow_distill", lambda: run.derive_run(reflow, reflow2, distilled, options={**couples, "distill": 1},
                                                   overrides=budget, progress=False))
    # SiD takes two optimizer phases and four network calls per step: its own step count.
    timed("sid", lambda: run.derive_run(registry.commands()["distill"], teacher, sid, options={"method": "sid"},
                                        progress=False, overrides=[f"train.steps={s['sid_steps']}",
                                                                   f"train.checkpoint_every={max(s['sid_steps'] // 4, 1)}"]))

    for label, folder, nfes in (("shortcut", shortcut, NFES), ("2-rectified flow", reflow2, NFES),
                                ("2-RF distilled to 1 step", distilled, (1,)), ("SiD (alpha 1.2)", sid, NFES)):
        for nfe in nfes:
            d, used, x = score(folder, [], metric, n, sampler=None, steps=nfe)
            rows.append({"method": label, "nfe": used, "distance": d})
            if nfe == 1:
                shown[f"{label}, 1 NFE"] = x
    held, _ = configs.dataset(configs.load(CONFIGS / f"{data}-fm.yaml"), "test")
    train_x, _ = configs.dataset(configs.load(CONFIGS / f"{data}-fm.yaml"), "train")
    floor = metrics.digits_fd(train_x, held) if data == "digits" else \
        metrics.sliced_wasserstein(train_x[:n], held[:n], generator=torch.Generator().manual_seed(0))
    straight = json.loads((reflow2 / "straightness.json").read_text())
    return {"data": data, "metric": metric, "settings": s, "train_seconds": times, "real_data_floor": floor,
            "straightness": {"teacher": straight["straightness_before"], "2-RF": straight["straightness_after"]},
            "rows": rows, "shown": {"held-out data": held[:n], **shown}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench onestep", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not a measurement)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--data", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = [bench_dataset(data, work, args.quick) for data in args.data]
    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# One-step quality", "", f"Command: `diffkit bench onestep{' --quick' if args.quick else ''}` on CPU "
            f"({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}. Distance of each "
            "model's samples (EMA weights, seed 0) to the held-out split; lower is better.", ""]
    out = {"command": text[2].split("`")[1], "device": "cpu", "torch": torch.__version__, "datasets": []}
    for r in results:
        teacher35 = next(row["distance"] for row in r["rows"] if row["method"] == "teacher")
        for row in r["rows"]:
            row["over_teacher_35nfe"] = row["distance"] / teacher35
        best1 = min((row for row in r["rows"] if row["nfe"] == 1 and row["method"] != "teacher (best ODE sampler)"),
                    key=lambda row: row["distance"])
        r["best_1nfe"] = {"method": best1["method"], "over_teacher_35nfe": best1["over_teacher_35nfe"]}
        if r["data"] == "digits":
            out["digits_best_1nfe_over_teacher_35nfe"] = best1["over_teacher_35nfe"]
        image = args.out / f"onestep-{r['data']}.png"
        report.panels(image, r.pop("shown"), title=f"{r['data']}: samples at 1 NFE next to the teacher")
        text += [f"## {r['data']} ({r['metric']})", "",
                 f"Real-data floor (train split vs held-out split): {r['real_data_floor']:.4g}. Training steps per "
                 f"model: {r['settings']['steps']} (SiD: {r['settings']['sid_steps']}); couples: {r['settings']['couples']}; "
                 f"{r['settings']['n']} samples per row; couples drawn with the teacher's best 35-NFE sampler. Wall-clock per stage in this invocation (s; a stage resumed from --work takes ~0): {r['train_seconds']}.", "",
                 report.table(r["rows"], ["method", "nfe", "distance", "over_teacher_35nfe", "how"]), "",
                 f"Straightness of the Euler trajectories (Liu et al. 2022; 0 = straight): teacher "
                 f"{r['straightness']['teacher']:.4g}, 2-RF {r['straightness']['2-RF']:.4g}.", "",
                 f"Best one-step model: {best1['method']}, {best1['over_teacher_35nfe']:.3g}x the teacher's 35-NFE "
                 "distance.", "", f"![{r['data']}]({image.name})", ""]
        out["datasets"].append(r)
    report.results(args.out, "onestep", out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
