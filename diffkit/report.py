"""What a run folder shows a person: image grids, scatter plots, loss curves, report.md; all written atomically."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def results(folder: Path, name: str, data: dict, lines: list[str]) -> None:
    """A benchmark's results: folder/name.json (data) and folder/name.md (lines), both atomic; prints the lines."""
    atomic_write(Path(folder) / f"{name}.json", json.dumps(data, indent=1))
    atomic_write(Path(folder) / f"{name}.md", "\n".join(lines))
    print("\n".join(lines))


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure to path atomically (temp file + rename) and close it."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def image_grid(x: torch.Tensor, cols: int | None = None) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H, cols*W, C) uint8 mosaic with 1-pixel gaps."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, c = x.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    return out


def panels(path: Path, sets: dict[str, torch.Tensor], *, title: str = "", cols: int = 4) -> None:
    """Panels in rows of `cols`, one per named set: image mosaics for (N, C, H, W), scatter plots for (N, 2) on
    axes shared by every scatter panel and fitted to the points. Titles wrap instead of running off the image."""
    rows = -(-len(sets) // cols)
    cols = min(cols, len(sets))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.1 * rows + (0.4 if title else 0)), squeeze=False)
    points = [x for x in sets.values() if x.ndim == 2]
    if points:
        both = torch.cat(points).float()
        lo, hi = both.nan_to_num().quantile(0.005, dim=0), both.nan_to_num().quantile(0.995, dim=0)
        pad = 0.1 * (hi - lo).max().item() + 1e-6
    for ax in axes.flat[len(sets):]:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, sets.items()):
        if x.ndim == 4:
            grid = image_grid(x[:64])
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set_xlim(lo[0].item() - pad, hi[0].item() + pad), ax.set_ylim(lo[1].item() - pad, hi[1].item() + pad)
            ax.set_aspect("equal")
        ax.set_title(textwrap.fill(name, 32), fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(textwrap.fill(title, int(18 * cols)), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def loss_curve(metrics_jsonl: Path, path: Path) -> None:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    # SiD's generator loss can be negative: a log axis only when every loss is positive.
    ax.set_xlabel("step"), ax.set_ylabel("training loss (per-sample mean)")
    ax.set_yscale("log" if all(r["loss"] > 0 for r in rows) else "symlog")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of the given columns; floats to 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
