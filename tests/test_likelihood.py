import math

import pytest
import torch
from scipy.stats import norm

from conftest import ALL_PATHS, OracleNet
from diffkit import analytic
from diffkit.likelihood import bits_per_dim, log_likelihood
from diffkit.precond import Precond

SIGMA_MIN, SIGMA_MAX = 0.02, 1e3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These solves are thousands of tiny tensor ops, several times slower when split over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy(gmm, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(n, g) + sigma * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)


def gaussian_log_prob(z, var):
    return -0.5 * (z.flatten(1).pow(2).sum(1) / var + z[0].numel() * math.log(2 * math.pi * var))


@pytest.fixture(scope="module")
def mixture64():
    """Two 64-D Gaussians with full random covariances (eigenvalues from 0.05 up to about 1.2)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 64, 64, generator=g, dtype=torch.float64) / 8
    covs = 0.3 * a @ a.transpose(1, 2) + 0.05 * torch.eye(64, dtype=torch.float64)
    return analytic.GaussianMixture(torch.randn(2, 64, generator=g, dtype=torch.float64), covs)


def test_ring_matches_closed_form_with_the_gaussian_prior(ring_gmm):
    # The ring has mean 0 and covariance about 8 I, so log p_{sigma_max} differs from log N(0, sigma_max^2 I) by
    # O(8 / sigma_max^2) ~ 1e-5 nats; checked here on draws from p_{sigma_max}. The prior term is about -17 nats and
    # the integral about +15.5: a missing term or a flipped sign is off by one of them.
    z = noisy(ring_gmm, 256, SIGMA_MAX)
    assert (ring_gmm.log_prob(z, SIGMA_MAX) - gaussian_log_prob(z, SIGMA_MAX**2)).abs().max() < 1e-4
    x = noisy(ring_gmm, 6, SIGMA_MIN, seed=1)
    got = log_likelihood(ring_gmm, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got, ring_gmm.log_prob(x, SIGMA_MIN), rtol=0, atol=1e-4)


def test_mixture_64d_matches_closed_form(mixture64):
    # With the exact log p_{sigma_max} as the prior, only the ODE error remains: 2.5e-3 nats at rtol 1e-5 (2.5e-4
    # at 1e-6, 2x slower), on an integral of about 490 nats. The Gaussian prior would add up to about
    # |mean| / sigma_max = 0.006 nats here (0.002 at these points).
    x = noisy(mixture64, 2, SIGMA_MIN, seed=2)
    got = log_likelihood(mixture64, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rtol=1e-5, atol=1e-5,
                         prior=lambda z: mixture64.log_prob(z, SIGMA_MAX))
    torch.testing.assert_close(got, mixture64.log_prob(x, SIGMA_MIN), rtol=0, atol=1e-2)


def replicated(gmm, x, reps, **options):
    """log_likelihood of `reps` copies of each row of x: (reps, B) independent Hutchinson estimates in one solve."""
    out = log_likelihood(gmm, x.repeat(reps, 1), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, divergence="hutchinson",
                         **options)
    return out.reshape(reps, x.shape[0])


def test_hutchinson_is_unbiased_in_64d(mixture64):
    x = noisy(mixture64, 3, SIGMA_MIN, seed=2)
    est = replicated(mixture64, x, 16, generator=torch.Generator().manual_seed(0), rtol=1e-5, atol=1e-5,
                     prior=lambda z: mixture64.log_prob(z, SIGMA_MAX))
    se = est.std(0) / 4
    assert (se > 0.05).all()  # the probes do vary the estimate (one probe per row)
    assert ((est.mean(0) - mixture64.log_prob(x, SIGMA_MIN)).abs() < 4 * se + 3e-3).all()


def test_exact_and_hutchinson_agree_in_2d(ring_gmm):
    x = noisy(ring_gmm, 4, SIGMA_MIN, seed=3)
    exact = log_likelihood(ring_gmm, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rtol=1e-6, atol=1e-6)
    one, four = (replicated(ring_gmm, x, 64, probes=p, generator=torch.Generator().manual_seed(p), rtol=1e-6,
                            atol=1e-6) for p in (1, 4))
    for est in (one, four):
        assert ((est.mean(0) - exact).abs() < 4 * est.std(0) / 8 + 1e-3).all()
    # Four independent probes averaged: the standard deviation halves.
    assert 0.35 < (four.std(0) / one.std(0)).mean() < 0.7


def test_hutchinson_is_seeded(ring_gmm):
    x = noisy(ring_gmm, 2, SIGMA_MIN)

    def run(seed):
        return log_likelihood(ring_gmm, x, sigma_min=0.1, sigma_max=10.0, divergence="hutchinson",
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_conditional_closure_gives_each_sample_its_own_density(ring_gmm):
    # Two classes, the ring's first and last four modes, mixed in one batch: a cross-sample term in the trace,
    # or one class's denoiser applied to the other, would break the per-sample match.
    classes = [ring_gmm.subset(range(4)), ring_gmm.subset(range(4, 8))]
    labels = torch.tensor([0, 1, 1, 0, 1])

    def conditional(x, sigma, cond):
        return torch.where(cond[:, None] == 1, classes[1](x, sigma), classes[0](x, sigma))

    x = torch.cat([noisy(classes[c], 1, SIGMA_MIN, seed=i) for i, c in enumerate(labels.tolist())])

    # Each half-ring's mean is 2.6 from 0: the Gaussian prior would be off by a few 1e-3 nats, so use the exact one.
    def prior(z):
        return torch.where(labels == 1, classes[1].log_prob(z, SIGMA_MAX), classes[0].log_prob(z, SIGMA_MAX))

    got = log_likelihood(lambda x, sigma: conditional(x, sigma, labels), x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                         rtol=1e-7, atol=1e-7, prior=prior)
    want = torch.stack([classes[c].log_prob(x[i:i + 1], SIGMA_MIN)[0] for i, c in enumerate(labels.tolist())])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("path,kind", [("rectified_flow", "velocity"), ("vp_cosine", "eps"), ("edm", "edm")])
def test_any_precond_model(ring_gmm, path, kind):
    # sigma_max = 100 lies inside every path's range; the exact prior makes the check independent of it.
    model = Precond(OracleNet(ring_gmm, ALL_PATHS[path], kind), ALL_PATHS[path], kind)
    x = noisy(ring_gmm, 3, SIGMA_MIN, seed=4)
    got = log_likelihood(model, x, sigma_min=SIGMA_MIN, sigma_max=100.0, rtol=1e-6, atol=1e-6,
                         prior=lambda z: ring_gmm.log_prob(z, 100.0))
    torch.testing.assert_close(got, ring_gmm.log_prob(x, SIGMA_MIN), rtol=0, atol=1e-3)


def test_linear_model_closed_form_and_no_gradient_leaks():
    # D(x) = W x + b: dx/du = A x - b with A = I - W, so x(U) = x* + e^{AU} (x - x*), x* = A^{-1} b, and the
    # divergence is the constant tr A: log p = log N(x(U); 0, sigma_max^2 I) + U tr A, U = log(sigma_max / sigma_min).
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64))
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # the likelihood needs autograd inside and turns it on itself
        got = log_likelihood(lambda x, sigma: lin(x), x, sigma_min=0.1, sigma_max=10.0, rtol=1e-9, atol=1e-9)
    assert not got.requires_grad and x.grad is None and all(p.grad is None for p in lin.parameters())
    a, b, span = torch.eye(2, dtype=torch.float64) - lin.weight.detach(), lin.bias.detach(), math.log(100.0)
    x_star = torch.linalg.solve(a, b)
    x_end = x_star + (x.detach() - x_star) @ torch.linalg.matrix_exp(a * span).T
    torch.testing.assert_close(got, gaussian_log_prob(x_end, 100.0) + span * torch.trace(a), rtol=1e-7, atol=1e-7)


def test_bits_per_dim_of_a_gaussian_against_closed_form():
    # Model: N(m, s^2 I) data, so p_{sigma_min} = N(m, v I) with v = s^2 + sigma_min^2 (the exact prior removes the
    # sigma_max error). Data: digits-like, L = 17 levels, x_k = k / 8 - 1, delta = 1/8, 4x4 images (D = 16). For
    # the dequantized x_k + delta w, E_w[(x_k + delta w - m)^2] = (x_k - m)^2 + delta^2 / 12 per dimension, so the
    # expected bound is closed form; its Monte-Carlo spread per dimension is Var = (a^2 delta^2 / 3 + delta^4 / 180)
    # / (4 v^2) nats^2 with a = x_k - m (Var w = 1/12, Var w^2 = 1/180, E w^3 = 0).
    levels, delta, s, draws, dim = 17, 1 / 8, 1.0, 4, 16
    # The mean is the grid's corner x_0 = -1, so a >= 0: cells misplaced by delta / 2 shift the bound by
    # sum(a) delta / (2 v) nats, up to 14 standard errors. The first sample sits on the mean (a = 0), where noise
    # of the wrong width shows: width 2 delta (or delta / 2) moves the bound by 3 D delta^2 / (24 v) nats (or a
    # quarter of that), 27 (or 7) standard errors.
    model = analytic.GaussianMixture(-torch.ones(1, dim), s**2 * torch.eye(dim)[None])
    k = torch.randint(0, levels, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    k[0] = 0
    x = (k / 8 - 1).to(torch.float64)
    # dD/dx is a multiple of I here, so Hutchinson's Rademacher estimate of its trace is exact (v_i^2 = 1).
    got = bits_per_dim(model, x, levels=levels, sigma_min=1e-3, sigma_max=100.0, draws=draws, divergence="hutchinson",
                       rtol=1e-6, atol=1e-6, generator=torch.Generator().manual_seed(1),
                       prior=lambda z: model.log_prob(z, 100.0))
    v, a = s**2 + 1e-6, x.flatten(1) - model.means
    nats = 0.5 * ((a**2 + delta**2 / 12) / v + math.log(2 * math.pi * v)).sum(1) - dim * math.log(delta)
    want = nats / (dim * math.log(2))
    se = ((a**2 * delta**2 / 3 + delta**4 / 180) / (4 * v**2)).sum(1).sqrt() / math.sqrt(draws) / (dim * math.log(2))
    assert ((got - want).abs() < 4 * se + 1e-6).all()
    # The bound sits just above the exact discrete -log2 P(k) / D of the cells x_k +- delta / 2 (Jensen's gap).
    cell = norm.cdf((a + delta / 2) / math.sqrt(v)) - norm.cdf((a - delta / 2) / math.sqrt(v))
    discrete = -torch.log2(torch.as_tensor(cell)).sum(1) / dim
    assert ((want - discrete) > 0).all() and ((want - discrete) < 1e-2).all()


def test_bad_arguments(ring_gmm):
    x = noisy(ring_gmm, 2, SIGMA_MIN)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(ring_gmm, x, sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(ring_gmm, x, sigma_min=0.1, sigma_max=1.0, divergence="skilling")
    for probes in (0, 1.5):
        with pytest.raises(ValueError, match="probes"):
            log_likelihood(ring_gmm, x, sigma_min=0.1, sigma_max=1.0, divergence="hutchinson", probes=probes)
    with pytest.raises(ValueError, match="autograd"):
        log_likelihood(lambda x, s: ring_gmm(x, s).detach(), x, sigma_min=0.1, sigma_max=1.0)
    digits = torch.tensor([[0.0, 1 / 8 - 1]])
    for levels in (16.5, True, 1):
        with pytest.raises(ValueError, match="levels"):
            bits_per_dim(ring_gmm, digits, levels=levels, sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError, match="not on the grid"):
        bits_per_dim(ring_gmm, digits, levels=256, sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError, match="draws"):
        bits_per_dim(ring_gmm, digits, levels=17, sigma_min=0.1, sigma_max=1.0, draws=0)
