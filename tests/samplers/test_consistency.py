"""Consistency models' multistep sampler (Song et al. 2023, Alg. 1) against its loop written out by hand."""
import torch

from diffkit import grids, samplers
from diffkit.samplers.noise import GaussianNoise


def test_each_step_denoises_then_renoises_to_the_next_level(ring_gmm):
    x = 3.0 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = grids.karras(4, 0.05, 3.0)
    out = samplers.consistency(ring_gmm, x, sigmas, noise=GaussianNoise(1, 6))
    replay, want = GaussianNoise(1, 6), x
    for i, s in enumerate(sigmas[:-1].tolist()):
        want = ring_gmm(want, torch.full((6,), s, dtype=torch.float64))
        if sigmas[i + 1] > 0:
            want = want + sigmas[i + 1].item() * replay(i, want, want)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # Nothing of the state survives a step, unlike DDPM's posterior step: with a one-step grid it is D(x, s).
    one = samplers.consistency(ring_gmm, x, torch.tensor([3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(one, ring_gmm(x, torch.full((6,), 3.0, dtype=torch.float64)), rtol=0, atol=0)
    assert not torch.allclose(out, samplers.ddpm(ring_gmm, x, sigmas, noise=GaussianNoise(1, 6)))
