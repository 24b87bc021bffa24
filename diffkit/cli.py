"""The `diffkit` command: `demo` and `bench NAME`.

`bench` runs a benchmark script from the source checkout's benchmarks/ folder (benchmarks are not part of
the installed package); everything after the benchmark's name is passed to it.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = {"samplers": "sampler_accuracy.py"}


def _benchmarks_dir() -> Path | None:
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks").is_dir():
            return root / "benchmarks"
    return None


def bench(name: str, argv: list[str]) -> int:
    if name not in BENCHMARKS:
        raise SystemExit(f"diffkit bench: unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    folder = _benchmarks_dir()
    if folder is None:
        raise SystemExit("diffkit bench needs a diffkit source checkout: run it from the repository root "
                         "(git clone ... && pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", folder / BENCHMARKS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit", description="Diffusion and flow models under one roof.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the sampler stack on the built-in exact target and write a report")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="folder for the run (default: runs/)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fast", action="store_true", help="a seconds-long variant (fewer samples)")
    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ and write benchmarks/results/")
    b.add_argument("name", help=f"one of: {', '.join(BENCHMARKS)}")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from diffkit import demo as demo_job

        folder = demo_job.run(args.out, seed=args.seed, fast=args.fast)
        print(f"demo finished: {folder}/report.md (samples.png, error_vs_nfe.png, metrics.json)")
        return 0
    return bench(args.name, args.args)


if __name__ == "__main__":
    sys.exit(main())
