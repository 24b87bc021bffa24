"""Bad input, one line per case: what a user typed (or broke) and the first line of what diffkit answered.

Trains five seconds-long runs in a temporary folder (a checkerboard flow, a conditional and two unconditional digits
models, a digits tokenizer) and compresses one image with DDCM, then tries every case of the "runs that never lose work or mislead" review on them: data
loss, wrong results without a word, tracebacks instead of messages. A case passes when diffkit answers with a message, a warning
or a correct result, never a traceback.

    diffkit bench bad_input [--out DIR]

Writes bad_input.json / .md under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import yaml

from diffkit import cli, report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=40", "train.checkpoint_every=20", "train.warmup=5", "train.log_every=10", "model.args={width: 32, depth: 2}"]


def answer(fn) -> tuple[str, str]:
    """(outcome, first line) of calling fn: a message (SystemExit / error), a warning, or its own summary."""
    err_out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(err_out):
        warnings.simplefilter("always")
        try:
            result = fn()
        except SystemExit as err:
            if isinstance(err.code, int):  # argparse printed its message to stderr
                return "message", err_out.getvalue().strip().splitlines()[-1]
            return "message", str(err.code).splitlines()[0]
        except (ValueError, FileNotFoundError) as err:
            return "message", f"{type(err).__name__}: {str(err).splitlines()[0]}"
        except Exception:  # noqa: BLE001 (a traceback is what this script exists to find)
            return "TRACEBACK", traceback.format_exc().strip().splitlines()[-1]
    ours = [w for w in caught if w.category.__module__.startswith("diffkit") or "diffkit" in str(w.filename)]
    if ours:
        return "warning", str(ours[0].message).splitlines()[0]
    text = str(result).strip() if result not in (None, 0) else ""
    return "ok", text.splitlines()[0] if text else "ok"


def cases(tmp: Path) -> list[tuple[str, object]]:
    cb, digits = tmp / "cb", tmp / "digits"
    flow = ["train", str(ROOT / "configs" / "checkerboard-fm.yaml"), *TINY]
    cli.main([*flow, "--out", str(cb)])
    cli.main(["train", "data.conditional=true", *TINY, "--out", str(digits)])
    vq = ["train", str(ROOT / "configs" / "digits-vq.yaml"), "train.steps=2", "train.batch=16",
          "model.args.channels=8"]
    tok = tmp / "tok"
    cli.main([*vq, "--out", str(tok)])
    latent = ["train", str(ROOT / "configs" / "digits-latent.yaml"), *TINY]
    for seed in (0, 1):  # two unconditional digits models for DDCM (plain-1: another model)
        cli.main(["train", *TINY, f"train.seed={seed}", "--out", str(tmp / ("plain" if seed == 0 else "plain-1"))])
    from PIL import Image

    Image.new("L", (12, 9), 90).save(tmp / "img.png")
    cli.main(["compress", str(tmp / "plain"), str(tmp / "img.png"), "-o", str(tmp / "img.ddcm"), "--k", "16",
              "--steps", "3"])
    from diffkit import data, run

    def names(*calls):
        return lambda: "; ".join(run.sample_run(digits, sampler="dpmpp_2m", steps=4, n=n, seed=0, guidance=g, label=lab,
                                                progress=False).name for n, g, lab in calls)

    def copy(src: Path, name: str) -> Path:
        dst = tmp / name
        shutil.copytree(src, dst)
        return dst

    def corrupt_in_place():
        bad = copy(cb, "cb-corrupt")
        latest = sorted((bad / "checkpoints").iterdir())[-1] / "ema.safetensors"
        raw = bytearray(latest.read_bytes())
        raw[-64:] = b"\xff" * 64  # the header stays intact
        latest.write_bytes(bytes(raw))
        return run.sample_run(bad, sampler=None, steps=None, n=4, seed=0, progress=False).name

    def without_config_yaml():
        bare = copy(cb, "cb-bare")
        (bare / "config.yaml").unlink()
        return cli.main([*flow, "model.path=vp_linear", "model.prediction=eps", "--out", str(bare)])

    def config_yaml(text: bytes, name: str):
        def fn():
            broken = copy(cb, name)
            (broken / "config.yaml").write_bytes(text)
            cli.main([*flow, "--out", str(broken)])
            restored = "train" in (yaml.safe_load((broken / "config.yaml").read_text()) or {}).get("config", {})
            return "resumed under the checkpoint's config" + (", which replaced config.yaml" if restored else
                                                              "; config.yaml left as it was")
        return fn

    def resume(steps: int, name: str):
        def fn():
            again = copy(cb, name)
            cli.main([*flow, f"train.steps={steps}", "--out", str(again)])
            return next(line for line in (again / "report.md").read_text().splitlines() if "Run length" in line)
        return fn

    def interrupted():
        out = tmp / "cb-interrupted"
        proc = subprocess.Popen([sys.executable, "-m", "diffkit.cli", *flow[:2], "train.steps=100000",
                                 "train.checkpoint_every=100000", "model.args={width: 32, depth: 2}", "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").stat().st_size < 200:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        saved = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
        lines = [line for line in err.splitlines() if line.strip() and "training:" not in line]
        raise SystemExit(f"exit {proc.returncode}, checkpoints {saved}: {lines[-1] if lines else ''}")

    def folder_split():
        from PIL import Image

        images = tmp / "images"
        images.mkdir()
        for i in range(50):
            Image.new("L", (8, 8), i).save(images / f"{i:02d}.png")
        train, test = data.image_folder(images, 8, split="train")[0], data.image_folder(images, 8, split="test")[0]
        return f"folder of 50 images: {len(train)} train, {len(test)} held out (disjoint by path hash)"

    def folder_root_conditional():
        return cli.main(["train", "data.name=folder", f"data.source={tmp / 'images'}", "data.size=8", "data.channels=1",
                         "data.conditional=true", *TINY, "--out", str(tmp / "x")])

    def guidance_classes():
        from diffkit import generate

        got = []
        d = generate.denoiser(lambda x, s, c: got.append(c), range(20), guidance=2.0, label=None, n_classes=10,
                              device="cpu")
        with contextlib.suppress(Exception):
            d(__import__("torch").zeros(20, 1, 8, 8), __import__("torch").ones(20))
        return f"--guidance 2 without --label: classes {got[0][:20].tolist()}"

    def rk45_nan():
        import torch

        from diffkit import analytic, grids, samplers

        x = torch.zeros(4, 2, dtype=torch.float64)
        x[1, 0] = float("nan")
        return samplers.rk45(analytic.ring(), x, grids.karras(4, 0.002, 80.0))

    def ddcm_file(damage, name: str):
        def fn():
            broken = tmp / f"img-{name}.ddcm"
            broken.write_bytes(damage((tmp / "img.ddcm").read_bytes()))
            return cli.main(["decompress", str(cb.parent / "plain"), str(broken), "-o", str(tmp / f"{name}.png")])
        return fn

    def diffusers_folder(kind: str):
        def fn():
            import diffusers

            folder = tmp / f"pipe-{kind}"
            unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                         down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)
            scheduler = diffusers.DDPMScheduler(clip_sample=False, thresholding=kind == "thresholding")
            diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
                folder, safe_serialization=kind != "bin")
            if kind == "no-scheduler":
                shutil.rmtree(folder / "scheduler")
            return cli.main(["sample", str(folder), "--n", "2", "--steps", "2"])
        return fn

    def bad_yaml(text: str):
        def fn():
            path = tmp / "bad.yaml"
            path.write_text(text)
            return cli.main(["train", str(path), "--out", str(tmp / "never")])
        return fn

    return [
        # Data loss
        ("sample --label 3 --guidance 2, then --guidance 2, then plain", names((64, 2.0, 3), (64, 2.0, None), (64, None, None))),
        ("sample --n 8, then --n 9", names((8, None, None), (9, None, None))),
        (f"sample {cb.name} --out {cb.name} (the run folder itself)",
         lambda: cli.main(["sample", str(cb), "--n", "2", "--out", str(cb)])),
        ("Ctrl-C during diffkit train", interrupted),
        ("train sample.sampler=hune (a typo)", lambda: cli.main([*flow, "sample.sampler=hune", "--out", str(tmp / "hune")])),
        ("train again with train.lr=0.1 into the same folder", lambda: cli.main([*flow, "train.lr=0.1", "--out", str(cb)])),
        # Wrong results without a word
        ("sample a conditional model with --guidance 2 and no --label", guidance_classes),
        ("sample runs/cb --sampler heun --steps 18 (a flow's uniform-t grid from sigma 999)",
         lambda: cli.main(["sample", str(cb), "--sampler", "heun", "--steps", "18", "--n", "4"])),
        ("delete config.yaml, resume with model.path=vp_linear model.prediction=eps", without_config_yaml),
        ("checkpoint bytes overwritten in place (header intact), then sample", corrupt_in_place),
        ("sample --steps -3", lambda: cli.main(["sample", str(cb), "--steps", "-3"])),
        ("sample --steps 0", lambda: cli.main(["sample", str(cb), "--steps", "0"])),
        ("train train.steps=2.7", lambda: cli.main([*flow, "train.steps=2.7", "--out", str(tmp / "s27")])),
        ("train train.steps=0", lambda: cli.main([*flow, "train.steps=0", "--out", str(tmp / "s0")])),
        ("train train.steps=-5", lambda: cli.main([*flow, "train.steps=-5", "--out", str(tmp / "s-5")])),
        ("resume a 40-step run with train.steps=20", resume(20, "cb-shorter")),
        ("resume a 40-step run with train.steps=80", resume(80, "cb-longer")),
        ("image folder: held-out split", folder_split),
        ("data.conditional=true on a toy", lambda: cli.main([*flow, "data.conditional=true", "--out", str(tmp / "x")])),
        ("data.conditional=true on a folder with images at its root", folder_root_conditional),
        ("train.precision=fp16", lambda: cli.main([*flow, "train.precision=fp16", "--out", str(tmp / "x")])),
        # Tracebacks instead of messages
        ("a YAML syntax error in the config file", bad_yaml("train: [1, 2\n")),
        ("a YAML list at the top level", bad_yaml("- 1\n- 2\n")),
        ("train.steps.x=1", lambda: cli.main([*flow, "train.steps.x=1", "--out", str(tmp / "x")])),
        ("model.args.width=abc", lambda: cli.main([*flow, "model.args.width=abc", "--out", str(tmp / "x")])),
        *((f"train {o}", lambda o=o: cli.main([*flow, o, "--out", str(tmp / "x")]))
          for o in ("train.batch=0", "train.checkpoint_every=0", "train.log_every=0", "data.n=0")),
        ("data.name=folder without data.size", lambda: cli.main(["train", "data.name=folder",
                                                                  f"data.source={tmp / 'images'}", "--out", str(tmp / "x")])),
        ("a run's config.yaml of valid YAML but wrong content", config_yaml(b"hello: world\n", "cb-wrong")),
        ("a run's config.yaml of random bytes", config_yaml(os.urandom(64), "cb-bytes")),
        ("sample --n 0", lambda: cli.main(["sample", str(cb), "--n", "0"])),
        ("sample --n -5", lambda: cli.main(["sample", str(cb), "--n", "-5"])),
        ("sample --guidance 2 on an unconditional model", lambda: cli.main(["sample", str(cb), "--guidance", "2"])),
        ("sample a run folder that does not exist", lambda: cli.main(["sample", str(tmp / "nope")])),
        ("rk45 on a batch with one NaN row", rk45_nan),
        ("train model.net=unet (the default config's other nets)", lambda: cli.main(
            ["train", "model.net=unet", "train.steps=2", "train.batch=8", "train.checkpoint_every=2", "--out",
             str(tmp / "unet")])),
        ("eval --grid calibrated with no grid calibrated", lambda: cli.main(
            ["eval", str(cb), "--grid", "calibrated", "--sampler", "dpmpp_2m", "--steps", "5", "--n", "8"])),
        ("calibrate --sampler ddpm (stochastic)", lambda: cli.main(["calibrate", str(cb), "--sampler", "ddpm"])),
        # Tokenizers and latent runs
        ("train configs/digits-vq.yaml model.args.bottleneck=vqgan", lambda: cli.main(
            [*vq, "model.args.bottleneck=vqgan", "--out", str(tmp / "x")])),
        ("train configs/digits-vq.yaml with fsq and codebook_size 300", lambda: cli.main(
            [*vq, "model.args.bottleneck=fsq", "model.args.codebook_size=300", "--out", str(tmp / "x")])),
        ("sample a tokenizer run", lambda: cli.main(["sample", str(tok), "--n", "4"])),
        ("train a latent run whose data.tokenizer does not exist", lambda: cli.main(
            [*latent, f"data.tokenizer={tmp / 'nope'}", "--out", str(tmp / "x")])),
        ("train a latent run whose data.tokenizer is a diffusion run", lambda: cli.main(
            [*latent, f"data.tokenizer={digits}", "--out", str(tmp / "x")])),
        ("train a latent run on data its tokenizer was not trained on (checkerboard)", lambda: cli.main(
            [*latent, f"data.tokenizer={tok}", "data.name=checkerboard", "--out", str(tmp / "x")])),
        ("data.name=photos data.conditional=true", lambda: cli.main(
            ["train", "data.name=photos", "data.conditional=true", "--out", str(tmp / "x")])),
        # DDCM files
        ("decompress a truncated .ddcm file", ddcm_file(lambda b: b[:-9], "truncated")),
        ("decompress a .ddcm file with one bit flipped", ddcm_file(lambda b: b[:40] + bytes([b[40] ^ 4]) + b[41:],
                                                                    "flipped")),
        ("decompress a .ddcm file with another model", lambda: cli.main(
            ["decompress", str(tmp / "plain-1"), str(tmp / "img.ddcm"), "-o", str(tmp / "other.png")])),
        ("compress --k 100", lambda: cli.main(["compress", str(cb.parent / "plain"), str(tmp / "img.png"),
                                               "--k", "100"])),
        # diffusers folders
        ("sample a diffusers folder without a scheduler config", diffusers_folder("no-scheduler")),
        ("sample a diffusers folder with .bin weights only", diffusers_folder("bin")),
        ("sample a diffusers folder whose scheduler has thresholding: true", diffusers_folder("thresholding")),
        ("export a unet run --to diffusers", lambda: cli.main(["export", str(digits), str(tmp / "exp"),
                                                               "--to", "diffusers"])),
        # Training stack II: fine-tuning, MoE, FSDP
        ("finetune a run folder that does not exist", lambda: cli.main(
            ["finetune", str(tmp / "nope"), "--out", str(tmp / "ft")])),
        ("finetune --adapter dora", lambda: cli.main(["finetune", str(tmp / "plain"), "--adapter", "dora",
                                                      "--out", str(tmp / "ft")])),
        ("finetune --rank 0", lambda: cli.main(["finetune", str(tmp / "plain"), "--rank", "0",
                                                "--out", str(tmp / "ft")])),
        ("finetune --adapter pissa on a UNet run (convolutions; the run of the model.net=unet case)", lambda: cli.main(
            ["finetune", str(tmp / "unet"), "--adapter", "pissa", "--out", str(tmp / "ft")])),
        ("train configs/digits-dit-moe.yaml with model.args.moe={expert: 4} (a typo)", lambda: cli.main(
            ["train", str(ROOT / "configs" / "digits-dit-moe.yaml"), "--out", str(tmp / "x"),
             "model.args={patch_size: 2, width: 16, depth: 1, heads: 2, moe: {expert: 4}}"])),
        ("train train.parallel=fsdb", lambda: cli.main([*flow, "train.parallel=fsdb", "--out", str(tmp / "x")])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench bad_input", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            todo = cases(Path(tmp))
        for what, fn in todo:
            outcome, line = answer(fn)
            rows.append({"input": what, "outcome": outcome, "answer": line.replace(tmp, "$TMP")})
            print(f"{outcome:9s} {what}\n          -> {rows[-1]['answer']}", flush=True)
    tracebacks = sum(r["outcome"] == "TRACEBACK" for r in rows)
    text = ["# Bad input", "", "Command: `diffkit bench bad_input`. Each row: what was typed or broken, and the first "
            "line diffkit answered ($TMP: the temporary folder).", "",
            report.table(rows, ["input", "outcome", "answer"]), "",
            f"Tracebacks: {tracebacks} of {len(rows)} cases.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    report.atomic_write(args.out / "bad_input.json", json.dumps({"rows": rows, "tracebacks": tracebacks}, indent=1))
    report.atomic_write(args.out / "bad_input.md", "\n".join(text))
    return 1 if tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
