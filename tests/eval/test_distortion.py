import math

import pytest
import torch

from diffkit.eval import distortion


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.2, 0.02])[:, None, None, None]  # MSE 0.04 and 0.0004 on a range of 2
    torch.testing.assert_close(distortion.psnr(y, x), torch.tensor([20.0, 40.0], dtype=torch.float64))


def test_ms_ssim_is_wang_et_al_on_unit_range_images():
    from pytorch_msssim import ms_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 170, 180, generator=g) * 2 - 1
    light, heavy = ((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1) for s in (0.05, 0.3))
    got = distortion.ms_ssim(light, x)
    torch.testing.assert_close(got, ms_ssim((light + 1) / 2, (x + 1) / 2, data_range=1.0, size_average=False))
    assert (distortion.ms_ssim(heavy, x) < got).all() and distortion.ms_ssim(x, x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 161 pixels"):
        distortion.ms_ssim(x[..., :32, :32], x[..., :32, :32])
    assert math.isfinite(distortion.psnr(x, x).max().item())
