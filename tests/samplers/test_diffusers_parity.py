"""Parity with diffusers' schedulers: the same exact model, the same grid and the same noise give the same sample.

Spaces. Our samplers carry the scale-free state x = x_t / alpha = x0 + sigma eps. diffusers keeps
  - DDIM, DDPM and DPM-Solver samples in VP space, x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2);
  - Euler and Heun (discrete) samples in our state x, but hands the model scale_model_input(x) = alpha x;
  - FlowMatch samples in rectified-flow space, x_t = (1 - t) x0 + t eps = (1 - t) x with sigma = t / (1 - t).
All of them coincide at sigma = 0, so final samples compare directly.

The model is the exact denoiser of a small anisotropic 3-D Gaussian mixture (float64), answered in each
scheduler's prediction type through diffkit.precond.from_x0_eps, at the noise level the scheduler says its
sample is at: scheduler.sigmas[i], or abar at its timestep, never a level recovered from a rounded integer
timestep (with Karras sigmas diffusers hands a trained model the rounded t; the exact model needs no t).
Grids are read from the scheduler: its `sigmas`, or sqrt((1 - abar) / abar) at its `timesteps` for
DDIM/DDPM, which have no sigmas, then 0. Our sampler gets exactly that grid.

Two runs of each scheduler, two tolerances:
  - "float64" (the Float64 wrapper): diffusers' own table values (alphas_cumprod, sigmas) promoted to float64
    after set_timesteps, and the cast of the sample to float32 inside Euler's, FlowMatch's and DPM-Solver's
    `step` disabled. Its arithmetic is then float64 like ours, and this checks that the formulas are the
    same: every scheduler agrees to 1e-13 or better (TOL_EXACT = 1e-10).
  - "as shipped": float32 tables and coefficients and, in those three, a float32 state at every step.
    Measured differences are 2e-8 to 5e-6 for DDIM, DDPM and Heun (float32 coefficients; an eps -> x0
    conversion at sigma = 157 divides by alpha = 0.0064 and amplifies their rounding) and up to 1.4e-5
    for DPM-Solver++ on a Karras grid down to sigma = 0.01 (median over the batch 4e-8): the worst sample
    sits between two mixture components (responsibilities 0.52 / 0.45 at sigma = 0.05), where the exact
    denoiser's Jacobian has norm 16 (about 1 elsewhere) and amplifies the float32 rounding of the state.
    TOL_SHIPPED = 5e-5.
Each check prints what it measured (`pytest -rP` shows it). Negative controls show that moving one timestep
by one, removing one step, or changing one noise draw moves the sample by 1e-5 to 1, far above TOL_EXACT.

Known, explained differences (asserted as such, not skipped):
  - DDIMScheduler steps from t to t - 1000 // n, a fixed stride, which leaves its own timestep list for
    "linspace" and for "trailing" when n does not divide 1000 (diffusers issues #9261, #12633): its sample is
    then read as if at a noise level it is not at. An emulation of exactly that reproduces it.
  - DPMSolverMultistepScheduler(solver_order=3): its third-order term uses D2 = (D1_0 - D1_1) / (r0 + r1),
    which is h^2 x0''/2, with the coefficient meant for h^2 x0'': half the exact quadratic term. Our
    `dpmpp_3m` integrates the quadratic interpolant exactly. Measured orders: ours ~3, diffusers' ~2.
"""
import math
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkit import analytic, grids, paths, samplers  # noqa: E402
from diffkit.paths import alpha_of_sigma  # noqa: E402
from diffkit.precond import from_x0_eps  # noqa: E402

B, DIM = 64, 3
F64 = torch.float64
# diffusers' prediction_type -> ours (diffkit.precond.PREDICTIONS).
KIND = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "velocity"}
VP = paths.VPLinear()  # in the VP conversions only alpha(sigma) = 1/sqrt(1 + sigma^2) enters: any VP path will do
RF = paths.RectifiedFlow()

TOL_EXACT = 1e-10  # diffusers run in float64 (see Float64): the formulas themselves
TOL_SHIPPED = 5e-5  # diffusers as shipped: float32 tables, coefficients and (in some steps) states
pytestmark = pytest.mark.usefixtures("one_thread")  # the tensors here are (64, 3)


@pytest.fixture(scope="module")
def gmm():
    """Four anisotropic components in 3-D (standard deviations 0.03 to 0.45), unequal weights, data in [-1, 1]."""
    g = torch.Generator().manual_seed(20)
    means = torch.tensor([[0.6, 0.2, -0.4], [-0.5, 0.6, 0.3], [0.1, -0.6, 0.5], [-0.3, -0.2, -0.6]], dtype=F64)
    rot, _ = torch.linalg.qr(torch.randn(4, DIM, DIM, generator=g, dtype=F64))
    std = torch.tensor([[0.45, 0.1, 0.03], [0.25, 0.2, 0.05], [0.35, 0.06, 0.04], [0.15, 0.1, 0.08]], dtype=F64)
    covs = rot @ torch.diag_embed(std**2) @ rot.transpose(1, 2)
    return analytic.GaussianMixture(means, covs, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64))


def start(gmm, sigma, seed=0):
    """B points of the exact noised marginal at `sigma`, in the scale-free state."""
    g = torch.Generator().manual_seed(seed)
    return gmm.sample(B, g) + float(sigma) * torch.randn(B, DIM, generator=g, dtype=F64)


def check(ours, theirs, atol, label):
    err = (ours - theirs).abs().max().item()
    print(f"{label}: max |ours - diffusers| = {err:.2e} (atol {atol:.0e})")
    assert err <= atol, f"{label}: ours and diffusers differ by {err:.3e} > {atol:.0e}"
    return err


class _KeepFloat64(torch.Tensor):
    """A tensor whose .to(torch.float32) is a no-op: disables the float32 cast inside diffusers' step()."""

    def to(self, *args, **kwargs):
        if any(a is torch.float32 for a in args) or kwargs.get("dtype") is torch.float32:
            return self
        return super().to(*args, **kwargs)


class Float64:
    """A scheduler run in float64: its own table values promoted (after set_timesteps), and its internal cast of
    the sample to float32 (Euler, FlowMatch, DPM-Solver) disabled. Everything else is delegated unchanged."""

    def __init__(self, scheduler):
        for name in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
            value = getattr(scheduler, name, None)
            if isinstance(value, torch.Tensor):
                setattr(scheduler, name, value.to(F64))
        self.scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self, model_output, timestep, sample, **kwargs):
        # DPM-Solver's SDE step also casts variance_noise to float32: keep that float64 too.
        kwargs = {k: v.as_subclass(_KeepFloat64) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = self.scheduler.step(model_output, timestep, sample.as_subclass(_KeepFloat64), **kwargs)
        return SimpleNamespace(prev_sample=out.prev_sample.as_subclass(torch.Tensor))


def both(make, drive, ours):
    """Compare each of ours ({label: sample}) with diffusers as shipped and run in float64 (make() builds a
    fresh scheduler, drive(scheduler) runs it). Returns diffusers' float64 sample."""
    runs = {"as shipped": (drive(make()), TOL_SHIPPED), "float64": (drive(Float64(make())), TOL_EXACT)}
    for mode, (theirs, tol) in runs.items():
        for label, sample in ours.items():
            check(sample, theirs, tol, f"{label} [{mode}]")
    return runs["float64"][0]


class Replay:
    """A NoiseSource that returns noises[step] and records which steps asked."""

    def __init__(self, noises):
        self.noises, self.steps = noises, []

    def __call__(self, step, x, x0_hat):
        self.steps.append(step)
        return self.noises[step]


def draws(n, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, DIM, generator=g, dtype=dtype).to(F64) for _ in range(n)]


def answer(gmm, x, sigma, kind, path=VP, t=None):
    """The exact model's output of diffusers type `kind` for scale-free x at noise level sigma (0-dim float64)."""
    x0 = gmm(x, sigma.expand(len(x)))
    eps = (x - x0) / sigma
    t = path.t(sigma) if t is None else t
    return from_x0_eps(x0, eps, KIND[kind], t.expand(len(x)), path)


def vp_sigmas(scheduler):
    """The grid of a DDIM/DDPM scheduler: sqrt((1 - abar) / abar) at its timesteps, then 0."""
    abar = scheduler.alphas_cumprod.to(F64)[scheduler.timesteps]
    return torch.cat([torch.sqrt((1 - abar) / abar), torch.zeros(1, dtype=F64)])


def run_vp(scheduler, gmm, x, sigmas, kind, step_kwargs=lambda i: {}):
    """Drive a VP-space scheduler from scale-free x at sigmas[0]; sigmas[i] is the level of its i-th sample."""
    sample = alpha_of_sigma(sigmas[0], "vp") * x
    for i, t in enumerate(scheduler.timesteps):
        out = answer(gmm, sample / alpha_of_sigma(sigmas[i], "vp"), sigmas[i], kind)
        sample = scheduler.step(out, t, sample, **step_kwargs(i)).prev_sample
    return sample  # alpha = 1 at sigma = 0: the VP sample is the scale-free one


def run_ve(scheduler, gmm, x, kind):
    """Drive Euler/Heun (discrete): the sample is our x; the model sees scale_model_input(x) = alpha x."""
    sigmas, sample = scheduler.sigmas.to(F64), x.clone()
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(sample, t)
        out = answer(gmm, x_in / alpha_of_sigma(sigmas[i], "vp"), sigmas[i], kind)
        sample = scheduler.step(out, t, sample).prev_sample
    return sample


def float32_table_rtol(abar):
    """Relative error of sqrt((1 - abar)/abar) from diffusers' float32 abar (relative error up to 4e-7, its
    cumulative product) against ours: d log sigma = -d abar / (2 abar (1 - abar)), large where 1 - abar is small."""
    return 1e-7 + 2.5e-7 / (1 - abar)


# --- 1. Tables and grids -------------------------------------------------------------------------------------


def test_alphas_cumprod_match_diffusers():
    lin = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(F64)
    cos = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.to(F64)
    # diffusers builds both tables in float32 (a cumulative product of 1000 rounded factors): measured relative
    # differences 3.6e-7 (linear) and 5.6e-7 (cosine), down to the smallest entries (4e-5). The cosine table's
    # last beta is clipped to 0.999, and 1 - float32(0.999) = 0.0009999871 is 1.3e-5 off: that entry alone
    # gets rtol 2e-5.
    torch.testing.assert_close(paths.VPLinear().alphas_cumprod(), lin, rtol=1e-6, atol=0)
    ours_cos = paths.VPCosine().alphas_cumprod()
    torch.testing.assert_close(ours_cos[:-1], cos[:-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_cos[-1:], cos[-1:], rtol=2e-5, atol=0)
    assert (lin / cos - 1).abs().max() > 0.5  # negative control: the two schedules are far apart


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 12, 50, 333, 1000])
def test_discrete_timesteps_match_ddim_and_ddpm(spacing, n):
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        s = cls(timestep_spacing=spacing)
        s.set_timesteps(n)
        assert torch.equal(grids.discrete_timesteps(n, spacing), s.timesteps.long()), cls.__name__


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [10, 13, 50])
def test_discrete_grid_matches_the_schedulers_table(spacing, n, offset):
    s = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert torch.equal(grids.discrete_timesteps(n, spacing, steps_offset=offset), s.timesteps.long())
    # grids.discrete on our float64 table vs the grid run_vp reads off diffusers' float32 table: 1 - abar
    # cancels near t = 0: see float32_table_rtol (measured: 1e-7 at large t, 8e-5 at t = 0).
    ours, theirs = grids.discrete(VP.alphas_cumprod(), n, spacing, steps_offset=offset), vp_sigmas(s)
    abar = s.alphas_cumprod.to(F64)[s.timesteps]
    assert ((ours[:-1] / theirs[:-1] - 1).abs() <= float32_table_rtol(abar)).all() and ours[-1] == theirs[-1] == 0


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("n", [5, 20])
def test_karras_grid_matches_diffusers(cls, n):
    s = getattr(diffusers, cls)(use_karras_sigmas=True, final_sigmas_type="zero")
    s.set_timesteps(n)
    theirs = s.sigmas.to(F64)
    # The formula, on diffusers' own ends (its result is stored in float32).
    torch.testing.assert_close(grids.karras(n, theirs[-2].item(), theirs[0].item()), theirs, rtol=1e-6, atol=0)
    # The ends: sigma at t = 0 and t = 999 of the training table (float32 in diffusers, see float32_table_rtol).
    table = torch.sqrt((1 - VP.alphas_cumprod()) / VP.alphas_cumprod())
    abar = s.alphas_cumprod.to(F64)[[0, -1]]
    assert ((table[[0, -1]] / theirs[[-2, 0]] - 1).abs() <= float32_table_rtol(abar)).all()


# --- 2. DDIM and DDPM ----------------------------------------------------------------------------------------

DDIM_CASES = [  # (spacing, n, prediction); the stride 1000 // n stays on these timestep lists
    ("leading", 10, "epsilon"), ("leading", 12, "epsilon"), ("leading", 50, "epsilon"),
    ("trailing", 10, "epsilon"), ("trailing", 25, "epsilon"),
    ("trailing", 20, "sample"), ("trailing", 20, "v_prediction"),
]


def ddim(spacing, n, kind="epsilon"):
    sch = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                                  prediction_type=kind)
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,n,kind", DDIM_CASES)
def test_ddim(gmm, spacing, n, kind, eta):
    sigmas = vp_sigmas(ddim(spacing, n))
    x = start(gmm, sigmas[0])
    noises = draws(n, seed=5)

    def drive(sch):
        return run_vp(sch, gmm, x, sigmas, kind, lambda i: {"eta": eta, "variance_noise": noises[i]})

    make, label = (lambda: ddim(spacing, n, kind)), f"DDIM {spacing} n={n} {kind} eta={eta}"
    if eta == 0:
        both(make, drive, {label: samplers.ddim(gmm, x, sigmas, eta=0.0),
                           label + " (our euler)": samplers.euler(gmm, x, sigmas)})
    else:
        replay = Replay(noises)
        ours = {label: samplers.ddim(gmm, x, sigmas, eta=1.0, noise=replay),
                label + " (our ddpm)": samplers.ddpm(gmm, x, sigmas, noise=Replay(noises))}
        # DDIM's last step (to abar = 1) has zero variance: we draw nothing there, diffusers multiplies by 0.
        assert replay.steps == list(range(n - 1))
        both(make, drive, ours)


def ddim_fixed_stride(gmm, sch, x):
    """DDIMScheduler(eta=0) as it runs: step from t to t - 1000 // n, then read that sample as if at the next t."""
    abar = sch.alphas_cumprod.to(F64)
    stride = sch.config.num_train_timesteps // sch.num_inference_steps
    ts = sch.timesteps.tolist()
    ab = lambda t: abar[t] if t >= 0 else torch.tensor(1.0, dtype=F64)  # noqa: E731  (set_alpha_to_one)
    level = lambda t: torch.sqrt((1 - ab(t)) / ab(t))  # noqa: E731
    for i, t in enumerate(ts):
        x0 = gmm(x, level(t).expand(B))
        x = x0 + level(t - stride) * (x - x0) / level(t)  # DDIM lands at noise level sigma(t - stride) ...
        if i + 1 < len(ts):  # ... and the next step reads the VP sample alpha(t - stride) x as alpha(t_next) x'
            x = x * torch.sqrt(ab(t - stride) / ab(ts[i + 1]))
    return x


@pytest.mark.parametrize("spacing,n", [("trailing", 12), ("linspace", 10)])
def test_ddim_fixed_stride_leaves_its_grid(gmm, spacing, n):
    # DDIMScheduler.step takes prev_t = t - 1000 // n. "trailing" timesteps are round(1000 - k 1000 / n) - 1
    # (n = 12: 999, 916, 832, ...; the step from 916 lands at 833); "linspace" ones are round(k 999 / (n - 1))
    # (n = 10: 999, 888, ...; the step from 999 lands at 899, and the one from 111 at 11, which is then denoised
    # as if at t = 0). No grid reproduces that: the sample is relabelled to a noise level it is not at.
    sch = ddim(spacing, n)
    ts = sch.timesteps.tolist()
    assert any(a - 1000 // n != b for a, b in zip(ts, ts[1:])), "the stride is on the grid: nothing to show"
    sigmas = vp_sigmas(sch)
    x = start(gmm, sigmas[0])
    theirs = run_vp(Float64(sch), gmm, x, sigmas, "epsilon", lambda i: {"eta": 0.0})
    check(ddim_fixed_stride(gmm, sch, x), theirs, TOL_EXACT, f"DDIM {spacing} n={n} vs its fixed-stride emulation")
    off = (samplers.ddim(gmm, x, sigmas) - theirs).abs().max().item()
    print(f"DDIM {spacing} n={n}: ours on its timestep grid differs by {off:.2e} (expected)")
    assert off > 1e-3


def ddpm(spacing, n):
    sch = diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small", timestep_spacing=spacing)
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("spacing,n", [("leading", 20), ("leading", 50), ("trailing", 20), ("linspace", 50)])
def test_ddpm(gmm, spacing, n):
    sigmas = vp_sigmas(ddpm(spacing, n))
    x = start(gmm, sigmas[0])

    def drive(sch):
        gen = torch.Generator().manual_seed(9)
        return run_vp(sch, gmm, x, sigmas, "epsilon", lambda i: {"generator": gen})

    # DDPMScheduler.step draws randn(shape, generator, float64) at every t > 0 and adds the posterior std times it.
    # We draw at every step but the last (sigma' = 0): n - 1 draws, the same tensors in the same order. With
    # "trailing" the last timestep is 49 > 0, so diffusers makes an n-th draw there and adds it scaled by its
    # clamped variance, sqrt(1e-20) = 1e-10 (the posterior variance is 0 at abar_prev = 1): we add that too.
    extra = 1e-10 * draws(n, seed=9)[-1] if spacing == "trailing" else 0.0
    make, label = (lambda: ddpm(spacing, n)), f"DDPM {spacing} n={n}"
    replay = Replay(draws(n - 1, seed=9))
    both(make, drive, {label: samplers.ddpm(gmm, x, sigmas, generator=torch.Generator().manual_seed(9)) + extra,
                       label + " (replayed noise)": samplers.ddpm(gmm, x, sigmas, noise=replay) + extra})
    assert replay.steps == list(range(n - 1))


# --- 3. Euler and Heun (discrete, VE state) ------------------------------------------------------------------


def euler_discrete(n, **config):
    sch = diffusers.EulerDiscreteScheduler(**config)
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_euler_discrete(gmm, kind, karras):
    def make():
        return euler_discrete(15, prediction_type=kind, use_karras_sigmas=karras)

    sigmas = make().sigmas.to(F64)
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_ve(sch, gmm, x, kind), {f"Euler {kind} karras={karras}": samplers.euler(gmm, x, sigmas)})


def test_euler_discrete_takes_our_grid(gmm):
    ours_grid = grids.karras(12, 0.02, 80.0)

    def make():
        sch = diffusers.EulerDiscreteScheduler(prediction_type="sample")
        sch.set_timesteps(sigmas=ours_grid.tolist())
        return sch

    # It keeps our grid, rounded to float32; both run on that stored grid.
    sigmas = make().sigmas.to(F64)
    torch.testing.assert_close(sigmas, ours_grid, rtol=1e-7, atol=0)
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_ve(sch, gmm, x, "sample"), {"Euler on our karras grid": samplers.euler(gmm, x, sigmas)})


@pytest.mark.parametrize("karras", [False, True])
def test_heun_discrete(gmm, karras):
    def make():
        sch = diffusers.HeunDiscreteScheduler(use_karras_sigmas=karras)
        sch.set_timesteps(10)
        return sch

    # Heun interleaves its sigmas (s0, s1, s1, s2, s2, ..., s9, s9, 0): one model call per entry, 2n - 1 in all,
    # the last step (to 0) being a plain Euler step, x = D, as in ours.
    sch = make()
    sigmas = torch.cat([sch.sigmas[:1], sch.sigmas[1::2]]).to(F64)
    assert len(sch.timesteps) == 2 * (len(sigmas) - 1) - 1
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_ve(sch, gmm, x, "epsilon"), {f"Heun karras={karras}": samplers.heun(gmm, x, sigmas)})


# --- 4. DPM-Solver++ -----------------------------------------------------------------------------------------


def dpm(n, **config):
    config = {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", **config}
    sch = diffusers.DPMSolverMultistepScheduler(**config)
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 14, 15, 25])
def test_dpmpp_2m(gmm, n, lower_order_final):
    # Both take the first step at first order (no history) and the last step, to sigma = 0, as x = D:
    # diffusers because final_sigmas_type="zero" forces a first-order final step whatever lower_order_final
    # says, and its first-order step to alpha = 1, sigma = 0 is exactly x = D. lower_order_final's other effect
    # (at the second-to-last step when n < 15) only lowers third order to second, so with solver_order=2 every
    # step coincides at every n: there is no warm-up or final-step difference to document.
    def make():
        return dpm(n, solver_order=2, prediction_type="sample", lower_order_final=lower_order_final)

    sch = make()
    sigmas = sch.sigmas.to(F64)
    torch.testing.assert_close(sigmas, vp_sigmas(sch), rtol=1e-6, atol=0)  # the table's sigmas at its timesteps
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_vp(sch, gmm, x, sigmas, "sample"),
         {f"DPM-Solver++(2M) n={n} lower_order_final={lower_order_final}": samplers.dpmpp_2m(gmm, x, sigmas)})


@pytest.mark.parametrize("kind,karras", [("epsilon", False), ("v_prediction", False), ("epsilon", True)])
def test_dpmpp_2m_predictions_and_karras(gmm, kind, karras):
    def make():
        return dpm(12, solver_order=2, prediction_type=kind, use_karras_sigmas=karras)

    sigmas = make().sigmas.to(F64)
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_vp(sch, gmm, x, sigmas, kind),
         {f"DPM-Solver++(2M) {kind} karras={karras}": samplers.dpmpp_2m(gmm, x, sigmas)})


@pytest.mark.parametrize("n", [8, 20])
def test_dpmpp_2m_heun_type_is_our_exact_linear_multistep(gmm, n):
    # solver_type="heun" integrates the linear interpolant of (D_last, D) exactly: our `multistep` of order 2.
    def make():
        return dpm(n, solver_order=2, solver_type="heun", prediction_type="sample")

    sigmas = make().sigmas.to(F64)
    x = start(gmm, sigmas[0])
    theirs = both(make, lambda sch: run_vp(sch, gmm, x, sigmas, "sample"),
                  {f"DPM-Solver++(2M, heun) n={n}": samplers.multistep(gmm, x, sigmas, order=2)})
    # The midpoint form (our dpmpp_2m) is a different method: it differs by far more than the tolerance.
    assert (samplers.dpmpp_2m(gmm, x, sigmas) - theirs).abs().max() > 1e-4


@pytest.mark.parametrize("n", [6, 20])
def test_sde_dpmpp_2m(gmm, n):
    def make():
        return dpm(n, solver_order=2, algorithm_type="sde-dpmsolver++", prediction_type="sample")

    sigmas = make().sigmas.to(F64)
    x = start(gmm, sigmas[0])
    noises = draws(n, seed=7, dtype=torch.float32)  # diffusers casts its noise to float32: draw it there
    replay = Replay(noises)
    both(make, lambda sch: run_vp(sch, gmm, x, sigmas, "sample", lambda i: {"variance_noise": noises[i]}),
         {f"SDE-DPM-Solver++(2M) n={n}": samplers.dpmpp_2m_sde(gmm, x, sigmas, eta=1.0, noise=replay)})
    assert replay.steps == list(range(n - 1))  # the last step (to 0) is noise-free in both


def exponential_multistep_3(gmm, x, sigmas, c2=1.0, lower_order_second=False):
    """Reference 3-step exponential integrator in lambda = -log sigma: x' = (s'/s) x + int_0^h e^(tau - h) P(tau) dtau,
    P the Newton interpolant of the last three D's with its quadratic coefficient scaled by c2. Warm-up at orders
    1 and 2 (exact linear interpolant); last step x = D; optionally second order at the second-to-last step."""
    s = sigmas.tolist()
    hist = []  # (lambda_j, D_j), newest first
    n = len(s) - 1
    for i in range(n):
        d = gmm(x, torch.full((B,), s[i], dtype=F64))
        if s[i + 1] == 0:
            return d
        hist = [(-math.log(s[i]), d)] + hist[:2]
        h = math.log(s[i] / s[i + 1])
        m0 = -math.expm1(-h)  # m_k = int_0^h e^(tau-h) tau^k dtau, k = 0, 1, 2
        m1 = h - m0
        m2 = h * h - 2 * m1
        x = (s[i + 1] / s[i]) * x + m0 * d
        order = min(len(hist), 2) if lower_order_second and i == n - 2 else len(hist)
        if order >= 2:
            (l0, d0), (l1, d1) = hist[0], hist[1]
            f01 = (d0 - d1) / (l0 - l1)
            if order == 2:
                x = x + m1 * f01
            else:
                l2, d2 = hist[2]
                f012 = (f01 - (d1 - d2) / (l1 - l2)) / (l0 - l2)
                # P(tau) = d0 + f01 tau + f012 tau (tau - (l1 - l0)) = d0 + (f01 - f012 (l1 - l0)) tau + f012 tau^2
                x = x + m1 * (f01 - f012 * (l1 - l0)) + c2 * m2 * f012
    return x


@pytest.mark.parametrize("n,karras", [(10, False), (16, False), (16, True), (30, True)])
def test_dpmpp_3m_differs_only_by_half_the_quadratic_term(gmm, n, karras):
    # Measure and explain, not parity. Write the quadratic interpolant of the last three D's in lambda as
    # P = D0 + A u + B u^2 with u = tau / h. diffusers' D1 is A and its D2 = (D1_0 - D1_1)/(r0 + r1) is B
    # (~ h^2 x0''/2), but its coefficient for D2, phi_2/h - 1/2 with phi_2 = (e^-h - 1)/h + 1, equals
    # (h^2 - 2(h - 1 + e^-h)) / (2 h^2): half of int_0^h e^(tau-h) (tau/h)^2 dtau, the exact weight of B.
    # solver_type="heun" makes its second (warm-up) step the exact linear one, as ours; for n < 15
    # lower_order_final also drops its second-to-last step to second order, which ours does not.
    def make():
        return dpm(n, solver_order=3, solver_type="heun", prediction_type="sample", use_karras_sigmas=karras)

    sigmas = make().sigmas.to(F64)
    x = start(gmm, sigmas[0])
    ours = samplers.dpmpp_3m(gmm, x, sigmas)
    label = f"DPM-Solver++(3M) n={n} karras={karras}"
    # Ours is the exact-quadratic integrator (an independent float64 check of our weights) ...
    exact = exponential_multistep_3(gmm, x, sigmas)
    assert (ours - exact).abs().max() < 1e-10, f"{label}: our 3M is not the exact-quadratic multistep"
    # ... diffusers is the same integrator with the quadratic term halved (and its n < 15 rule) ...
    half = exponential_multistep_3(gmm, x, sigmas, c2=0.5, lower_order_second=n < 15)
    theirs = both(make, lambda sch: run_vp(sch, gmm, x, sigmas, "sample"), {f"{label}: half-quadratic emulation": half})
    # ... and that is a real difference (if diffusers ever doubles its D2 this fails: then assert parity).
    diff = (ours - theirs).abs().max().item()
    print(f"{label}: ours vs diffusers (expected to differ) {diff:.2e}")
    assert diff > 1e-4


def test_dpmpp_3m_convergence_order_measured():
    # Measured on a single anisotropic Gaussian, whose flow is closed-form: in its eigenbasis y(s') = y(s) *
    # sqrt((lam + s'^2)/(lam + s^2)). Both samplers end with the same step x = D(x, sigma_last), so the reference
    # is the exact flow to sigma_last, then D. Karras grids of n = 30, 60, 120 steps.
    g = torch.Generator().manual_seed(1)
    rot, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=F64))
    cov = rot @ torch.diag(torch.tensor([0.5, 0.15, 0.05], dtype=F64) ** 2) @ rot.T
    gauss = analytic.GaussianMixture(torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), cov[None])
    lam, q, mu = gauss.lam[0], gauss.q[0], gauss.means[0]
    errors = {"ours": [], "diffusers": []}
    for n in (30, 60, 120):
        sch = Float64(dpm(n, solver_order=3, solver_type="heun", prediction_type="sample", use_karras_sigmas=True))
        sigmas = sch.sigmas.to(F64)
        x = start(gauss, sigmas[0], seed=3)
        s0, s1 = sigmas[0], sigmas[-2]
        ref = gauss(mu + (((x - mu) @ q) * torch.sqrt((lam + s1**2) / (lam + s0**2))) @ q.T, s1.expand(B))
        errors["ours"].append((samplers.dpmpp_3m(gauss, x, sigmas) - ref).abs().max().item())
        errors["diffusers"].append((run_vp(sch, gauss, x, sigmas, "sample") - ref).abs().max().item())
    rates = {k: [round(math.log2(e[i] / e[i + 1]), 2) for i in range(2)] for k, e in errors.items()}
    print(f"3M max errors at n = 30, 60, 120: {errors}; observed orders: {rates}")
    # Asserted for ours only (measured 3.3 and 3.1); diffusers' measured orders are ~2.0 and ~1.7.
    assert min(rates["ours"]) > 2.6, f"our dpmpp_3m is not third order here: {rates['ours']}"
    assert errors["ours"][-1] < errors["diffusers"][-1]


# --- 5. FlowMatch Euler --------------------------------------------------------------------------------------


def run_flow(sch, gmm, x_t, first_model=None):
    """Drive FlowMatchEuler on x_t = (1 - t) x0 + t eps; the model answers the velocity eps - x0."""
    t_grid, sample = sch.sigmas.to(F64), x_t
    for i, t in enumerate(sch.timesteps):
        tt = t_grid[i]
        if first_model is not None and i == 0:
            out = first_model(sample)
        else:
            out = answer(gmm, sample / RF.alpha(tt), RF.sigma(tt), "flow_prediction", path=RF, t=tt)
        sample = sch.step(out, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler(gmm, shift):
    # diffusers' default grid starts at t = 1, where sigma = t / (1 - t) is infinite: the scale-free state
    # cannot hold it. So we pass sigmas= starting at t = 0.999 (sigma = 999); test_flow_match_default_grid
    # covers the t = 1 start.
    base = torch.linspace(0.999, 0.02, 12, dtype=F64)

    def make():
        sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        sch.set_timesteps(sigmas=base.tolist())
        return sch

    t_grid = make().sigmas.to(F64)
    # Its shift t' = s t / (1 + (s - 1) t) is our Shifted(RectifiedFlow, s): sigma(t') = s sigma(t) (compared in
    # t, which diffusers stores in float32).
    torch.testing.assert_close(RF.t(paths.Shifted(RF, shift).sigma(base)), t_grid[:-1], rtol=0, atol=1e-7)
    sigmas = RF.sigma(t_grid)  # ends with sigma(0) = 0
    x = start(gmm, sigmas[0])
    both(make, lambda sch: run_flow(sch, gmm, RF.alpha(t_grid[0]) * x),
         {f"FlowMatch Euler shift={shift}": samplers.euler(gmm, x, sigmas)})


def test_flow_match_default_grid(gmm):
    # On the default grid the first step starts at t = 1: x_1 = eps exactly, the exact model's x0-hat there is
    # the data mean and its velocity x_1 - mean. After that step x_t1 = (1 - t1) mean + t1 eps, which is the
    # scale-free state mean + sigma(t1) eps: our euler from there, on the rest of the grid, must agree.
    def make():
        sch = diffusers.FlowMatchEulerDiscreteScheduler()
        sch.set_timesteps(10)
        return sch

    t_grid = make().sigmas.to(F64)
    assert t_grid[0] == 1.0
    eps = torch.randn(B, DIM, generator=torch.Generator().manual_seed(4), dtype=F64)
    mean = gmm.weights @ gmm.means
    sigmas = RF.sigma(t_grid[1:])
    both(make, lambda sch: run_flow(sch, gmm, eps, first_model=lambda x1: x1 - mean),
         {"FlowMatch Euler default grid (t = 1 start)": samplers.euler(gmm, mean + sigmas[0] * eps, sigmas)})


# --- 6. Negative controls: the comparisons above can fail ----------------------------------------------------


def test_negative_controls(gmm):
    # (a) DDIM, trailing, 10 steps: one interior timestep of our grid moved by one (t -> t - 1).
    sch = Float64(ddim("trailing", 10))
    sigmas = vp_sigmas(sch)
    x = start(gmm, sigmas[0])
    theirs = run_vp(sch, gmm, x, sigmas, "epsilon", lambda i: {"eta": 0.0})
    abar, t4 = sch.alphas_cumprod, sch.timesteps[4].item() - 1
    moved = sigmas.clone()
    moved[4] = torch.sqrt((1 - abar[t4]) / abar[t4])
    a = (samplers.ddim(gmm, x, moved) - theirs).abs().max().item()
    # (b) DPM-Solver++(2M), 10 steps: one interior step removed.
    sch = Float64(dpm(10, solver_order=2, prediction_type="sample"))
    sigmas = sch.sigmas.to(F64)
    x = start(gmm, sigmas[0])
    theirs = run_vp(sch, gmm, x, sigmas, "sample")
    b = (samplers.dpmpp_2m(gmm, x, torch.cat([sigmas[:4], sigmas[5:]])) - theirs).abs().max().item()
    # (c) DDPM, 20 steps: one of the 19 noise draws flipped.
    sch = Float64(ddpm("leading", 20))
    sigmas = vp_sigmas(sch)
    x = start(gmm, sigmas[0])
    gen = torch.Generator().manual_seed(9)
    theirs = run_vp(sch, gmm, x, sigmas, "epsilon", lambda i: {"generator": gen})
    noises = draws(19, seed=9)
    noises[10] = -noises[10]
    c = (samplers.ddpm(gmm, x, sigmas, noise=Replay(noises)) - theirs).abs().max().item()
    print(f"negative controls: timestep moved by one {a:.2e}, step removed {b:.2e}, one noise draw flipped {c:.2e}")
    assert a > 1e4 * TOL_EXACT and b > 1e-3 and c > 1e-2
