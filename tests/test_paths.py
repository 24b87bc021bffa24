import math

import pytest
import torch

from diffkit import paths

T = torch.linspace(0.01, 0.98, 50, dtype=torch.float64)


def times(path):
    return path.t_min + (path.t_max - path.t_min) * T


def test_inverse_round_trip(path):
    t = times(path)
    torch.testing.assert_close(path.t(path.sigma(t)), t, rtol=1e-10, atol=1e-12)


def test_scaling_rules(path):
    t = times(path)
    a, b, s = path.alpha(t), path.beta(t), path.sigma(t)
    torch.testing.assert_close(b / a, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(path.log_snr(t), torch.log(a**2 / b**2), rtol=1e-10, atol=1e-10)
    rule = {"ve": a, "vp": a**2 + b**2, "linear": a + b}[path.scaling]
    torch.testing.assert_close(rule, torch.ones_like(t), rtol=1e-12, atol=1e-12)


def test_derivatives_match_finite_differences(path):
    t, h = times(path), 1e-6 * (path.t_max - path.t_min)
    for f, df in ((path.sigma, path.d_sigma), (path.alpha, path.d_alpha), (path.beta, path.d_beta)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-8)


def test_named_paths_have_their_textbook_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    rf = paths.RectifiedFlow()
    torch.testing.assert_close(rf.alpha(t), 1 - t)
    torch.testing.assert_close(rf.beta(t), t)
    vp = paths.VPLinear()  # EDM Table 1: beta_d = 19.9, beta_min = 0.1
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1))
    ve = paths.VE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64)), torch.tensor([0.01, 50.0], dtype=torch.float64))
    torch.testing.assert_close(paths.EDM().sigma(t), t)


def test_cosine_discrete_table_telescopes_to_continuous():
    # prod_j f((j+1)/N)/f(j/N) = f((i+1)/N)/f(0) wherever the 0.999 beta cap is not hit.
    cos = paths.VPCosine()
    table = cos.alphas_cumprod()
    i = torch.arange(900)
    torch.testing.assert_close(table[i], cos.alpha((i + 1).double() / 1000) ** 2, rtol=1e-10, atol=1e-14)


def test_linear_discrete_table_is_close_to_continuous_limit():
    vp = paths.VPLinear()
    i = torch.arange(0, 1000, 50)
    # The continuous form integrates the same betas; they differ only by O(beta^2) per step.
    torch.testing.assert_close(vp.alphas_cumprod()[i], vp.alpha((i + 1).double() / 1000) ** 2, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_shift_moves_log_snr_by_constant(scale):
    base = paths.VPCosine()
    shifted = paths.Shifted(base, scale)
    t = T
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(t) - 2 * math.log(scale))
    assert paths.Shifted.for_resolution(base, 256, 64).scale == 4.0


def test_shifted_rectified_flow_is_sd3_time_shift():
    s, t = 3.0, T
    t_sd3 = s * t / (1 + (s - 1) * t)
    torch.testing.assert_close(paths.Shifted(paths.RectifiedFlow(), s).sigma(t), paths.RectifiedFlow().sigma(t_sd3))


def test_densities():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    vp = paths.VPLinear()
    t = paths.Uniform().sample(vp, n, g)
    assert t.min() >= vp.t_min and t.max() <= vp.t_max
    assert abs(t.mean().item() - (vp.t_min + vp.t_max) / 2) < 4 * 0.29 / math.sqrt(n)
    # EDM log-normal over sigma: ln sigma ~ N(-1.2, 1.2^2), whatever the path.
    ln_sigma = torch.log(vp.sigma(paths.LogNormal().sample(vp, n, g)))
    assert abs(ln_sigma.mean().item() + 1.2) < 4 * 1.2 / math.sqrt(n)
    assert abs(ln_sigma.std().item() - 1.2) < 0.03
    rf = paths.RectifiedFlow()
    u = (paths.LogitNormal(0.5, 1.0).sample(rf, n, g) - rf.t_min) / (rf.t_max - rf.t_min)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - 0.5) < 4 / math.sqrt(n)
    assert abs(logit.std().item() - 1.0) < 0.03


def test_bad_input():
    with pytest.raises(ValueError, match="scale > 0"):
        paths.Shifted(paths.EDM(), 0.0)
    with pytest.raises(ValueError, match="unknown scaling"):
        paths.alpha_of_sigma(torch.ones(1), "vq")
