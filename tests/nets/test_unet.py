import shutil

import pytest
import torch

from diffkit import paths
from diffkit.data import digits
from diffkit.nets.unet import UNet

from _fit import check_labels, perturbed, overfit_losses  # tests/nets/_fit.py

TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
            num_groups=4, head_channels=8, dropout=0.0)
SETUPS = [(paths.VPLinear(), "eps"), (paths.RectifiedFlow(), "velocity"), (paths.EDM(), "edm")]


@pytest.mark.parametrize("cin,cout,h,w", [(1, None, 8, 8), (3, None, 16, 16), (2, 5, 8, 16)])
def test_output_shape_and_zero_at_init(cin, cout, h, w):
    net = UNet(cin, cout, **TINY)
    x = torch.randn(2, cin, h, w)
    out = net(x, torch.rand(2))
    assert out.shape == (2, cout or cin, h, w)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised last layers: F = 0 exactly
    assert perturbed(net)(x, torch.rand(2)).abs().min() > 0


def test_labels_change_the_output_and_are_checked():
    check_labels(lambda **kw: UNet(1, **TINY, **kw))


def test_extra_scalars_change_the_output_and_are_required():
    net = perturbed(UNet(1, extra_scalars=2, **TINY))
    x, c = torch.randn(3, 1, 8, 8), torch.rand(3)
    d = torch.rand(3, 2)
    assert not torch.allclose(net(x, c, extra=d), net(x, c, extra=d / 2))
    with pytest.raises(ValueError, match=r"\(3, 2\) tensor"):
        net(x, c)
    with pytest.raises(ValueError, match="no extra scalars"):
        UNet(1, **TINY)(x, c, extra=d)


def test_bad_input_says_what_to_do():
    net = UNet(3, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*check in_channels"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 3, 8, 9), torch.rand(1))
    with pytest.raises(ValueError, match="pad the images"):
        UNet(3, **{**TINY, "image_size": 9, "attn_resolutions": ()})
    with pytest.raises(ValueError, match=r"among the level resolutions \(8, 4\)"):
        UNet(3, **{**TINY, "attn_resolutions": (16,)})
    with pytest.raises(ValueError, match="num_groups"):
        UNet(3, **{**TINY, "num_groups": 5})


def test_channels_last_gives_the_same_output():
    net = perturbed(UNet(3, **TINY)).eval()
    x, c = torch.randn(2, 3, 16, 16), torch.rand(2)
    ref = net(x, c)
    out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), c)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path,kind", SETUPS, ids=[k for _, k in SETUPS])
def test_overfits_a_fixed_batch(path, kind):
    # 16 digits and fixed noise draws: the loss must fall by a large factor.
    torch.manual_seed(0)
    x0, labels = (t[:16] for t in digits("train"))
    losses = overfit_losses(UNet(1, num_classes=10, **TINY), path, kind, x0, labels, steps=100, lr=3e-3)
    assert losses[-1] < losses[0] / 10, f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_forward_is_one_graph():
    # fullgraph=True fails on any graph break: no data-dependent Python control flow, no .item().
    net = perturbed(UNet(1, extra_scalars=1, **TINY)).eval()
    x, c, d = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2, 1)
    with torch.no_grad():
        out = torch.compile(net, fullgraph=True, backend="aot_eager")(x, c, extra=d)
    torch.testing.assert_close(out, net(x, c, extra=d), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a cold inductor compile takes 30 s to minutes on 2 CPU cores
def test_inductor_compiled_matches_eager():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler; none found")
    net = perturbed(UNet(1, num_classes=3, extra_scalars=1, **TINY)).eval()
    x, c, y, d = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 3]), torch.rand(2, 1)
    with torch.no_grad():
        out = torch.compile(net)(x, c, y, extra=d)
    torch.testing.assert_close(out, net(x, c, y, extra=d), rtol=1e-4, atol=1e-5)


def test_parameter_count_matches_diffusers_ddpm_cifar10():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    ours = UNet(3, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), image_size=32)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert abs(n_ours - n_ref) <= 0.05 * n_ref, f"ours {n_ours:,} vs diffusers {n_ref:,}"
