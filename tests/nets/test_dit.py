import pytest
import torch

from diffkit import paths
from diffkit.data import digits
from diffkit.nets.dit import DiT, sincos_2d

from _fit import check_labels, perturbed, overfit_losses  # tests/nets/_fit.py

TINY = dict(width=32, depth=2, heads=4)
SETUPS = [(paths.VPLinear(), "eps"), (paths.RectifiedFlow(), "velocity"), (paths.EDM(), "edm")]


@pytest.mark.parametrize("size,channels,patch", [(8, 1, 2), (16, 3, 4), (12, 2, 3), (8, 4, 1)])
def test_output_shape_and_exactly_zero_at_init(size, channels, patch):
    net = DiT(size, channels, patch_size=patch, num_classes=5, extra_scalars=1, **TINY)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.rand(2), torch.tensor([0, 5]), extra=torch.rand(2, 1))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: zero final layer, whatever the input


def test_every_block_starts_as_the_identity():
    net = DiT(8, 1, **TINY)
    h, e = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(h, e), h)


def test_patches_map_back_to_their_place():
    # Without blocks every token is processed alone, so one changed input pixel changes only its own patch.
    net = perturbed(DiT(8, 2, patch_size=2, width=32, depth=0, heads=4))
    x, c = torch.randn(1, 2, 8, 8), torch.rand(1)
    y = x.clone()
    y[0, 1, 5, 2] += 1.0
    changed = (net(y, c) - net(x, c)).abs().amax(dim=(0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


def test_position_embedding_is_2d_sincos():
    pos = sincos_2d(4, 8)  # (16, 8): channels 0-3 encode the row, 4-7 the column
    assert pos.shape == (16, 8)
    rows, cols = pos[:, :4].reshape(4, 4, 4), pos[:, 4:].reshape(4, 4, 4)
    assert torch.equal(rows[:, 0], rows[:, 3]) and torch.equal(cols[0], cols[3])
    torch.testing.assert_close(pos[5, 0], torch.tensor(1.0).sin())  # row 1, frequency 1
    torch.testing.assert_close(pos[6, 6], torch.tensor(2.0).cos())  # column 2, frequency 1


def test_labels_change_the_output_and_are_checked():
    check_labels(lambda **kw: DiT(8, 1, **TINY, **kw))


def test_extra_scalars_change_the_output_and_are_required():
    net = perturbed(DiT(8, 1, extra_scalars=1, **TINY))
    x, c, d = torch.randn(3, 1, 8, 8), torch.rand(3), torch.rand(3, 1)
    assert not torch.allclose(net(x, c, extra=d), net(x, c, extra=d / 2))
    with pytest.raises(ValueError, match=r"\(3, 1\) tensor"):
        net(x, c, extra=torch.rand(3))


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="divisible by patch_size 3.*choose a patch size"):
        DiT(8, 1, patch_size=3, **TINY)
    with pytest.raises(ValueError, match="divisible by heads"):
        DiT(8, 1, width=30, heads=4)
    net = DiT(8, 3, **TINY)
    with pytest.raises(ValueError, match=r"built for \(B, 3, 8, 8\).*in_channels and image_size"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"built for \(B, 3, 8, 8\)"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1))


def test_forward_is_one_graph():
    net = perturbed(DiT(8, 1, extra_scalars=1, **TINY)).eval()
    x, c, d = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2, 1)
    with torch.no_grad():
        out = torch.compile(net, fullgraph=True, backend="aot_eager")(x, c, extra=d)
    torch.testing.assert_close(out, net(x, c, extra=d), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path,kind", SETUPS, ids=[k for _, k in SETUPS])
def test_overfits_a_fixed_batch(path, kind):
    # 16 digits and fixed noise draws: the loss must fall by a large factor.
    torch.manual_seed(0)
    x0, labels = (t[:16] for t in digits("train"))
    net = DiT(8, 1, width=64, depth=2, heads=4, num_classes=10)
    losses = overfit_losses(net, path, kind, x0, labels, steps=100, lr=2e-3)
    assert losses[-1] < losses[0] / 10, f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
