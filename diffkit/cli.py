"""The `diffkit` command: demo, train, sample, eval, calibrate, compress, decompress, export, tune, bench, and the
commands that derive new runs from trained ones (diffkit.registry: reflow, distill, finetune). sample and eval also
take a diffusers folder.

`bench` runs a benchmark script from the source checkout's benchmarks/ folder (benchmarks are not part of
the installed package); everything after the benchmark's name is passed to it. `train` under torchrun
joins the process group (gloo on CPU, nccl on CUDA) and trains with DDP.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

if not sys.stderr.isatty():  # a log file: progress bars update every 30 s, not many times a second. Set before
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # anything imports tqdm, which reads its environment then.

from diffkit import registry  # noqa: E402
from diffkit.adapters import MissingPeft  # noqa: E402
from diffkit.grids import NAMED as GRIDS  # noqa: E402
from diffkit.nets.diffusers_unet import MissingDiffusers  # noqa: E402

BENCHMARKS = {"samplers": "sampler_accuracy.py", "digits": "digits_quality.py", "onestep": "onestep.py",
              "throughput": "throughput.py", "likelihood": "likelihood.py", "bad_input": "bad_input.py",
              "tokenizers": "vq_tokenizers.py", "codec": "codec.py", "optimizers": "optimizers.py",
              "interop": "interop.py", "finetune": "finetune.py",
              "memory": "memory.py"}


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


def _train(args) -> int:
    import torch
    import torch.distributed as dist

    from diffkit import config, run

    if args.config is not None and "=" in args.config and not Path(args.config).exists():  # only overrides given
        args.config, args.overrides = None, [args.config, *args.overrides]
    cfg = config.load(args.config, args.overrides)
    out = args.out or Path("runs") / Path(args.config or "default").stem
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    folder = run.train_run(cfg, out)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"trained: {folder}/report.md")
    return 0


def _positive(text: str) -> int:
    """argparse type: a positive integer (a count of samples or steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit", description="Diffusion and flow models under one roof.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the built-in digits default on CPU, sample it, write a report")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="parent folder for the run (default: runs/)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fast", action="store_true", help="a seconds-long variant")

    tr = sub.add_parser("train", help="train from a YAML config (configs/*.yaml), with key=value overrides")
    tr.add_argument("config", nargs="?", help="YAML file; omit for the built-in digits default")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4 model.net=unet")
    tr.add_argument("--out", type=Path, help="run folder (default: runs/<config name>); resumes if it exists")

    for name, text in (("sample", "sample a trained run"), ("eval", "sample a run and score it against held-out data")):
        p = sub.add_parser(name, help=text + " (or a diffusers pipeline folder)")
        p.add_argument("run", type=Path, help="run folder, or a diffusers pipeline / model folder (model_index.json "
                                              "or config.json, with its scheduler config)")
        p.add_argument("--sampler", help="default: the run's config")
        p.add_argument("--steps", type=_positive, help="grid steps (default: the run's config)")
        p.add_argument("--grid", choices=[*GRIDS, "calibrated"],
                       help="sigma grid (default: the run's config); calibrated: the grid `diffkit calibrate` "
                            "stored for this sampler and step count (and guidance)")
        p.add_argument("--n", type=_positive, default=64 if name == "sample" else 1000, help="number of samples")
        p.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i)")
        p.add_argument("--fast", action="store_true",
                       help="run the net compiled, in bf16 and as one CUDA graph per call (for GPUs: the first "
                            "batch compiles, then sampling is several times faster; samples differ at bf16 precision)")
        p.add_argument("--merge", action="store_true",
                       help="a fine-tuned run: merge its adapters into the weights first (the same samples up to "
                            "float error)")
        if name == "eval":
            p.add_argument("--likelihood", action="store_true",
                           help="score the held-out split's bits/dim under the model instead of sampling (flows "
                                "exactly, denoisers by their probability-flow ODE); --n caps the held-out samples")
            p.add_argument("--data", help="for a diffusers folder: the data to score against (digits or a toy name; "
                                          "a run knows its own)")
        if name == "sample":
            p.add_argument("--guidance", type=float, help="classifier-free guidance w (1 = plain conditional); "
                                                          "without --label the classes are sampled evenly")
            p.add_argument("--label", type=int, help="class to sample (conditional runs)")
            p.add_argument("--out", type=Path, help="output folder (default: inside the run)")

    c = sub.add_parser("calibrate", help="fit a sigma grid to a trained run for one sampler and step count "
                                         "(then sample with --grid calibrated)")
    c.add_argument("run", type=Path, help="run folder")
    c.add_argument("--sampler", help="a deterministic fixed-grid sampler (default: the run's config)")
    c.add_argument("--steps", type=_positive, help="grid steps (default: the run's config)")
    c.add_argument("--n", type=_positive, default=256, help="calibration draws (default 256)")
    c.add_argument("--seed", type=int, default=0, help="calibration noise seed (its draws never coincide with "
                                                       "any sample's)")
    c.add_argument("--guidance", type=float, help="calibrate for sampling under this guidance scale")
    c.add_argument("--label", type=int, help="calibrate for sampling this class")

    co = sub.add_parser("compress", help="compress an image into a .ddcm file with a trained diffusion run (DDCM)")
    co.add_argument("run", type=Path, help="an unconditional pixel denoising run (e.g. configs/photos-unet.yaml)")
    co.add_argument("image", type=Path, help="the image file (PNG, JPEG, ...)")
    co.add_argument("-o", "--out", type=Path, help="the .ddcm file (default: the image's name with .ddcm)")
    co.add_argument("--k", type=int, default=256, help="codebook size, a power of two (default 256)")
    rate = co.add_mutually_exclusive_group()
    rate.add_argument("--steps", type=_positive, help="sampler steps; T - 1 of them are coded (default 20)")
    rate.add_argument("--bpp", type=float, help="the rate to stay within, in bits per pixel (sets --steps)")
    co.add_argument("--atoms", type=_positive, default=1, help="matching-pursuit atoms per step, M (default 1)")
    co.add_argument("--coef-bits", type=int, default=0, help="bits per mixing coefficient, C (with --atoms > 1)")
    co.add_argument("--seed", type=int, default=0, help="codebook seed (stored in the file)")
    de = sub.add_parser("decompress", help="decode a .ddcm file with the run that compressed it")
    de.add_argument("run", type=Path, help="the run the file was compressed with")
    de.add_argument("file", type=Path, help="the .ddcm file")
    de.add_argument("-o", "--out", type=Path, help="the image file (default: the file's name with .png)")
    e = sub.add_parser("export", help="save a trained run's EMA model for use elsewhere (diffusers: runs with "
                                      "model.net: diffusers_unet2d on a VP path or rectified flow; diffkit: any run)")
    e.add_argument("run", type=Path, help="run folder")
    e.add_argument("out", type=Path, help="the new folder (must not exist)")
    e.add_argument("--to", required=True, choices=["diffusers", "diffkit"],
                   help="diffusers: a DDPMPipeline folder that DDPMPipeline/DDIMPipeline.from_pretrained load; "
                        "diffkit: weights.safetensors + diffkit.yaml (diffkit.export.load_export reads it)")

    # Commands that make a new run from a trained one (`diffkit reflow`, `distill`, `finetune`): one each.
    for command, method in registry.commands().items():
        p = sub.add_parser(command, help=method.command_help)
        p.add_argument("run", type=Path, help="the trained run to start from")
        p.add_argument("overrides", nargs="*", help="section.key=value for the new run, e.g. train.steps=2000")
        p.add_argument("--out", type=Path, required=True, help="the new run's folder; resumes if it exists")
        for o in method.options:
            p.add_argument(f"--{o.name}", type=o.type, default=o.default, help=o.help)

    t = sub.add_parser("tune", help="measure a trained run's gradient noise scale and suggest the learning rate for "
                                    "other batch sizes")
    t.add_argument("what", choices=["batch"])
    t.add_argument("run", type=Path, help="run folder")
    t.add_argument("--batch", type=_positive, nargs="+", help="batch sizes to suggest a learning rate for "
                                                             "(default: half, 2x and 4x the run's)")
    t.add_argument("--pairs", type=_positive, default=50, help="gradient pairs averaged (default 50)")
    t.add_argument("--small", type=_positive, default=16, help="the small batch of each pair (default 16)")
    t.add_argument("--big", type=_positive, default=256, help="the big batch of each pair (default 256)")
    t.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ and write benchmarks/results/")
    b.add_argument("name", help=f"one of: {', '.join(BENCHMARKS)}")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    # Overrides may also follow the options (`diffkit reflow RUN --out D train.steps=100`).
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        if args.command == "demo":
            from diffkit import demo as demo_job

            folder = demo_job.main(args.out, seed=args.seed, fast=args.fast)
            print(f"demo finished: {folder}/report.md (samples.png, loss_curve.png, metrics.json)")
            return 0
        if args.command == "train":
            return _train(args)
        if args.command == "sample":
            from diffkit import run

            folder = run.sample_run(args.run, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                                    guidance=args.guidance, label=args.label, out=args.out, grid=args.grid,
                                    fast=args.fast, merge=args.merge)
            print(f"samples: {folder}/samples.png")
            return 0
        if args.command == "eval":
            from diffkit import run

            if args.likelihood:
                result = run.likelihood_run(args.run, n=args.n, seed=args.seed)
            else:
                result = run.eval_run(args.run, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                                      grid=args.grid, fast=args.fast, data=args.data, merge=args.merge)
            print(json.dumps(result, indent=2))
            return 0
        if args.command == "calibrate":
            from diffkit import run

            record = run.calibrate_run(args.run, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                                       guidance=args.guidance, label=args.label)
            how = (f", label {record['label']}" if record["label"] is not None else "") + \
                (f", guidance {record['guidance']:g}" if record["guidance"] is not None else "")
            print(f"calibrated {record['sampler']} at {record['steps']} steps{how} in {record['seconds']:.0f} s: median "
                  f"error {record['calibration_error']:.4g} (the config's {record['config_grid']} grid: "
                  f"{record['config_grid_error']:.4g}); sample with --grid calibrated --sampler {record['sampler']} "
                  f"--steps {record['steps']}" + how.replace(", label ", " --label ").replace(", guidance ", " --guidance "))
            return 0
        if args.command == "tune":
            from diffkit import tune

            result = tune.batch(args.run, batches=args.batch, small=args.small, big=args.big, pairs=args.pairs,
                                seed=args.seed)
            print(tune.describe(result))
            return 0
        if args.command == "compress":
            from diffkit import compression

            out = args.out or args.image.with_suffix(".ddcm")
            steps = args.steps if args.steps or args.bpp else 20
            result, _ = compression.compress(args.run, args.image, out, k=args.k, steps=steps, bpp=args.bpp,
                                             atoms=args.atoms, coef_bits=args.coef_bits, seed=args.seed)
            ssim = f", MS-SSIM {result['ms_ssim']:.4f}" if "ms_ssim" in result else ""
            print(f"{out}: {result['bytes']} bytes, {result['bpp']:.4f} bits per pixel ({result['steps']} steps, "
                  f"K {args.k}, {result['tiles']} tiles); PSNR {result['psnr']:.2f} dB{ssim}")
            return 0
        if args.command == "decompress":
            from diffkit import compression

            out = args.out or args.file.with_suffix(".png")
            image = compression.decompress(args.run, args.file, out)
            print(f"{out}: {image.shape[2]}x{image.shape[1]} pixels")
            return 0
        if args.command == "export":
            from diffkit import export

            folder = export.export_run(args.run, args.to, args.out)
            how = f"DDPMPipeline.from_pretrained({str(folder)!r})" if args.to == "diffusers" else \
                f"diffkit.export.load_export({str(folder)!r})"
            print(f"exported: {folder} (load it with {how})")
            return 0
        if args.command in registry.commands():
            from diffkit import run

            method = registry.commands()[args.command]
            folder = run.derive_run(method, args.run, args.out, overrides=args.overrides,
                                    options={o.name: getattr(args, o.name) for o in method.options})
            print(f"{args.command}: {folder}/report.md")
            return 0
        return bench(args.name, args.args)
    except (ValueError, FileNotFoundError, FileExistsError, MissingDiffusers, MissingPeft) as err:
        raise SystemExit(f"diffkit {args.command}: {err}") from err
    except KeyboardInterrupt as err:  # Ctrl-C: one line (training's says which step it saved), status 130
        print(f"diffkit {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
