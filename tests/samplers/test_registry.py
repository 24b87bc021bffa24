import pytest
import torch

from diffkit import grids, samplers


def test_unknown_sampler_suggests_nearest():
    with pytest.raises(ValueError, match="Did you mean heun"):
        samplers.get("huen")
    with pytest.raises(ValueError, match="Available:"):
        samplers.get("zzz")


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_rejects_bad_grids_and_shapes(name, ring_gmm):
    f, x = samplers.get(name), torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        f(ring_gmm, x, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="negative"):
        f(ring_gmm, x, torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="values per sample"):
        f(ring_gmm, torch.zeros(2, 3, dtype=torch.float64), grids.karras(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="returned shape"):
        f(lambda x, s: x[:, :1], x, grids.karras(3, 0.1, 1.0))
