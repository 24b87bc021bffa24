"""The training stack: AdamW vs Muon vs Lion vs Tiger at equal steps on digits and the checkerboard, clipping,
the spectral parametrization's coordinate check and learning-rate transfer, the sign optimizers' embedding
drift, and the scaling-law fit (scaling.py).

    diffkit bench optimizers [--quick] [--out DIR] [--work DIR]

1. Optimizers: an MLP (width 256, depth 4, batch 128, constant lr after 50 warm-up steps) on digits (EDM) and
   on the 2-D checkerboard (configs/checkerboard-fm.yaml: rectified flow), each optimizer at the best lr of a
   4-point sweep (Muon sweeps muon_lr with AdamW's best lr for the rest); held-out loss (EMA) every 50 steps;
   steps and seconds to reach AdamW's final loss; at the end the classifier FD (digits) or the energy distance
   (checkerboard) of 500 samples. A best lr on the edge of its grid is flagged.
2. Clipping: AdamW at its best lr on digits with grad_clip 1 (the sweep's run), auto and off; the fraction of
   steps clipped and the pre-clip norm's percentiles from metrics.jsonl.
3. Coordinate check: activation RMS per layer after 10 steps (and its change from init) at widths 64..1024,
   standard vs spectral, AdamW and Muon.
4. LR transfer: a 5-point lr sweep (factor 3 apart) at widths 64 and 1024, standard vs spectral, AdamW and Muon.
5. Embedding drift: max |w| of the label table and of the noise embedding's first layer over a conditional run
   at batch 16 (labels often absent from a batch), AdamW vs Lion and Tiger with and without their table on AdamW.
6. Scaling: L(N, D) fitted on small digits runs, the largest held out (scaling.py).

Writes training_stack.json / .md / .png and training_stack-scaling.png under --out (default
benchmarks/results). JSON keys: `muon_steps_to_target_over_adamw`, `lion_...`, `tiger_...` (digits; the
checkerboard's under `checkerboard`), `lr_transfer_spectral` and `lr_transfer_standard` (best lr at the widest
width over best lr at the narrowest, per optimizer), `scaling_holdout_rel_error`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_runs import SmallRun  # noqa: E402
import optimizers_plots  # noqa: E402
import scaling  # noqa: E402

from diffkit import report  # noqa: E402

SWEEPS = {"adamw": ("lr", [3e-4, 1e-3, 3e-3, 1e-2]), "muon": ("muon_lr", [0.003, 0.01, 0.03, 0.1]),
          "lion": ("lr", [3e-5, 1e-4, 3e-4, 1e-3]), "tiger": ("lr", [3e-5, 1e-4, 3e-4, 1e-3])}
CHECKERBOARD = Path(__file__).resolve().parents[1] / "configs" / "checkerboard-fm.yaml"
DATASETS = {"digits": (None, "digits_fd"), "checkerboard": (CHECKERBOARD, "energy_distance")}
WIDTHS = (64, 128, 256, 512, 1024)
TRANSFER = (1 / 3, 1, 3, 9, 27)  # x (lr 1e-3, muon_lr 0.02); spectral lrs are those at fan-in 256


def compare(work: Path, data: str, steps: int, every: int, points: int) -> dict:
    """Each optimizer at the best lr of its sweep on `data`: steps and seconds to AdamW's final loss, quality."""
    config, metric = DATASETS[data]
    runs, best = {}, {}
    at = list(range(every, steps + 1, every))
    for kind, (key, values) in SWEEPS.items():
        values = values[:points]
        rest = [f"train.lr={best['adamw']['value']}"] if kind == "muon" else []
        for value in values:
            d = SmallRun(256, 4, [f"train.optimizer={kind}", f"train.{key}={value}", "train.cosine=false", *rest],
                         config=config)
            name, folder = f"{kind} {key}={value:g}", work / f"{data}-{kind}-{value}"
            runs[name] = rows = d.curve(at, folder)
            if kind not in best or rows[-1]["loss"] < best[kind]["rows"][-1]["loss"]:
                best[kind] = {"value": value, "name": name, "rows": rows, "run": d, "folder": folder,
                              "inside": values[0] < value < values[-1]}
    target = best["adamw"]["rows"][-1]["loss"]
    summary = []
    for kind, b in best.items():
        hit = next((r for r in b["rows"] if r["loss"] <= target), None)
        summary.append({"optimizer": kind, "run": b["name"], "lr_inside_grid": b["inside"],
                        "final_loss": b["rows"][-1]["loss"], "steps_to_target": hit["step"] if hit else None,
                        "seconds_to_target": hit["seconds"] if hit else None,
                        metric: b["run"].quality(b["run"].train(steps, b["folder"]))[metric]})
    adamw = summary[0]["steps_to_target"]
    ratios = {f"{r['optimizer']}_steps_to_target_over_adamw": r["steps_to_target"] / adamw
              if r["steps_to_target"] is not None and adamw else None for r in summary[1:]}
    return {"target_loss": target, "steps": steps, "metric": metric, "grids": {k: v[1][:points] for k, v in SWEEPS.items()},
            "summary": summary, "sweep": runs, "best": best, **ratios}


def clip_rows(work: Path, best: dict, steps: int, every: int) -> list[dict]:
    """AdamW at its best lr with grad_clip 1 (the sweep's run), auto and off."""
    lr, rows = best["adamw"]["value"], []
    for setting in ("1.0", "auto", ".inf"):
        if setting == "1.0":  # the sweep's run
            folder, curve = best["adamw"]["folder"], best["adamw"]["rows"]
        else:
            folder = work / f"clip-{setting}"
            d = SmallRun(256, 4, ["train.optimizer=adamw", f"train.lr={lr}", "train.cosine=false",
                                f"train.grad_clip={setting}"])
            curve = d.curve(list(range(every, steps + 1, every)), folder)
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        norms = torch.tensor([n for r in logged for n in r["grad_norms"]])
        q = torch.quantile(norms, torch.tensor([0.5, 0.9, 0.99])).tolist()
        clipped = sum(r["clipped_fraction"] * len(r["grad_norms"]) for r in logged) / len(norms)
        rows.append({"grad_clip": setting, "final_loss": curve[-1]["loss"], "clipped_fraction": clipped,
                     "norm_p50": q[0], "norm_p90": q[1], "norm_p99": q[2], "norm_max": norms.max().item(),
                     "last_threshold": logged[-1]["clip_threshold"]})
    return rows


def _activations(d: SmallRun) -> list[float]:
    """RMS of the input layer, each block and the output on a fixed held-out batch at sigma = 1."""
    net, out = d.model.net, []
    hooks = [m.register_forward_hook(lambda m, i, o: out.append(o.detach())) for m in (net.inp, *net.blocks, net.out)]
    with torch.no_grad():
        d.model(d.x_test[:256], torch.ones(256), None)
    for h in hooks:
        h.remove()
    return out


def coord_check(work: Path, steps: int, widths: tuple[int, ...]) -> list[dict]:
    """Activation RMS per layer after `steps` steps, and its change since step 1."""
    rows = []
    for kind in ("adamw", "muon"):
        for param in ("standard", "spectral"):
            for width in widths:
                d = SmallRun(width, 2, [f"train.optimizer={kind}", f"train.parametrization={param}", "train.warmup=1",
                                      "train.cosine=false", "train.muon_lr=0.02"])
                d.train(1, work / f"coord-{kind}-{param}-{width}")
                before = _activations(d)
                d.train(steps, work / f"coord-{kind}-{param}-{width}")
                after = _activations(d)
                rms = [a.square().mean().sqrt().item() for a in after]
                change = [(a - b).square().mean().sqrt().item() for a, b in zip(after, before)]
                rows.append({"optimizer": kind, "parametrization": param, "width": width, "rms": rms, "change": change})
    return rows


def lr_transfer(work: Path, steps: int, widths: tuple[int, int], mults: tuple[float, ...]) -> dict:
    rows, ratios, edges = [], {"standard": {}, "spectral": {}}, []
    for kind in ("adamw", "muon"):
        for param in ("standard", "spectral"):
            best = {}
            for width in widths:
                for mult in mults:
                    d = SmallRun(width, 2, [f"train.optimizer={kind}", f"train.parametrization={param}",
                                            f"train.lr={1e-3 * mult}", f"train.muon_lr={0.02 * mult}",
                                            f"train.warmup={max(1, steps // 10)}"])
                    d.train(steps, work / f"lr-{kind}-{param}-{width}-{mult:g}")
                    loss = d.heldout_loss(d.model)
                    rows.append({"optimizer": kind, "parametrization": param, "width": width, "lr_mult": mult,
                                 "loss": loss})
                    if width not in best or loss < best[width][1]:
                        best[width] = (mult, loss)
            ratios[param][kind] = best[widths[-1]][0] / best[widths[0]][0]
            edges += [f"{kind} {param} width {w}" for w in widths if best[w][0] in (mults[0], mults[-1])]
    return {"rows": rows, "widths": list(widths), "steps": steps, "best_lr_ratio": ratios, "best_on_grid_edge": edges}


def embedding_drift(work: Path, steps: int, every: int) -> dict:
    def measure(d, ema):
        cond = d.model.net.cond
        return {"label_max_abs": cond.labels.table.weight.abs().max().item(),
                "noise_max_abs": cond.mlp[0].weight.abs().max().item()}

    runs = {}
    for name, over in (("adamw lr=1e-3", ["train.optimizer=adamw", "train.lr=1e-3"]),
                       ("lion lr=3e-4", ["train.optimizer=lion", "train.lr=3e-4", "train.sign_embeddings_adamw=false"]),
                       ("lion lr=3e-4, table on AdamW", ["train.optimizer=lion", "train.lr=3e-4"]),
                       ("tiger lr=3e-4", ["train.optimizer=tiger", "train.lr=3e-4", "train.sign_embeddings_adamw=false"]),
                       ("tiger lr=3e-4, table on AdamW", ["train.optimizer=tiger", "train.lr=3e-4"])):
        d = SmallRun(64, 2, [*over, "train.batch=16", "train.cosine=false", "train.weight_decay=0.01"], conditional=True)
        start = {"step": 0, **measure(d, None)}
        runs[name] = [start, *d.curve(list(range(every, steps + 1, every)), work / f"embed-{name}", measure)]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench optimizers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = {"steps": 600, "every": 50, "coord": 10, "transfer": 150, "embed": 1000, "embed_every": 100}
    if args.quick:
        n = {"steps": 6, "every": 3, "coord": 2, "transfer": 3, "embed": 4, "embed_every": 2}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        comp = {data: compare(work, data, n["steps"], n["every"], 2 if args.quick else 4) for data in DATASETS}
        result = {
            "command": "diffkit bench optimizers" + (" --quick" if args.quick else ""), "torch": torch.__version__,
            "device": f"CPU ({platform.machine()}, 1 thread)",
            **{data: {k: v for k, v in c.items() if k != "best"} for data, c in comp.items()},
            "clip": clip_rows(work, comp["digits"]["best"], n["steps"], n["every"]),
            "coord_check": coord_check(work, n["coord"], WIDTHS if not args.quick else (16, 32)),
            "lr_transfer": lr_transfer(work, n["transfer"], *(((64, 1024), TRANSFER) if not args.quick else
                                                              ((16, 32), TRANSFER[:3]))),
            "embedding_drift": embedding_drift(work, n["embed"], n["embed_every"]),
            "scaling": scaling.section(work, args.quick),
        }
    result |= {k: v for k, v in result["digits"].items() if k.endswith("_steps_to_target_over_adamw")}
    result["lr_transfer_spectral"] = result["lr_transfer"]["best_lr_ratio"]["spectral"]
    result["lr_transfer_standard"] = result["lr_transfer"]["best_lr_ratio"]["standard"]
    result["scaling_holdout_rel_error"] = result["scaling"]["holdout_rel_error"]
    args.out.mkdir(parents=True, exist_ok=True)
    optimizers_plots.figure(result, args.out / "training_stack.png")
    scaling.figure(result["scaling"], args.out / "training_stack-scaling.png")
    report.results(args.out, "training_stack", result, optimizers_plots.markdown(result).split("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
