"""Stochastic samplers reach the target distribution (two-sample MMD against exact draws, null-calibrated)."""
import pytest
import torch

from diffkit import grids, samplers
from diffkit.eval.metrics import mmd
from diffkit.samplers.noise import GaussianNoise

N, BANDWIDTH, SIGMA_MAX = 2000, 0.3, 80.0  # bandwidth ~ the modes' scale, so within-mode shape counts


@pytest.fixture(scope="module")
def threshold(ring_gmm):
    """Null run: MMD between independent exact sample sets; threshold = mean + 4 sd over 10 pairs."""
    null = torch.tensor([
        mmd(ring_gmm.sample(N, torch.Generator().manual_seed(100 + i)), ring_gmm.sample(N, torch.Generator().manual_seed(200 + i)), BANDWIDTH)
        for i in range(10)
    ])
    return (null.mean() + 4 * null.std()).item()


@pytest.fixture(scope="module")
def data(ring_gmm):
    return ring_gmm.sample(N, torch.Generator().manual_seed(7))


class Scaled:
    """A wrong noise source: the right noise times k."""

    def __init__(self, noise, k):
        self.noise, self.k = noise, k

    def __call__(self, step, x, x0_hat):
        return self.k * self.noise(step, x, x0_hat)


def run(gmm, name, steps, noise_scale=1.0, **kw):
    noise = GaussianNoise(seed=1, n=N)
    x = SIGMA_MAX * noise.sample((2,), torch.float64)
    return samplers.get(name)(gmm, x, grids.karras(steps, 0.002, SIGMA_MAX), noise=Scaled(noise, noise_scale), **kw)


CASES = [("ddpm", 100, {}), ("ddim", 100, {"eta": 0.5}), ("euler_maruyama", 150, {}), ("dpmpp_2m_sde", 50, {}), ("heun", 40, {"churn": 10})]


@pytest.mark.parametrize("name,steps,kw", CASES, ids=[c[0] for c in CASES])
def test_stochastic_sampler_matches_target(ring_gmm, data, threshold, name, steps, kw):
    stat = mmd(run(ring_gmm, name, steps, **kw), data, BANDWIDTH)
    assert stat < threshold, f"{name}: MMD {stat:.5f} above null threshold {threshold:.5f}"


@pytest.mark.parametrize("name,scale", [("ddpm", 1.5), ("euler_maruyama", 1.5), ("dpmpp_2m_sde", 0.0)])
def test_wrong_noise_level_is_detected(ring_gmm, data, threshold, name, scale):
    steps, kw = next((s, k) for n, s, k in CASES if n == name)
    stat = mmd(run(ring_gmm, name, steps, noise_scale=scale, **kw), data, BANDWIDTH)
    assert stat > threshold, f"{name} with noise x{scale}: MMD {stat:.5f} not above threshold {threshold:.5f}"


def test_eta_out_of_range_is_an_error(ring_gmm):
    with pytest.raises(ValueError, match="0 <= eta <= 1"):
        samplers.ddim(ring_gmm, torch.zeros(2, 2), grids.karras(3, 0.1, 1.0), eta=1.5)
