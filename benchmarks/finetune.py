"""Training stack II on digits: mixture-of-experts balancing, adapter fine-tuning, low-rank compression.

    diffkit bench finetune [--only moe,adapters,lowrank | --replot] [--quick] [--out DIR] [--work DIR]

Each section is a module of its own (benchmarks/moe.py, adapters.py, lowrank.py) with `run(work, quick) -> dict`,
`markdown(result) -> lines`, `PANELS` and `plot(axes, result)`. `--only` reruns some sections and keeps the
others' stored results in finetune.json, each with the command and date that produced it, so one section can be
measured again without the other two; the markdown and the figure are rebuilt from the whole JSON (`--replot`
rebuilds them and runs nothing).
Writes finetune.json / .md / .png under --out (default benchmarks/results). The issue's keys sit at the top of
the JSON: `moe_maxvio_*`, `moe_fd`, `loraga_steps_to_target_over_lora`, `pissa_steps_to_target_over_lora`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffkit import report  # noqa: E402

SECTIONS = {"moe": "Mixture of experts: balancing", "adapters": "Fine-tuning with adapters",
            "lowrank": "Low-rank compression"}


def _module(name: str):
    return importlib.import_module(name)


def _headline(results: dict) -> dict:
    """The top-level keys every section names as its own (those starting with its own prefixes)."""
    out = {}
    for result in results.values():
        out |= {k: v for k, v in result.items() if k.startswith(("moe_", "loraga_", "pissa_"))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffkit bench finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--replot", action="store_true", help="rebuild finetune.md and .png from finetune.json only")
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds: not figures")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    chosen = [] if args.replot else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not (chosen or args.replot):
        raise SystemExit(f"diffkit bench finetune: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / "finetune.json"
    results = json.loads(stored.read_text())["sections"] if stored.exists() else {}
    if args.replot and not results:
        raise SystemExit(f"diffkit bench finetune --replot: no {stored} to rebuild from; run the benchmark first")
    command = " ".join(["diffkit bench finetune", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            result = _module(name).run((args.work or Path(tmp)) / name, args.quick)
            results[name] = {"command": command, "date": datetime.date.today().isoformat(),
                             "device": f"CPU ({platform.machine()}, 1 thread), torch {torch.__version__}", **result}
    results = {name: results[name] for name in SECTIONS if name in results}
    lines = ["# Training stack II on digits: MoE balancing, adapters, low rank", ""]
    for name, result in results.items():
        lines += [f"## {SECTIONS[name]}", "", f"Command: `{result['command']}` ({result['date']}, {result['device']}).",
                  "", *_module(name).markdown(result), ""]
    lines += ["![finetune](finetune.png)", ""]
    report.results(args.out, "finetune", {**_headline(results), "sections": results}, lines)

    import matplotlib.pyplot as plt

    # One row per section, up to three panels each.
    fig, axes = plt.subplots(len(results), 3, figsize=(15.6, 4.2 * len(results)), squeeze=False)
    for row, name in zip(axes, results):
        n = _module(name).PANELS
        _module(name).plot(list(row[:n]), results[name])
        for ax in row[n:]:
            ax.set_axis_off()
    fig.tight_layout()
    report.save_figure(fig, args.out / "finetune.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
