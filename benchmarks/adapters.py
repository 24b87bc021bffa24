"""Fine-tuning with adapters on digits: a model of the classes 0-4 fine-tuned to 5-9 with LoRA, LoRA-GA, PiSSA
(rank 8 each, through peft) and in full, each at the best lr of the same sweep.

A section of `diffkit bench finetune` (benchmarks/finetune.py).

The base is the digits MLP (width 256, depth 4: every weight matrix is a Linear layer) trained on classes 0-4
with diffkit's loop (small_runs.SmallRun: batch 128, constant lr after warm-up, EMA with EDM's ramp-up). Each
fine-tune starts from its EMA weights (run.start_weights: the adapters initialised on them, LoRA-GA from the
gradient of the objective on 8 batches of 5-9) and trains on classes 5-9 at a constant lr (no warm-up), scored
by the held-out denoising loss of the EMA weights on the 5-9 test split every `every` steps. The target is
LoRA's final loss at its best lr; a method's steps to target are the first scored step at or below it.

JSON keys:
`loraga_steps_to_target_over_lora`, `pissa_steps_to_target_over_lora`, `full_steps_to_target_over_lora`
(None where a method never reaches the target), and per method its best lr, final loss, trainable weights and FD.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_runs import SmallRun  # noqa: E402

from diffkit import report  # noqa: E402

OLD, NEW = "[0,1,2,3,4]", "[5,6,7,8,9]"
KINDS = ("lora", "lora_ga", "pissa", "full")
LRS = (1e-3, 3e-3, 1e-2)
RANK = 8
FULL = {"base_steps": 1000, "steps": 250, "every": 10, "fd_n": 500}
QUICK = {"base_steps": 8, "steps": 4, "every": 2, "fd_n": 32}


def _fine_tune(work: Path, base: Path, kind: str, lr: float, n: dict, width: int,
               depth: int) -> tuple[SmallRun, list]:
    adapter = [] if kind == "full" else [f"model.adapter.name={kind}", f"model.adapter.rank={RANK}"]
    d = SmallRun(width, depth, [f"data.classes={NEW}", f"model.init={base}", *adapter, f"train.lr={lr}",
                              "train.warmup=0", "train.cosine=false"])
    start = {"step": 0, "loss": d.heldout_loss(d.model), "seconds": 0.0}
    return d, [start, *d.curve(list(range(n["every"], n["steps"] + 1, n["every"])), work / f"{kind}-{lr:g}")]


def _loss_at(curve: list[dict], step: int) -> float:
    return next(r["loss"] for r in curve if r["step"] == step)


def _steps_to(curve: list[dict], target: float) -> int | None:
    """The first scored step at or below `target` (None: never within the run)."""
    return next((r["step"] for r in curve if r["loss"] <= target), None)


PANELS = 3


def run(work: Path, quick: bool) -> dict:
    """Train the base, fine-tune it every way, and return the results (the JSON of this benchmark)."""
    n, (width, depth) = (QUICK, (32, 1)) if quick else (FULL, (256, 4))
    base = SmallRun(width, depth, [f"data.classes={OLD}", "train.cosine=false"])
    base.train(n["base_steps"], work / "base")
    rows, best, lrs = {}, {}, LRS[:2] if quick else LRS
    for kind in KINDS:
        for lr in lrs:
            d, curve = _fine_tune(work, work / "base", kind, lr, n, width, depth)
            rows[f"{kind} lr={lr:g}"] = curve
            if kind not in best or curve[-1]["loss"] < best[kind]["curve"][-1]["loss"]:
                best[kind] = {"lr": lr, "curve": curve, "digits": d}
    target = best["lora"]["curve"][-1]["loss"]
    # Looser targets: LoRA's loss after a fifth and half of the steps; and each lr on its own (LoRA's final loss).
    marks = sorted({max(n["every"], round(n["steps"] * f / n["every"]) * n["every"]) for f in (0.2, 0.5, 1.0)})
    milestones = [{"lora_step": m, "target_loss": (t := _loss_at(best["lora"]["curve"], m)),
                   **{k: _steps_to(b["curve"], t) for k, b in best.items()}} for m in marks]
    same_lr = [{"lr": lr, "target_loss": (t := rows[f"lora lr={lr:g}"][-1]["loss"]),
                **{k: _steps_to(rows[f"{k} lr={lr:g}"], t) for k in KINDS}} for lr in lrs]
    summary = []
    for kind, b in best.items():
        d = b["digits"]
        hit = next((r for r in b["curve"] if r["loss"] <= target), None)  # its seconds too
        ema = d.train(n["steps"], work / f"{kind}-{b['lr']:g}")  # resumes at its last step: the EMA weights
        summary.append({"method": kind, "lr": b["lr"], "final_loss": b["curve"][-1]["loss"],
                        "start_loss": b["curve"][0]["loss"], "steps_to_target": hit["step"] if hit else None,
                        "seconds_to_target": hit["seconds"] if hit else None,
                        "trainable_params": sum(p.numel() for p in d.model.parameters() if p.requires_grad),
                        "total_params": d.params, "digits_fd": d.quality(ema, n["fd_n"])["digits_fd"]})
    lora = next(s for s in summary if s["method"] == "lora")["steps_to_target"]
    result = {"base": {"classes": OLD, "steps": n["base_steps"], "heldout_loss": base.heldout_loss(base.model),
                       "width": width, "depth": depth},
              "fine_tune": {"classes": NEW, "steps": n["steps"], "every": n["every"], "rank": RANK, "lrs": list(lrs)},
              "target_loss": target, "summary": summary, "milestones": milestones, "same_lr": same_lr,
              "curves": rows}
    for s in summary:
        if s["method"] != "lora":
            key = {"lora_ga": "loraga"}.get(s["method"], s["method"])
            result[f"{key}_steps_to_target_over_lora"] = s["steps_to_target"] / lora if s["steps_to_target"] else None
    return result


def plot(ax, result: dict) -> None:
    """Loss curves at each method's best lr; final loss vs lr; LoRA and LoRA-GA at each lr."""
    for s in result["summary"]:
        curve = result["curves"][f"{s['method']} lr={s['lr']:g}"]
        ax[0].plot([r["step"] for r in curve], [r["loss"] for r in curve], label=f"{s['method']} (lr {s['lr']:g})")
        ax[1].plot(result["fine_tune"]["lrs"][:len([k for k in result["curves"] if k.startswith(s["method"] + " ")])],
                   [result["curves"][k][-1]["loss"] for k in result["curves"] if k.startswith(s["method"] + " ")],
                   marker="o", label=s["method"])
    ax[0].axhline(result["target_loss"], color="gray", ls=":", label="target (LoRA's final loss)")
    ax[0].set(title=f"held-out loss on {result['fine_tune']['classes']} (EMA), best lr each, rank "
                    f"{result['fine_tune']['rank']}", xlabel="fine-tuning step", yscale="log")
    ax[1].set(title="final loss vs lr", xlabel="lr", xscale="log", yscale="log")
    for kind, color in (("lora", "C0"), ("lora_ga", "C1")):
        for lr, style in zip(result["fine_tune"]["lrs"], (":", "--", "-")):
            curve = result["curves"][f"{kind} lr={lr:g}"]
            ax[2].plot([r["step"] for r in curve], [r["loss"] for r in curve], style, color=color,
                       label=f"{kind} lr {lr:g}")
    ax[2].set(title="LoRA vs LoRA-GA at each lr", xlabel="fine-tuning step", yscale="log")
    for a in ax:
        a.legend(fontsize=7)


def markdown(result: dict) -> list[str]:
    b, f = result["base"], result["fine_tune"]
    rows = [{"method": s["method"], "best lr": f"{s['lr']:g}", "trainable": f"{s['trainable_params']:,}",
             "start loss": f"{s['start_loss']:.4f}", "final loss": f"{s['final_loss']:.4f}",
             "steps to target": s["steps_to_target"] or "never",
             "s to target": f"{s['seconds_to_target']:.1f}" if s["seconds_to_target"] else "-",
             "FD": f"{s['digits_fd']:.2f}"} for s in result["summary"]]
    ratios = {k: v for k, v in result.items() if k.endswith("_steps_to_target_over_lora")}
    return [f"Digits {b['classes']} -> {f['classes']}. Base: MLP width {b['width']}, depth {b['depth']}, {b['steps']} steps on {b['classes']} (held-out loss "
            f"{b['heldout_loss']:.4f}). Fine-tunes: {f['steps']} steps on {f['classes']}, rank {f['rank']}, best lr "
            f"of {', '.join(f'{lr:g}' for lr in f['lrs'])}, scored every {f['every']} steps. Target: LoRA's final "
            f"loss {result['target_loss']:.4f}.", "", report.table(rows, list(rows[0])), "",
            "Steps to target over LoRA's: " + ", ".join(f"{k.split('_')[0]} {v:.2f}" if v else f"{k.split('_')[0]} "
                                                       "never" for k, v in ratios.items()), "",
            "Steps to LoRA's loss (best lr each) after a part of its run:", "",
            report.table(result["milestones"], ["lora_step", "target_loss", *KINDS]), "",
            "Each lr on its own: steps to LoRA's final loss at that lr (none: not reached):", "",
            report.table(result["same_lr"], ["lr", "target_loss", *KINDS])]
