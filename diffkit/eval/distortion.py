"""Distortion between images and their reconstructions: PSNR and MS-SSIM, per image.

MS-SSIM (Wang, Simoncelli & Bovik 2003: five scales, an 11-pixel Gaussian window) comes from `pytorch-msssim`, a
maintained implementation. Its four halvings need images wider than 160 pixels: smaller ones (32-pixel patches,
8-pixel digits) have no MS-SSIM, and asking is an error rather than a number from some other definition.
"""
from __future__ import annotations

import torch
from torch import Tensor

MS_SSIM_MIN_SIDE = 161


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB, (B,), of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (x.double() - y.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-20))


def ms_ssim(x: Tensor, y: Tensor) -> Tensor:
    """MS-SSIM, (B,), of images (B, C, H, W) in [-1, 1] with H, W >= 161."""
    try:
        from pytorch_msssim import ms_ssim as _ms_ssim
    except ImportError as err:
        raise ImportError("MS-SSIM needs pytorch-msssim: pip install 'diffkit[tokenizers]'") from err
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} pixels a side (five scales of an "
                         f"11-pixel window); got {tuple(x.shape[-2:])}")
    return _ms_ssim((x.float() + 1) / 2, (y.float() + 1) / 2, data_range=1.0, size_average=False)
