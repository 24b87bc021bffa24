"""The figure and the Markdown report of benchmarks/optimizers.py."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffkit.report import save_figure, table  # noqa: E402


def figure(result: dict, path) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for best in result["optimizers"]:
        rows = result["sweep"][best["run"]]
        ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=best["run"])
    ax[0].axhline(result["target_loss"], color="gray", ls=":", label="target (AdamW final)")
    ax[0].set(title="held-out loss (EMA), best lr each", xlabel="step", yscale="log")
    ax[0].legend(fontsize=7)
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


def markdown(result: dict) -> str:
    t = result["lr_transfer"]
    ratios = [{"parametrization": p, **{f"{k} best-lr ratio (wide/narrow)": v for k, v in r.items()}}
              for p, r in t["best_lr_ratio"].items()]
    coord = _coord_table(result["coord_check"])
    drift = [{"run": name, "label max abs w, start": rows[0]["label_max_abs"], "label max abs w, end": rows[-1]["label_max_abs"],
              "noise-embedding max abs w, end": rows[-1]["noise_max_abs"]} for name, rows in result["embedding_drift"].items()]
    lines = [
        "# Training stack on digits: optimizers, clipping, spectral parametrization", "",
        f"Command: `{result['command']}` on {result['device']}, torch {result['torch']}. Digits MLP, EDM denoiser; "
        "loss = the training objective on the held-out split (4 fixed noise draws), EMA weights.", "",
        "## Optimizers at equal steps", "",
        f"Target: AdamW's final held-out loss {result['target_loss']:.4g}.", "",
        table(result["optimizers"], ["optimizer", "run", "final_loss", "steps_to_target", "seconds_to_target",
                                     "digits_fd"]), "",
        "Steps to target over AdamW's: " + ", ".join(
            f"{k.split('_')[0]} {result[k]:.2f}" if result[k] is not None else f"{k.split('_')[0]} not reached"
            for k in result if k.endswith("_steps_to_target_over_adamw")) + ".", "",
        "## Clipping (AdamW, best lr)", "",
        table(result["clip"], ["grad_clip", "final_loss", "clipped_fraction", "norm_p50", "norm_p90", "norm_p99",
                               "norm_max", "last_threshold"]), "",
        "## Coordinate check (activation RMS at the widest width over the narrowest; 1 = flat)", "",
        table(coord, list(coord[0])), "",
        f"## Learning-rate transfer (widths {t['widths'][0]} and {t['widths'][1]}, {t['steps']} steps, lr x 3 steps)",
        "", table(ratios, list(ratios[0])), "",
        table(t["rows"], ["optimizer", "parametrization", "width", "lr_mult", "loss"]), "",
        "## Embedding drift under sign optimizers (conditional, batch 16, weight decay 0.01)", "",
        table(drift, ["run", "label max abs w, start", "label max abs w, end", "noise-embedding max abs w, end"]), "",
        "![optimizers](optimizers.png)", ""]
    return "\n".join(lines)
