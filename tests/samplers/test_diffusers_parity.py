"""Parity with diffusers: its schedulers and our samplers, driven by the same exact GMM model and the same noise.

diffusers keeps DDIM/DDPM/DPM-Solver samples in VP space (x_vp = alpha x), Euler in our scale-free space, and
FlowMatch in rectified-flow space (x_t = (1 - t) x0 + t eps); the exact model answers each in its own
prediction type. Grids are read from the scheduler. diffusers stores its tables in float32, so we compare at
1e-5 (the rounding of its coefficients), and a one-step change of grid shows what a real difference looks like.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkit import analytic, grids, paths, samplers  # noqa: E402

B = 64


@pytest.fixture(scope="module")
def gmm():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(3, 3, 3, generator=g, dtype=torch.float64) * 0.3
    means = torch.tensor([[1.0, 0.0, -0.5], [-0.8, 0.6, 0.2], [0.1, -0.9, 0.7]], dtype=torch.float64)
    return analytic.GaussianMixture(means, a @ a.transpose(1, 2) + 0.01 * torch.eye(3), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def start(gmm, sigma_max, seed=0):
    """x at sigma_max in the scale-free state, drawn from the exact noised marginal."""
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(B, g) + sigma_max * torch.randn(B, 3, generator=g, dtype=torch.float64)


class Replay:
    """A NoiseSource that hands out the noises diffusers was given (or will draw), in order."""

    def __init__(self, noises):
        self.noises = list(noises)

    def __call__(self, step, x, x0_hat):
        return self.noises.pop(0)


def vp_grid(scheduler):
    abar = scheduler.alphas_cumprod.to(torch.float64)[scheduler.timesteps]
    return torch.cat([torch.sqrt((1 - abar) / abar), torch.zeros(1, dtype=torch.float64)])


def test_alphas_cumprod_match_diffusers():
    lin = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(torch.float64)
    cos = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.to(torch.float64)
    # diffusers accumulates the product in float32: relative rounding grows to ~1e-5 over 1000 factors.
    torch.testing.assert_close(paths.VPLinear().alphas_cumprod(), lin, rtol=3e-5, atol=0)
    torch.testing.assert_close(paths.VPCosine().alphas_cumprod(), cos, rtol=3e-5, atol=0)


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333])
def test_discrete_timesteps_match_ddim(spacing, n):
    s = diffusers.DDIMScheduler(timestep_spacing=spacing)
    s.set_timesteps(n)
    assert torch.equal(grids.discrete_timesteps(n, spacing), s.timesteps.long())


def run_vp(gmm, scheduler, prediction, step_kwargs=lambda i: {}):
    """Drive a VP-space scheduler; returns (final sample, the grid it used, x at sigma_max)."""
    sigmas = vp_grid(scheduler)
    x = start(gmm, sigmas[0].item())
    sample = x / torch.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(scheduler.timesteps):
        s = sigmas[i]
        alpha = 1 / torch.sqrt(1 + s**2)
        d = gmm(sample / alpha, s.expand(B))
        out = d if prediction == "sample" else (sample / alpha - d) / s  # eps = (x - D) / sigma
        sample = scheduler.step(out, t, sample, **step_kwargs(i)).prev_sample
    return sample, sigmas, x


def ddim_pair(gmm, spacing, n, eta):
    sch = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    sch.set_timesteps(n)
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(B, 3, generator=g, dtype=torch.float64) for _ in range(n)]
    theirs, sigmas, x = run_vp(gmm, sch, "epsilon", lambda i: {"eta": eta, "variance_noise": noises[i]})
    return samplers.ddim(gmm, x, sigmas, eta=eta, noise=Replay(noises)), theirs


@pytest.mark.parametrize("spacing,n", [("leading", 12), ("leading", 20), ("trailing", 10), ("trailing", 20)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(gmm, spacing, n, eta):
    ours, theirs = ddim_pair(gmm, spacing, n, eta)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_ddim_trailing_off_grid_steps_differ_as_expected(gmm):
    # DDIMScheduler steps from t to t - 1000 // n, a fixed stride, while "trailing" timesteps are
    # round(1000 - k * 1000 / n) - 1. For n = 12: 999 -> 916, then 916 -> 833 although the next timestep is
    # 832 (diffusers issue #11347). Its steps end off its own grid, so no grid reproduces it.
    sch = diffusers.DDIMScheduler(timestep_spacing="trailing")
    sch.set_timesteps(12)
    assert sch.timesteps[2].item() == 832 and sch.timesteps[1].item() - 1000 // 12 == 833
    ours, theirs = ddim_pair(gmm, "trailing", 12, 0.0)
    assert 1e-4 < (ours - theirs).abs().max() < 0.1


@pytest.mark.parametrize("n", [20, 50])
def test_ddpm(gmm, n):
    sch = diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    sch.set_timesteps(n)
    gen = torch.Generator().manual_seed(9)
    theirs, sigmas, x = run_vp(gmm, sch, "epsilon", lambda i: {"generator": gen})
    # DDPMScheduler draws torch.randn(shape, generator) for every step but the last; replay the same draws.
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(B, 3, generator=g, dtype=torch.float64) for _ in range(n - 1)]
    ours = samplers.ddpm(gmm, x, sigmas, noise=Replay(noises))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [5, 10, 25])
@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_dpm_solver_pp_2m(gmm, n, prediction):
    sch = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction,
                                                final_sigmas_type="zero")
    sch.set_timesteps(n)
    sigmas = sch.sigmas.to(torch.float64)
    assert torch.allclose(sigmas[:-1], vp_grid(sch)[:-1], rtol=1e-6)
    theirs, _, x = run_vp(gmm, sch, prediction)
    torch.testing.assert_close(samplers.dpmpp_2m(gmm, x, sigmas), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("karras", [False, True])
def test_euler_discrete(gmm, karras):
    sch = diffusers.EulerDiscreteScheduler(use_karras_sigmas=karras)
    sch.set_timesteps(15)
    sigmas = sch.sigmas.to(torch.float64)
    x = start(gmm, sigmas[0].item())
    sample = x.clone()  # Euler keeps the scale-free state
    for i, t in enumerate(sch.timesteps):
        x_in = sch.scale_model_input(sample, t)  # x / sqrt(sigma^2 + 1): the VP-space input
        s = sigmas[i]
        eps = (x_in * torch.sqrt(1 + s**2) - gmm(x_in * torch.sqrt(1 + s**2), s.expand(B))) / s
        sample = sch.step(eps, t, sample).prev_sample
    torch.testing.assert_close(samplers.euler(gmm, x, sigmas), sample, rtol=0, atol=1e-5)


def test_flow_match_euler(gmm):
    # diffusers' default grid starts at t = 1, where sigma = t / (1 - t) is infinite and the scale-free
    # state cannot be formed; a grid starting at t = 0.995 is representable on both sides.
    ts = torch.linspace(0.995, 0.02, 12).tolist()
    sch = diffusers.FlowMatchEulerDiscreteScheduler()
    sch.set_timesteps(sigmas=ts)
    t_grid = sch.sigmas.to(torch.float64)
    sigmas = t_grid / (1 - t_grid)
    x = start(gmm, sigmas[0].item())
    sample = x * (1 - t_grid[0])  # x_t = (1 - t) x
    for i, t in enumerate(sch.timesteps):
        tt, s = t_grid[i], sigmas[i]
        xs = sample / (1 - tt)
        d = gmm(xs, s.expand(B))
        velocity = (xs - d) / s - d  # eps_hat - x0_hat
        sample = sch.step(velocity, t, sample).prev_sample
    torch.testing.assert_close(samplers.euler(gmm, x, sigmas), sample, rtol=0, atol=1e-5)


def test_a_one_step_grid_change_is_far_above_tolerance(gmm):
    # Negative control: the same DPM-Solver++ run on a grid with one interior step removed.
    sch = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, prediction_type="sample",
                                                final_sigmas_type="zero")
    sch.set_timesteps(10)
    sigmas = sch.sigmas.to(torch.float64)
    theirs, _, x = run_vp(gmm, sch, "sample")
    shorter = torch.cat([sigmas[:4], sigmas[5:]])
    assert (samplers.dpmpp_2m(gmm, x, shorter) - theirs).abs().max() > 1e-2
