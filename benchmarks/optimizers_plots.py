"""The figure and the Markdown report of benchmarks/optimizers.py (training_stack.png / .md)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import scaling  # noqa: E402

from diffkit.report import save_figure, table  # noqa: E402


def figure(result: dict, path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.2))
    for a, data in zip(axes[:2], ("digits", "checkerboard")):
        for best in result[data]["summary"]:
            rows = result[data]["sweep"][best["run"]]
            a.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=best["run"])
        a.axhline(result[data]["target_loss"], color="gray", ls=":", label="target (AdamW final)")
        a.set(title=f"{data}: held-out loss (EMA), best lr each", xlabel="step", yscale="log")
        a.legend(fontsize=7)
    ax = axes[1:]
    for (kind, param), style in {("adamw", "standard"): "r--", ("adamw", "spectral"): "r-",
                                 ("muon", "standard"): "b--", ("muon", "spectral"): "b-"}.items():
        rows = [r for r in result["coord_check"] if (r["optimizer"], r["parametrization"]) == (kind, param)]
        ax[1].plot([r["width"] for r in rows], [r["rms"][-1] for r in rows], style, label=f"{kind} {param}")
    ax[1].set(title="coord check: output RMS after the steps", xlabel="width", xscale="log", yscale="log")
    ax[1].legend(fontsize=7)
    t = result["lr_transfer"]
    for (kind, param), style in {("adamw", "standard"): "r--", ("adamw", "spectral"): "r-",
                                 ("muon", "standard"): "b--", ("muon", "spectral"): "b-"}.items():
        for width, marker in zip(t["widths"], ("o", "s")):
            rows = [r for r in t["rows"] if (r["optimizer"], r["parametrization"], r["width"]) == (kind, param, width)]
            ax[2].plot([r["lr_mult"] for r in rows], [r["loss"] for r in rows], style, marker=marker,
                       label=f"{kind} {param} w{width}")
    ax[2].set(title="lr transfer (o narrow, s wide)", xlabel="lr multiplier", xscale="log", yscale="log")
    ax[2].legend(fontsize=6)
    for name, rows in result["embedding_drift"].items():
        ax[3].plot([r["step"] for r in rows], [r["label_max_abs"] for r in rows], label=name)
    ax[3].set(title="label table max |w| (batch 16)", xlabel="step")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _coord_table(rows: list[dict]) -> list[dict]:
    """Per (optimizer, parametrization): each layer's RMS at the widest width over the narrowest."""
    out = []
    for key in dict.fromkeys((r["optimizer"], r["parametrization"]) for r in rows):
        group = sorted((r for r in rows if (r["optimizer"], r["parametrization"]) == key), key=lambda r: r["width"])
        narrow, wide = group[0], group[-1]
        out.append({"optimizer": key[0], "parametrization": key[1], "widths": f"{narrow['width']}->{wide['width']}",
                    **{f"rms ratio L{i}": w / n for i, (n, w) in enumerate(zip(narrow["rms"], wide["rms"]))},
                    "output change ratio": wide["change"][-1] / max(narrow["change"][-1], 1e-12)})
    return out


def _optimizers(result: dict, data: str) -> list[str]:
    c = result[data]
    ratios = [f"{k.split('_')[0]} {v:.2f}" if v is not None else f"{k.split('_')[0]} not reached"
              for k, v in c.items() if k.endswith("_steps_to_target_over_adamw")]
    edge = [r["run"] for r in c["summary"] if not r["lr_inside_grid"]]
    grids = "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in c["grids"].items())
    return [f"Target: AdamW's final held-out loss {c['target_loss']:.4g} after {c['steps']} steps. "
            f"Grids: {grids} (Muon: muon_lr, with AdamW's best lr for the rest).", "",
            table(c["summary"], ["optimizer", "run", "final_loss", "steps_to_target", "seconds_to_target", c["metric"]]),
            "", "Steps to target over AdamW's: " + ", ".join(ratios) + ". " +
            (f"Best lr on the edge of its grid: {', '.join(edge)}." if edge else "Every best lr is inside its grid."), ""]


def markdown(result: dict) -> str:
    t = result["lr_transfer"]
    ratios = [{"parametrization": p, **{f"{k} best-lr ratio (wide/narrow)": v for k, v in r.items()}}
              for p, r in t["best_lr_ratio"].items()]
    coord = _coord_table(result["coord_check"])
    drift = [{"run": name, "label max abs w, start": rows[0]["label_max_abs"], "label max abs w, end": rows[-1]["label_max_abs"],
              "noise-embedding max abs w, end": rows[-1]["noise_max_abs"]} for name, rows in result["embedding_drift"].items()]
    lines = [
        "# Training stack: optimizers, clipping, spectral parametrization, scaling law", "",
        f"Command: `{result['command']}` on {result['device']}, torch {result['torch']}. MLP denoisers; "
        "loss = the training objective on the held-out split (4 fixed noise draws), EMA weights.", "",
        "## Optimizers at equal steps: digits (EDM; classifier FD of 500 samples)", "",
        *_optimizers(result, "digits"),
        "## Optimizers at equal steps: checkerboard (rectified flow; energy distance of 500 samples)", "",
        *_optimizers(result, "checkerboard"),
        "## Clipping (AdamW, best lr)", "",
        table(result["clip"], ["grad_clip", "final_loss", "clipped_fraction", "norm_p50", "norm_p90", "norm_p99",
                               "norm_max", "last_threshold"]), "",
        "## Coordinate check (activation RMS at the widest width over the narrowest; 1 = flat)", "",
        table(coord, list(coord[0])), "",
        f"## Learning-rate transfer (widths {t['widths'][0]} and {t['widths'][1]}, {t['steps']} steps, lr x 3 steps)",
        "", table(ratios, list(ratios[0])), "",
        "Best lr on the edge of the grid: " + (", ".join(t["best_on_grid_edge"]) or "none") + ".", "",
        table(t["rows"], ["optimizer", "parametrization", "width", "lr_mult", "loss"]), "",
        "## Embedding drift under sign optimizers (conditional, batch 16, weight decay 0.01)", "",
        table(drift, ["run", "label max abs w, start", "label max abs w, end", "noise-embedding max abs w, end"]), "",
        "## Scaling law on digits", "", *scaling.markdown(result["scaling"]), "",
        "![training stack](training_stack.png)", ""]
    return "\n".join(lines)
