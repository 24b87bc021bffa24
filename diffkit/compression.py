"""The jobs behind `diffkit compress` and `diffkit decompress`: an image file <-> a .ddcm file, with a trained run.

The codec is diffkit.codecs.ddcm (the algorithm) and diffkit.codecs.bitstream (the file). An image larger than
the model's resolution is cut into tiles of the model's side, row-major from the top-left corner, after padding
its right and bottom edges by repeating their last pixels to a multiple of the tile side; the decoder crops
the padding away. Sides are bounded by the format (16384 pixels).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffkit import generate, registry, run
from diffkit.codecs import bitstream, ddcm
from diffkit.eval import distortion


def _model(run_dir: Path):
    """(config, denoiser, tile shape) of a run DDCM can use, else a ValueError that says why."""
    cfg, model, shape, n_classes = run.load_run(run_dir)
    method = registry.get(cfg.objective.name)
    if not method.generates or method.samplers:
        raise ValueError(f"{run_dir} is a {cfg.objective.name} run; DDCM needs a denoiser that the sigma-grid samplers "
                         "sample (a denoising or reflow run)")
    if cfg.data.tokenizer is not None:
        raise ValueError(f"{run_dir} is a latent run: DDCM here codes pixels with a pixel model")
    if n_classes:
        raise ValueError(f"{run_dir} is a conditional model: DDCM needs an unconditional one")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"{run_dir} models samples of shape {shape}; DDCM needs square images (C, S, S)")
    return cfg, model, shape


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as (channels, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1


def write_image(image: torch.Tensor, path: Path) -> None:
    """(C, H, W) in [-1, 1] to an image file, atomically (temp file + rename); the format from the suffix."""
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(tmp)
    os.replace(tmp, path)


def tiles(image: torch.Tensor, side: int) -> torch.Tensor:
    """(rows * cols, C, side, side): the image padded at its right and bottom edges by repeating them, cut row-major."""
    c, h, w = image.shape
    padded = F.pad(image[None], (0, -w % side, 0, -h % side), mode="replicate")[0]
    cut = padded.unfold(1, side, side).unfold(2, side, side)  # (C, rows, cols, side, side)
    return cut.permute(1, 2, 0, 3, 4).reshape(-1, c, side, side)


def untile(parts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `tiles`: (C, height, width) from its row-major tiles."""
    n, c, side, _ = parts.shape
    rows, cols = -(-height // side), -(-width // side)
    grid = parts.reshape(rows, cols, c, side, side).permute(2, 0, 3, 1, 4).reshape(c, rows * side, cols * side)
    return grid[:, :height, :width]


def steps_for_bpp(bpp: float, settings: ddcm.Settings, height: int, width: int, side: int) -> int:
    """The most sampler steps whose payload stays within `bpp` bits per pixel of the image (tiles padded)."""
    n_tiles = -(-height // side) * -(-width // side)
    steps = math.floor(bpp * height * width / (n_tiles * settings.bits_per_step)) + 1
    if steps < 2:
        raise ValueError(f"--bpp {bpp} is below the rate of one coded step ({n_tiles * settings.bits_per_step / (height * width):.4g} "
                         "bpp at this K and M): raise it or lower --k")
    return min(steps, 4096)


def compress(run_dir: Path, image_path: Path, out: Path, *, k: int = 256, steps: int | None = None,
             bpp: float | None = None, atoms: int = 1, coef_bits: int = 0, seed: int = 0,
             progress: bool = True) -> tuple[dict, torch.Tensor]:
    """Compress an image file into `out` (.ddcm) with a trained run; returns (rates and distortions, the
    reconstruction (C, H, W) that decompressing the file gives)."""
    cfg, model, shape = _model(run_dir)
    image = read_image(image_path, shape[0])
    _, h, w = image.shape
    if max(h, w) > bitstream.MAX_SIDE:
        raise ValueError(f"image {image_path} is {h}x{w}; the format takes sides up to {bitstream.MAX_SIDE}")
    if (steps is None) == (bpp is None):
        raise ValueError("give exactly one of --steps and --bpp")
    settings = ddcm.Settings(k=k, atoms=atoms, coef_bits=coef_bits, steps=steps or 2, seed=seed)
    if bpp is not None:
        settings = ddcm.Settings(k=k, atoms=atoms, coef_bits=coef_bits, seed=seed,
                                 steps=steps_for_bpp(bpp, settings, h, w, shape[-1]))
    sigmas = generate.grid(cfg, settings.steps)
    device = next(model.parameters()).device
    parts = tiles(image, shape[-1]).to(device)
    with tqdm(total=len(parts), desc="compressing tiles", unit="tile", disable=not progress) as bar:
        indices, levels, recon = ddcm.encode(model, parts, sigmas, settings, progress=bar.update)
    stream = bitstream.Stream(settings, h, w, shape[0], shape[-1], bitstream.fingerprint(model.state_dict()),
                              bitstream.grid_fingerprint(sigmas), indices, levels)
    data = bitstream.pack(stream)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    x_hat = untile(recon.cpu(), h, w)
    result = {"file": str(out), "bytes": len(data), "bpp": 8 * len(data) / (h * w),
              "payload_bpp": settings.bits_per_tile() * len(parts) / (h * w), "k": k, "atoms": atoms,
              "coef_bits": coef_bits, "steps": settings.steps, "tiles": len(parts),
              "psnr": distortion.psnr(x_hat[None], image[None]).item()}
    if min(h, w) >= distortion.MS_SSIM_MIN_SIDE:
        result["ms_ssim"] = distortion.ms_ssim(x_hat[None], image[None]).item()
    return result, x_hat


def decompress(run_dir: Path, file: Path, out: Path, *, progress: bool = True) -> torch.Tensor:
    """Decode a .ddcm file with the run it was made with into an image file `out`; returns the image."""
    cfg, model, shape = _model(run_dir)
    try:
        data = Path(file).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {file}: {err}") from None
    stream = bitstream.unpack(data)
    if stream.model != bitstream.fingerprint(model.state_dict()):
        raise bitstream.FormatError(f"{file} was compressed with another model (weights fingerprint "
                                    f"{stream.model.hex()}, this run's is {bitstream.fingerprint(model.state_dict()).hex()}): "
                                    "decode it with the run that compressed it")
    if (stream.channels, stream.tile) != (shape[0], shape[-1]):
        raise bitstream.FormatError(f"{file} holds {stream.channels}-channel tiles of {stream.tile} pixels; this run "
                                    f"models {shape[0]}-channel {shape[-1]}-pixel images")
    sigmas = generate.grid(cfg, stream.settings.steps)
    if stream.grid != bitstream.grid_fingerprint(sigmas):
        raise bitstream.FormatError(f"{file} was coded on another sigma grid than this run's {cfg.sample.grid} grid "
                                    f"of {stream.settings.steps} steps (was the run's sample section changed?)")
    device = next(model.parameters()).device
    n = len(stream.indices)
    with tqdm(total=n, desc="decompressing tiles", unit="tile", disable=not progress) as bar:
        parts = ddcm.decode(model, stream.indices, stream.levels, sigmas, stream.settings, tuple(shape),
                            device=device, progress=bar.update)
    image = untile(parts.cpu(), stream.height, stream.width)
    write_image(image, Path(out))
    return image

