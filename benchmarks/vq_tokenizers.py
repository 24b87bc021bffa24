"""Tokenizers: the same autoencoder with five bottlenecks, then latent vs pixel diffusion on the digits.

    diffkit bench tokenizers [--quick] [--out DIR] [--work DIR]

1. For the photos (32x32 patches, stride 16; data.photos) and the digits, one autoencoder (configs/photos-vq.yaml,
   configs/digits-vq.yaml: same encoder, decoder, latent grid and steps) is trained with each bottleneck: VQ with
   the straight-through estimator (`ste`), VQ with the rotation trick (`rotation`), SimVQ, FSQ (the paper's
   levels (8, 6, 5): 240 codes against the others' 256), and a continuous bottleneck as the no-quantization
   reference. Scored on the held-out split: PSNR, and for the photos PSNR and MS-SSIM on the whole held-out
   photographs, each coded tile by tile at the training patches' side and reassembled (coded whole, the
   GroupNorm statistics of a large image differ from a patch's and cost about 2 dB), codebook usage and perplexity
   on all held-out patches, and usage and perplexity over training on the first 512 held-out patches (those of
   the first held-out photo; metrics.jsonl).
2. Latent diffusion on the digits tokenizer with the best held-out PSNR among the four quantized ones, against
   pixel diffusion: the built-in recipe's MLP (configs/digits.yaml) on its latents (configs/digits-latent.yaml)
   and on the pixels, the same steps; classifier Fréchet distance of 1000 samples (heun, 35 NFE) to the
   held-out digits.

Writes tokenizers.json / .md / .png and tokenizers-reconstructions.png under --out (default benchmarks/results).
JSON keys: `photos_psnr`, `photos_usage` (dicts keyed ste, rotation, simvq, fsq), `digits_fd_latent`,
`digits_fd_pixel`, and the rest of the measurements. --work keeps the runs (a second call reuses them);
--quick is a seconds-long smoke test.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from diffkit import config as configs
from diffkit import data, generate, registry, run
from diffkit.compression import tiles, untile
from diffkit.eval import distortion
from diffkit.report import panels, results, save_figure, table

QUANTIZED = ("ste", "rotation", "simvq", "fsq")
BOTTLENECKS = (*QUANTIZED, "continuous")
ROOT = Path(__file__).resolve().parents[1]
FULL = {"photos": 1500, "digits": 1500, "diffusion": 3000, "samples": 1000}
QUICK = {"photos": 4, "digits": 4, "diffusion": 4, "samples": 16}


def _train(recipe: str, overrides: list[str], folder: Path) -> tuple[Path, float]:
    """Train (or find trained) a run; its training time from its own log, so a reused --work run keeps it."""
    cfg = configs.load(ROOT / "configs" / recipe, overrides)
    run.train_run(cfg, folder, progress=False)
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return folder, last["step"] * cfg.train.batch / last["samples_per_s"]


def _curves(folder: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {k: [r.get(k) for r in rows] for k in ("step", "usage", "perplexity", "held_out_psnr")}


def _whole_photos(model, side: int) -> tuple[list[float], list[float], list[torch.Tensor]]:
    """PSNR and MS-SSIM of each held-out photograph coded tile by tile at the training patches' side (as
    diffkit compress tiles an image), and the reassembled reconstructions."""
    psnrs, ssims, recons = [], [], []
    for name in data.PHOTOS["test"]:
        x = data.photo(name)
        parts = registry.get("tokenizer").reconstruct(model, tiles(x, side))[0]
        x_hat = untile(parts.cpu(), *x.shape[1:]).clamp(-1, 1)
        psnrs.append(distortion.psnr(x_hat[None], x[None]).item())
        ssims.append(distortion.ms_ssim(x_hat[None], x[None]).item())
        recons.append(x_hat)
    return psnrs, ssims, recons


def tokenizers(dataset: str, steps: int, work: Path, quick: bool) -> tuple[list[dict], dict]:
    rows, pictures = [], {}
    for b in BOTTLENECKS:
        overrides = [f"model.args.bottleneck={b}", f"train.steps={steps}", f"train.log_every={max(steps // 15, 1)}"]
        if quick:
            overrides += ["model.args.channels=8"] + (["data.stride=32"] if dataset == "photos" else [])
        folder, seconds = _train(f"{dataset}-vq.yaml", overrides, work / f"{dataset}-{b}")
        scores = run.reconstruction_run(folder)
        cfg, model, _, _ = run.load_run(folder)
        row = {"bottleneck": b, "codebook_size": model.net.codebook_size if b != "continuous" else None,
               "psnr": scores["psnr"], "usage": scores.get("usage"), "perplexity": scores.get("perplexity"),
               "dead_codes": scores.get("dead_codes"), "train_seconds": seconds, "curves": _curves(folder)}
        held = configs.dataset(cfg, "test")[0]
        if dataset == "photos":
            psnrs, ssims, recons = _whole_photos(model, held.shape[-1])
            row |= {"patch_psnr": row["psnr"], "psnr": sum(psnrs) / len(psnrs), "ms_ssim": sum(ssims) / len(ssims),
                    "per_photo": {"photo": list(data.PHOTOS["test"]), "psnr": psnrs, "ms_ssim": ssims}}
            pictures.setdefault("original", data.photo(data.PHOTOS["test"][1])[:, 96:224, 160:288])
            pictures[b] = recons[1][:, 96:224, 160:288]  # a 128-pixel crop of the coffee cup
        else:
            pictures.setdefault("original", held[:32])
            pictures[b] = registry.get(cfg.objective.name).reconstruct(model, held[:32])[0].cpu()
        rows.append(row)
    return rows, pictures


def diffusion(best: str, work: Path, steps: int, n: int) -> dict:
    common = [f"train.steps={steps}"]
    lat, lat_s = _train("digits-latent.yaml", [*common, f"data.tokenizer={json.dumps(str(work / f'digits-{best}'))}"],
                        work / f"digits-latent-{best}")
    pix, pix_s = _train("digits.yaml", common, work / "digits-pixel")
    out = {}
    for key, folder, seconds in (("latent", lat, lat_s), ("pixel", pix, pix_s)):
        scores = run.eval_run(folder, sampler=None, steps=None, n=n, seed=0, progress=False)
        cfg, model, shape, _ = run.load_run(folder)
        x, _ = generate.sample(model, cfg, shape, 32, progress=False)
        out[key] = {"digits_fd": scores["digits_fd"], "real_data_floor": scores["real_data_floor"]["digits_fd"],
                    "train_seconds": seconds, "samples": x}
    return out


def figure(path: Path, photo_rows: list[dict], digit_rows: list[dict]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in ((axes[0], "usage", "codebook usage"), (axes[1], "perplexity", "code perplexity")):
        for r in photo_rows:
            if r["bottleneck"] != "continuous":
                ax.plot(r["curves"]["step"], r["curves"][key], label=r["bottleneck"])
        ax.set_xlabel("step"), ax.grid(alpha=0.3)
        ax.set_title(f"photos: {label}, first 512 held-out patches", fontsize=9)
    axes[0].legend(fontsize=8)
    for rows, name in ((photo_rows, "photos (whole photos)"), (digit_rows, "digits")):
        axes[2].bar([f"{r['bottleneck']}\n{name.split()[0]}" for r in rows], [r["psnr"] for r in rows])
    axes[2].set_ylabel("held-out PSNR (dB)"), axes[2].tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench tokenizers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke test (4 steps per run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        photo_rows, photo_pics = tokenizers("photos", budget["photos"], work, args.quick)
        digit_rows, digit_pics = tokenizers("digits", budget["digits"], work, args.quick)
        best = max((r for r in digit_rows if r["bottleneck"] in QUANTIZED), key=lambda r: r["psnr"])["bottleneck"]
        diff = diffusion(best, work, budget["diffusion"], budget["samples"])
    args.out.mkdir(parents=True, exist_ok=True)
    by = lambda rows, key: {r["bottleneck"]: r[key] for r in rows if r["bottleneck"] in QUANTIZED}  # noqa: E731
    command = "diffkit bench tokenizers" + (" --quick" if args.quick else "")
    result = {
        "command": command, "torch": torch.__version__,
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "budget": budget,
        "photos_psnr": by(photo_rows, "psnr"), "photos_usage": by(photo_rows, "usage"),
        "photos_ms_ssim": by(photo_rows, "ms_ssim"), "photos_perplexity": by(photo_rows, "perplexity"),
        "photos_continuous": {k: photo_rows[-1][k] for k in ("psnr", "ms_ssim")},
        "digits_psnr": by(digit_rows, "psnr"), "digits_usage": by(digit_rows, "usage"),
        "digits_continuous_psnr": digit_rows[-1]["psnr"], "latent_tokenizer": best,
        "digits_fd_latent": diff["latent"]["digits_fd"], "digits_fd_pixel": diff["pixel"]["digits_fd"],
        "digits_fd_real_data_floor": diff["pixel"]["real_data_floor"],
        "diffusion_train_seconds": {k: diff[k]["train_seconds"] for k in ("latent", "pixel")},
        "photos": photo_rows, "digits": digit_rows,
    }
    figure(args.out / "tokenizers.png", photo_rows, digit_rows)
    panels(args.out / "tokenizers-reconstructions.png",
           {**{f"photo: {k}": v[None] for k, v in photo_pics.items()}, **{f"digits: {k}": v for k, v in digit_pics.items()},
            f"latent diffusion ({best})": diff["latent"]["samples"], "pixel diffusion": diff["pixel"]["samples"]},
           title="held-out reconstructions by bottleneck (a crop of a held-out photo; held-out digits), and digits "
                 "sampled by latent and pixel diffusion", cols=6)
    cols = ["bottleneck", "codebook_size", "psnr", "usage", "perplexity", "dead_codes", "train_seconds"]
    b = budget
    text = [
        "# Tokenizers: five bottlenecks, one autoencoder", "",
        f"Command: `{command}` on {result['device']}, torch {result['torch']}. Every run: the same encoder / decoder "
        f"and latent grid per dataset, {b['photos']} steps on the photos (batch 32, 32x32 patches at stride 16; latents "
        f"8x8x4), {b['digits']} on the digits (batch 128; latents 4x4x4). Codebooks of 256 (FSQ: levels (8, 6, 5), 240).",
        "", "## Photos (held out: " + ", ".join(data.PHOTOS["test"]) + ")", "",
        "PSNR and MS-SSIM on the whole held-out photographs, coded tile by tile as 32x32 patches and reassembled "
        "(mean over the three; `patch_psnr`: over the held-out patches); usage, perplexity and dead codes over all "
        "held-out 32x32 patches (stride 16). Training seconds are read from each run's log.", "",
        table(photo_rows, [*cols[:3], "ms_ssim", "patch_psnr", *cols[3:]]), "",
        "## Digits (held-out split)", "", table(digit_rows, cols), "",
        "## Latent vs pixel diffusion on the digits", "",
        f"The built-in MLP recipe, {b['diffusion']} steps each; on the latents of the `{best}` digits tokenizer (the best "
        f"held-out PSNR among the quantized ones) and on the pixels. Classifier Fréchet distance of {b['samples']} "
        "samples (heun, 35 NFE) to the held-out digits:", "",
        table([{"model": "latent", **diff["latent"]}, {"model": "pixel", **diff["pixel"]}],
              ["model", "digits_fd", "real_data_floor", "train_seconds"]), "",
        "![curves](tokenizers.png)", "", "![reconstructions](tokenizers-reconstructions.png)", ""]
    results(args.out, "tokenizers", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
