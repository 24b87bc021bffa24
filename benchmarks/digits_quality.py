"""Digits quality of `diffkit demo`: classifier Fréchet distance of its samples to the held-out split, next to
the real-data floor (train split vs held-out split).

    diffkit bench digits [--fast] [--out DIR]

Runs the demo (training included) and writes digits_quality.json / .md under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from diffkit import demo
from diffkit.report import table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench digits", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the seconds-long demo variant (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = demo.main(Path(tmp), fast=args.fast, progress=False)
        result = json.loads((run / "metrics.json").read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "samples.png", args.out / "digits_quality.png")
    result.update(command="diffkit bench digits" + (" --fast" if args.fast else ""), torch=torch.__version__,
                  device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    floor = result["real_data_floor"]["digits_fd"]
    for row in result["samples"]:
        row["fd_over_floor"] = row["digits_fd"] / floor
    text = "\n".join([
        "# Digits quality of `diffkit demo`", "", f"Command: `{result['command']}` on {result['device']}, torch {result['torch']}; "
        f"training took {result['train_seconds']:.0f} s. {result['n_samples']} samples per row, EMA weights.", "",
        f"Real-data floor (train split vs held-out split): Fréchet distance {floor:.3f}.", "",
        table(result["samples"], ["sampler", "nfe", "digits_fd", "fd_over_floor", "digits_kid"]), "",
        "![samples](digits_quality.png)", ""])
    (args.out / "digits_quality.json").write_text(json.dumps(result, indent=1))
    (args.out / "digits_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
