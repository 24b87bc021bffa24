"""DDCM against JPEG and WebP: rate-distortion on the held-out photos, computed on the same pixels.

    diffkit bench codec [--run RUN] [--quick] [--out DIR] [--work DIR]

The model is a pixel diffusion run on the photos' 32x32 patches (configs/photos-unet.yaml; trained into
--work/photos-unet, with its time recorded, when --run is not given). The images are the 192x192 centre crops of
the held-out photographs (diffkit.data.PHOTOS["test"]: none of their patches was trained on). DDCM codes each crop
as 36 tiles at several (K, M, C, steps) settings; JPEG and WebP (Pillow) at a sweep of quality settings. Rates are
whole files (headers and checksums included) in bits per pixel; distortion is PSNR and MS-SSIM.

Headline, per photo then the median: the bits per pixel DDCM needs to reach the MS-SSIM that WebP reaches at its
lowest quality setting (read off DDCM's best-so-far curve, linear between settings), over WebP's bits per pixel
there: `ddcm_bpp_over_webp_at_webp_min_quality` (null when DDCM never reaches it); also `ddcm_min_bpp`,
`jpeg_min_bpp`, `webp_min_bpp`. Writes codec.json / .md / .png and codec-reconstructions.png.
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from diffkit import config as configs
from diffkit import data, run
from diffkit.compression import compress, write_image
from diffkit.eval import distortion
from diffkit.report import panels, results, save_figure, table

ROOT = Path(__file__).resolve().parents[1]
CROP = 192
# (K, atoms M, coefficient bits C, steps T): greedy at five rates, other codebook sizes, matching pursuit.
DDCM = [(256, 1, 0, 6), (256, 1, 0, 11), (256, 1, 0, 21), (256, 1, 0, 41), (256, 1, 0, 81), (16, 1, 0, 21),
        (4096, 1, 0, 11), (256, 2, 2, 11), (256, 3, 2, 11)]
JPEG = [1, 5, 10, 20, 30, 50, 70, 90]
WEBP = [0, 5, 10, 20, 30, 50, 70, 90]
QUICK = {"crop": 176, "ddcm": [(16, 1, 0, 3), (16, 2, 1, 3)], "jpeg": [1, 50], "webp": [0, 50]}


def _crop(image: torch.Tensor, side: int) -> torch.Tensor:
    _, h, w = image.shape
    top, left = (h - side) // 2, (w - side) // 2
    return image[:, top:top + side, left:left + side]


def _scores(x_hat: torch.Tensor, x: torch.Tensor) -> dict:
    return {"psnr": distortion.psnr(x_hat[None], x[None]).item(), "ms_ssim": distortion.ms_ssim(x_hat[None], x[None]).item()}


def pillow(image: torch.Tensor, fmt: str, quality: int) -> tuple[dict, torch.Tensor]:
    """Encode with Pillow's JPEG or WebP at `quality`; (rate and distortion, the decoded image)."""
    arr = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    x_hat = torch.from_numpy(decoded.copy()).permute(2, 0, 1) / 127.5 - 1
    h, w = arr.shape[:2]
    return {"quality": quality, "bytes": len(buf.getvalue()), "bpp": 8 * len(buf.getvalue()) / (h * w),
            **_scores(x_hat, image)}, x_hat


def bpp_to_reach(points: list[dict], target: float) -> float | None:
    """The rate at which a codec's best-so-far MS-SSIM first reaches `target` (linear between its settings)."""
    best, prev = -1.0, None
    for p in sorted(points, key=lambda p: p["bpp"]):
        if p["ms_ssim"] <= best:
            continue
        if p["ms_ssim"] >= target:
            if prev is None:
                return p["bpp"]
            frac = (target - prev["ms_ssim"]) / (p["ms_ssim"] - prev["ms_ssim"])
            return prev["bpp"] + frac * (p["bpp"] - prev["bpp"])
        best, prev = p["ms_ssim"], p
    return None


def _model_run(args, work: Path) -> tuple[Path, dict]:
    if args.run is not None:
        return args.run, {"run": str(args.run)}
    folder = work / "photos-unet"
    t0 = time.perf_counter()
    run.train_run(configs.load(ROOT / "configs" / "photos-unet.yaml"), folder, progress=True)
    return folder, {"run": "configs/photos-unet.yaml", "train_command": f"diffkit train configs/photos-unet.yaml "
                    f"--out {folder}", "train_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench codec", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained photos run (default: train configs/photos-unet.yaml)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: two settings per codec, tiny crops")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, help="where the model and the .ddcm files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    crop, ddcm_settings = (QUICK["crop"], QUICK["ddcm"]) if args.quick else (CROP, DDCM)
    jpeg_q, webp_q = (QUICK["jpeg"], QUICK["webp"]) if args.quick else (JPEG, WEBP)
    rows, shown = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder, model_facts = _model_run(args, work)
        for name in data.PHOTOS["test"]:
            image = _crop(data.photo(name), crop)
            write_image(image, work / f"{name}.png")  # 8-bit, as the image codecs and DDCM's input see it
            image = ((image + 1) * 127.5).round() / 127.5 - 1
            for k, m, c, steps in ddcm_settings:
                t0 = time.perf_counter()
                res, x_hat = compress(folder, work / f"{name}.png", work / f"{name}-{k}-{m}-{c}-{steps}.ddcm", k=k,
                                      steps=steps, atoms=m, coef_bits=c, progress=False)
                rows.append({"photo": name, "codec": "DDCM", "setting": f"K={k} M={m} C={c} T={steps}", "bpp": res["bpp"],
                             "payload_bpp": res["payload_bpp"], "psnr": res["psnr"], "ms_ssim": res["ms_ssim"],
                             "seconds": time.perf_counter() - t0})
                shown[(name, "DDCM", rows[-1]["setting"])] = x_hat
            for fmt, qualities in (("JPEG", jpeg_q), ("WebP", webp_q)):
                for q in qualities:
                    res, x_hat = pillow(image, fmt, q)
                    rows.append({"photo": name, "codec": fmt, "setting": f"quality {q}", **res})
                    shown[(name, fmt, rows[-1]["setting"])] = x_hat
            shown[(name, "original", "")] = image
    headline = []
    for name in data.PHOTOS["test"]:
        mine = [r for r in rows if r["photo"] == name]
        webp_min = min((r for r in mine if r["codec"] == "WebP"), key=lambda r: r["quality"])
        need = bpp_to_reach([r for r in mine if r["codec"] == "DDCM"], webp_min["ms_ssim"])
        headline.append({"photo": name, "webp_min_quality_ms_ssim": webp_min["ms_ssim"], "webp_bpp": webp_min["bpp"],
                         "ddcm_bpp_needed": need, "ratio": None if need is None else need / webp_min["bpp"]})
    ratios = [h["ratio"] for h in headline]
    minimum = {codec: min(r["bpp"] for r in rows if r["codec"] == codec) for codec in ("DDCM", "JPEG", "WebP")}
    command = "diffkit bench codec" + (" --quick" if args.quick else "") + (f" --run {args.run}" if args.run else "")
    result = {"command": command, "torch": torch.__version__, "device": f"CPU ({platform.machine()}, "
              f"{torch.get_num_threads()} threads)", "model": model_facts, "crop": crop, "photos": list(data.PHOTOS["test"]),
              "ddcm_bpp_over_webp_at_webp_min_quality": None if None in ratios else statistics.median(ratios),
              "ddcm_min_bpp": minimum["DDCM"], "jpeg_min_bpp": minimum["JPEG"], "webp_min_bpp": minimum["WebP"],
              "headline_per_photo": headline, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    _curves(args.out / "codec.png", rows)
    _pictures(args.out / "codec-reconstructions.png", rows, shown, data.PHOTOS["test"][1])
    text = ["# DDCM vs JPEG vs WebP on the held-out photos", "",
            f"Command: `{command}` on {result['device']}, torch {result['torch']}. Model: {model_facts}. Images: the "
            f"{crop}x{crop} centre crops of {', '.join(data.PHOTOS['test'])} (held out). Rates are whole files in "
            "bits per pixel; DDCM's payload alone is `payload_bpp`.", "",
            _headline_line(result, rows) + f" Lowest rates: DDCM {minimum['DDCM']:.4f}, JPEG {minimum['JPEG']:.4f}, "
            f"WebP {minimum['WebP']:.4f} bpp.", "",
            table(headline, ["photo", "webp_min_quality_ms_ssim", "webp_bpp", "ddcm_bpp_needed", "ratio"]), "",
            table(rows, ["photo", "codec", "setting", "bpp", "payload_bpp", "psnr", "ms_ssim", "seconds"]), "",
            "![rate-distortion](codec.png)", "", "![reconstructions](codec-reconstructions.png)", ""]
    results(args.out, "codec", result, text)
    return 0


def _headline_line(result: dict, rows: list[dict]) -> str:
    ratio = result["ddcm_bpp_over_webp_at_webp_min_quality"]
    if ratio is not None:
        return (f"**DDCM needs {ratio:.3g}x WebP's bits per pixel to reach the MS-SSIM of WebP at its lowest quality** "
                "(median over photos; per photo below).")
    missed = [h["photo"] for h in result["headline_per_photo"] if h["ratio"] is None]
    top = max(r["bpp"] for r in rows if r["codec"] == "DDCM")
    return (f"**DDCM does not reach the MS-SSIM of WebP at its lowest quality on {', '.join(missed)} within its "
            f"settings (up to {top:.3g} bpp)**, so the median ratio is undefined (null); per photo below.")


def _curves(path: Path, rows: list[dict]) -> None:
    """Rate vs PSNR and vs MS-SSIM, the mean over photos of each codec setting."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for codec, style in (("DDCM", "o-"), ("JPEG", "s-"), ("WebP", "^-")):
        settings = sorted({r["setting"] for r in rows if r["codec"] == codec},
                          key=lambda s: np.mean([r["bpp"] for r in rows if r["setting"] == s and r["codec"] == codec]))
        if codec == "DDCM":  # the greedy settings of K=256 make the curve; the others are points
            settings = [s for s in settings if s.startswith("K=256 M=1")] or settings
        for ax, key in zip(axes, ("psnr", "ms_ssim")):
            pts = [(np.mean([r["bpp"] for r in rows if r["setting"] == s and r["codec"] == codec]),
                    np.mean([r[key] for r in rows if r["setting"] == s and r["codec"] == codec])) for s in settings]
            ax.plot(*zip(*pts), style, label=codec + (" (K=256, greedy)" if codec == "DDCM" else ""), ms=4)
    for r_set in sorted({r["setting"] for r in rows if r["codec"] == "DDCM" and not r["setting"].startswith("K=256 M=1")}):
        for ax, key in zip(axes, ("psnr", "ms_ssim")):
            sel = [r for r in rows if r["setting"] == r_set]
            ax.plot(np.mean([r["bpp"] for r in sel]), np.mean([r[key] for r in sel]), "x", label=f"DDCM {r_set}")
    for ax, label in zip(axes, ("PSNR (dB)", "MS-SSIM")):
        ax.set_xscale("log"), ax.set_xlabel("bits per pixel (whole file)"), ax.set_ylabel(label), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _pictures(path: Path, rows: list[dict], shown: dict, photo: str) -> None:
    """One photo, one row per DDCM setting of the three lowest rates: the original, DDCM, and the JPEG and WebP
    settings nearest its rate."""
    mine = [r for r in rows if r["photo"] == photo]
    sets = {}
    for i, r in enumerate(sorted((r for r in mine if r["codec"] == "DDCM"), key=lambda r: r["bpp"])[:3]):
        sets["original" + " " * i] = shown[(photo, "original", "")]  # distinct keys, the same title
        sets[f"DDCM {r['setting']}: {r['bpp']:.3f} bpp, MS-SSIM {r['ms_ssim']:.3f}"] = shown[(photo, "DDCM", r["setting"])]
        for codec in ("JPEG", "WebP"):
            near = min((q for q in mine if q["codec"] == codec), key=lambda q: abs(np.log(q["bpp"] / r["bpp"])))
            sets[f"{codec} {near['setting']}: {near['bpp']:.3f} bpp, MS-SSIM {near['ms_ssim']:.3f}" + " " * i] = \
                shown[(photo, codec, near["setting"])]
    panels(path, {k: v[None] for k, v in sets.items()}, title=f"{photo}: codecs at matched rates", cols=4)


if __name__ == "__main__":
    sys.exit(main())
