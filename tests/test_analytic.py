import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from diffkit import analytic


def noisy(gmm, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(n, g) + sigma * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_denoiser_is_tweedie(ring_gmm, sigma):
    # D = x + sigma^2 grad log p_sigma, with the gradient taken by autograd through log_prob.
    x = noisy(ring_gmm, 64, sigma).requires_grad_(True)
    (grad,) = torch.autograd.grad(ring_gmm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(ring_gmm(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=1e-9, atol=1e-9)


def test_single_gaussian_posterior_mean(gauss3):
    x, sigma = noisy(gauss3, 16, 0.8), 0.8
    cov, mu = gauss3.covs[0], gauss3.means[0]
    expected = mu + (cov @ torch.linalg.solve(cov + sigma**2 * torch.eye(3, dtype=torch.float64), (x - mu).T)).T
    torch.testing.assert_close(gauss3(x, sigma), expected, rtol=1e-10, atol=1e-10)


def test_log_prob_matches_scipy(ring_gmm):
    sigma = 0.4
    x = noisy(ring_gmm, 20, sigma)
    dens = sum(
        float(w) * multivariate_normal(m.numpy(), (c + sigma**2 * torch.eye(2, dtype=torch.float64)).numpy()).pdf(x.numpy())
        for w, m, c in zip(ring_gmm.weights, ring_gmm.means, ring_gmm.covs)
    )
    np.testing.assert_allclose(ring_gmm.log_prob(x, sigma).numpy(), np.log(dens), rtol=1e-10)


def test_sample_moments(ring_gmm):
    n = 200_000
    x = ring_gmm.sample(n, torch.Generator().manual_seed(0))
    mean = (ring_gmm.weights[:, None] * ring_gmm.means).sum(0)
    second = (ring_gmm.weights[:, None, None] * (ring_gmm.covs + ring_gmm.means[:, :, None] * ring_gmm.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    torch.testing.assert_close(x.mean(0), mean, atol=4 * math.sqrt(cov.diagonal().max() / n), rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.01, atol=0.03)


def test_flow_matches_closed_form_gaussian_flow(gauss3):
    x = noisy(gauss3, 32, 40.0, seed=1)
    torch.testing.assert_close(gauss3.flow(x, 40.0), gauss3.gaussian_flow(x, 40.0), rtol=0, atol=1e-8)


def test_flow_pushes_noise_to_data_distribution(gauss3):
    # The Gaussian flow map is linear, so its image of N(mu, S + s0^2 I) has exactly covariance S.
    x = noisy(gauss3, 4000, 10.0, seed=2)
    y = gauss3.gaussian_flow(x, 10.0)
    torch.testing.assert_close(torch.cov(y.T), gauss3.covs[0], rtol=0.1, atol=0.05)


def test_finite_dataset_equals_point_mass_mixture():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    data, gmm = analytic.FiniteDataset(pts), analytic.GaussianMixture(pts.reshape(7, 6))
    x, sigma = torch.randn(10, 2, 3, generator=g, dtype=torch.float64), torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(data(x, sigma), gmm(x, sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(data.log_prob(x, sigma), gmm.log_prob(x, sigma), rtol=1e-10, atol=1e-10)
    # Its flow lands exactly on training points (EDM App. B.3: the ideal denoiser only reproduces data).
    out = data.flow(x * 20, 20.0).reshape(10, 6)
    assert torch.cdist(out, pts.reshape(7, 6)).min(1).values.max() < 1e-6


def test_zero_sigma_is_identity(ring_gmm):
    x = noisy(ring_gmm, 5, 0.1)
    torch.testing.assert_close(ring_gmm(x, 0.0), x)


def test_dtype_and_shape_round_trip(ring_gmm):
    x = noisy(ring_gmm, 4, 1.0).float().reshape(4, 1, 2)
    out = ring_gmm(x, torch.full((4,), 1.0))
    assert out.dtype == torch.float32 and out.shape == (4, 1, 2)


def test_subset_renormalises(ring_gmm):
    sub = ring_gmm.subset([0, 1])
    torch.testing.assert_close(sub.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_bad_input(ring_gmm):
    with pytest.raises(ValueError, match="2 values per sample"):
        ring_gmm(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ring_gmm(torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match="scalar or a \\(3,\\) tensor"):
        ring_gmm(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        analytic.GaussianMixture(torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="sum to 1"):
        analytic.GaussianMixture(torch.zeros(2, 2), None, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="single Gaussian"):
        ring_gmm.gaussian_flow(torch.zeros(1, 2), 1.0)
