import pytest
import torch

from diffkit import grids, samplers
from diffkit.samplers.noise import GaussianNoise, GeneratorNoise


def test_same_seed_same_samples_whatever_the_batch(ring_gmm):
    sigmas = grids.karras(15, 0.002, 80.0)

    def draw(indices):
        noise = GaussianNoise(seed=3, indices=indices)
        x = 80.0 * noise.sample((2,), torch.float64)
        return x, samplers.ddpm(ring_gmm, x, sigmas, noise=noise)

    starts, outs = zip(*[draw(range(a, min(a + b, 64))) for b in (1, 7, 64) for a in range(0, 64, b)])
    by_size = {}
    for b, (x, out) in zip([1] * 64 + [7] * 10 + [64], zip(starts, outs)):
        by_size.setdefault(b, ([], []))
        by_size[b][0].append(x)
        by_size[b][1].append(out)
    full_x, full_out = (torch.cat(v) for v in by_size[64])
    for b in (1, 7):
        x, out = (torch.cat(v) for v in by_size[b])
        assert torch.equal(x, full_x), "noise must be bitwise identical per sample"
        torch.testing.assert_close(out, full_out, rtol=0, atol=1e-12)  # only BLAS blocking may differ


def test_different_seeds_differ():
    a = GaussianNoise(0, 4).sample((3,))
    b = GaussianNoise(1, 4).sample((3,))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[0], a[1])  # samples within a run are independent


def test_noise_source_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="made for 4 samples"):
        GaussianNoise(0, 4)(0, torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="exactly one of n or indices"):
        GaussianNoise(0)


def test_generator_noise_is_reproducible():
    x = torch.zeros(3, 2)
    a = GeneratorNoise(torch.Generator().manual_seed(0))(0, x, x)
    b = GeneratorNoise(torch.Generator().manual_seed(0))(0, x, x)
    assert torch.equal(a, b) and a.std() > 0
