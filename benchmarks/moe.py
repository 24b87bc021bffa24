"""Mixture-of-experts balancing on digits: a DiT with top-2-of-8 expert MLPs under no balancing, the auxiliary
loss and auxiliary-loss-free bias updates, against the dense DiT with the same active parameters.

A section of `diffkit bench finetune` (benchmarks/finetune.py).

Every run: DiT width 64, depth 4, patch 2, rectified flow with velocity prediction, batch 128, AdamW lr 1e-3
(constant after warm-up), the same steps and seed. Experts have hidden width 4*64/2, so a token passes through
as many MLP parameters as in the dense block. MaxVio (max load / mean load - 1, Wang et al. 2024) is the one
each training batch had, averaged over the DiT's blocks; the table gives its mean over training and over the
last tenth. FD: the classifier Fréchet distance of 500 EMA samples (heun, 18 steps) to the held-out digits.

JSON keys: `moe_maxvio_none`, `moe_maxvio_auxloss`, `moe_maxvio_auxfree` (mean over training), `moe_fd`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_runs import SmallRun  # noqa: E402

from diffkit import report  # noqa: E402

VARIANTS = {"dense": None, "none": "none", "aux_loss": "aux_loss", "aux_free": "aux_free"}
KEYS = {"none": "moe_maxvio_none", "aux_loss": "moe_maxvio_auxloss", "aux_free": "moe_maxvio_auxfree"}
DIT = "patch_size: 2, width: 64, depth: 4, heads: 4"
STEPS = 1500
PANELS = 1


def _overrides(balance: str | None) -> list[str]:
    moe = "" if balance is None else f", moe: {{experts: 8, top_k: 2, balance: {balance}}}"
    return ["model.net=dit", f"model.args={{{DIT}{moe}}}", "model.path=rectified_flow", "model.prediction=velocity",
            "objective.density=logit_normal", "train.lr=0.001", "train.cosine=false"]


def maxvio_per_step(run_dir: Path) -> np.ndarray:
    """(steps,) MaxVio of each training batch, averaged over the MoE layers, from the run's metrics.jsonl."""
    per_layer: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for key, values in json.loads(line).items():
            if key.endswith(".maxvio"):
                per_layer.setdefault(key, []).extend(values)
    return np.mean([np.asarray(v) for v in per_layer.values()], axis=0)


def run(work: Path, quick: bool) -> dict:
    """Train every variant in work/<variant>; the section's JSON: the issue's keys, and each run's curve and scores."""
    steps, n_fd = (60, 50) if quick else (STEPS, 500)
    runs = {}
    for name, balance in VARIANTS.items():
        d = SmallRun(64, 4, _overrides(balance))
        ema = d.train(steps, work / name)
        row = {"params": d.params, "seconds": d.seconds, "heldout_loss": d.heldout_loss(ema.model),
               "digits_fd": d.quality(ema, n_fd)["digits_fd"]}
        if balance is not None:
            vio = maxvio_per_step(work / name)
            row |= {"maxvio_mean": float(vio.mean()), "maxvio_last_tenth": float(vio[-max(1, steps // 10):].mean()),
                    "maxvio_curve": vio.round(4).tolist()}
        runs[name] = row
        print(f"moe {name}: loss {row['heldout_loss']:.4f}  FD {row['digits_fd']:.3f}  "
              f"MaxVio {row.get('maxvio_mean', float('nan')):.3f}", flush=True)
    return {**{key: runs[v]["maxvio_mean"] for v, key in KEYS.items()},
            "moe_fd": {v: runs[v]["digits_fd"] for v in VARIANTS}, "steps": steps, "runs": runs}


def markdown(result: dict) -> list[str]:
    rows = [{"balancing": v, "params": r["params"], "maxvio_mean": r.get("maxvio_mean", ""),
             "maxvio_last_tenth": r.get("maxvio_last_tenth", ""), "heldout_loss": r["heldout_loss"],
             "digits_fd": r["digits_fd"], "seconds": r["seconds"]} for v, r in result["runs"].items()]
    return [f"DiT (width 64, depth 4) on digits, {result['steps']} steps; MoE: 8 experts, top 2, sigmoid scores, the "
            "dense MLP's active parameters. MaxVio per training batch, averaged over blocks.", "",
            report.table(rows, list(rows[0]))]


def plot(axes, result: dict) -> None:
    """MaxVio over training (moving average over 2% of the steps), one line per balancing."""
    (ax,) = axes
    for v, r in result["runs"].items():
        if "maxvio_curve" in r:
            curve = np.asarray(r["maxvio_curve"])
            k = max(1, len(curve) // 50)
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth, label=f"{v} (FD {r['digits_fd']:.2f})")
    ax.set(xlabel="step", ylabel="MaxVio (batch, mean over blocks)", yscale="log",
           title=f"MoE balancing (dense DiT: FD {result['runs']['dense']['digits_fd']:.2f})")
    ax.legend(fontsize=8)
