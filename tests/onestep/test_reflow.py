"""ReFlow: couples on disk, the objective's target, straightness, and a reflowed 2-D model against its teacher."""
import pytest
import torch

from diffkit import analytic, grids, paths, samplers
from diffkit.eval.metrics import sliced_wasserstein
from diffkit.nets.mlp import MLP
from diffkit.onestep.reflow import Reflow, distill_grid, load_couples, make_couples, pack, straightness
from diffkit.precond import Precond
from diffkit.samplers.noise import GaussianNoise
from diffkit.samplers.ode import euler, heun
from diffkit.train.loop import TrainSettings, train

RF = paths.RectifiedFlow()
# Two tight modes: the exact rectified flow from N(0, I) must bend to split the mass between them.
TWO_MODES = analytic.GaussianMixture(torch.tensor([[-2.0, 1.0], [2.0, -1.0]]), 0.05 * torch.eye(2).expand(2, 2, 2))
GRID = grids.uniform_t(RF, 8)


def couples(out, sampler="heun", **kw):
    args = {"seed": 0, "shard_size": 4, "batch": 3, "progress": False, "dtype": torch.float64, **kw}
    return make_couples(TWO_MODES, sampler, GRID, (2,), 10, out, **args)


@pytest.mark.parametrize("sampler", ["heun", "euler_maruyama"])
def test_couples_depend_only_on_seed_and_index(tmp_path, sampler):
    files = couples(tmp_path / "a", sampler)
    assert [f.name for f in files] == [f"couples-0000{k}.safetensors" for k in range(3)]
    noise, sample, labels = load_couples(tmp_path / "a")
    assert labels is None
    # Couple i is (z_i, sampler(D, sigma_max z_i)), z_i and any sampler noise from its own (seed, i) generator.
    source = GaussianNoise(0, 10)
    z = source.sample((2,), torch.float64)
    assert torch.equal(noise, z)
    assert torch.equal(sample, samplers.get(sampler)(TWO_MODES, GRID[0].item() * z, GRID, noise=source))
    for shard_size, batch in [(10, 10), (3, 1), (7, 5)]:
        couples(tmp_path / f"{shard_size}-{batch}", sampler, shard_size=shard_size, batch=batch)
        other = load_couples(tmp_path / f"{shard_size}-{batch}")
        assert torch.equal(other[0], noise) and torch.equal(other[1], sample)
    couples(tmp_path / "seed1", sampler, seed=1)
    assert not torch.allclose(load_couples(tmp_path / "seed1")[0], noise)


class Conditional:
    """An exact conditional denoiser that counts its calls: the label shifts the data."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        return TWO_MODES(x, sigma) + cond[:, None]


def test_resume_rewrites_a_deleted_shard_byte_for_byte_and_skips_the_rest(tmp_path):
    labels = torch.arange(10) % 3
    denoiser = Conditional()
    run = lambda: make_couples(denoiser, "heun", GRID, (2,), 10, tmp_path, labels=labels, shard_size=4,  # noqa: E731
                               batch=3, progress=False, dtype=torch.float64)
    files = run()
    before = [f.read_bytes() for f in files]
    files[1].unlink()
    denoiser.calls = 0
    run()
    assert [f.read_bytes() for f in files] == before
    assert denoiser.calls == 2 * (2 * 8 - 1)  # only shard 1 (couples 4..7: batches of 3 and 1) was sampled again
    denoiser.calls = 0
    run()
    assert denoiser.calls == 0
    noise, sample, stored = load_couples(tmp_path)
    assert torch.equal(stored, labels)
    torch.testing.assert_close(sample, heun(lambda x, s: denoiser(x, s, labels), GRID[0].item() * noise, GRID))


def test_damaged_foreign_or_missing_shards_are_errors_naming_the_file(tmp_path):
    files = couples(tmp_path)
    leftover = tmp_path / ".couples-00001.safetensors.tmp"
    leftover.write_bytes(b"left by a crash")
    foreign = r"couples-00000\.safetensors was made with other settings \({}: file has {}, this call wants {}"
    with pytest.raises(ValueError, match=foreign.format("seed", 0, 5)):
        couples(tmp_path, seed=5)
    with pytest.raises(ValueError, match=foreign.format("steps", 8, 9)):
        make_couples(TWO_MODES, "heun", grids.uniform_t(RF, 9), (2,), 10, tmp_path, shard_size=4, progress=False,
                     dtype=torch.float64)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 7])
    for call in (lambda: couples(tmp_path), lambda: load_couples(tmp_path)):
        with pytest.raises(ValueError, match=r"couples-00001\.safetensors is corrupt or truncated"):
            call()
    files[1].unlink()
    with pytest.raises(ValueError, match=r"couples \[4, 8\) are missing before .*couples-00002"):
        load_couples(tmp_path)
    couples(tmp_path)
    assert not leftover.exists()  # the rewrite went through the temporary name
    files[2].unlink()
    with pytest.raises(ValueError, match=r"end at index 8 in .*couples-00001.* n = 10"):
        load_couples(tmp_path)
    with pytest.raises(FileNotFoundError, match="no couples"):
        load_couples(tmp_path / "empty")


class Spy(torch.nn.Module):
    """A 'network' that records its inputs and returns `out` (zeros unless set)."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x_in, c_noise, cond=None):
        self.x_in, self.c_noise = x_in, c_noise
        return torch.zeros_like(x_in) if self.out is None else self.out


def test_reflow_regresses_eps_minus_sample_on_the_line_through_the_start_point():
    g = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(2, 64, 3, generator=g, dtype=torch.float64)
    spy = Spy()
    model = Precond(spy, RF, "velocity")
    loss0 = Reflow()(model, pack(noise, sample), generator=torch.Generator().manual_seed(1))
    t = paths.Uniform(t_hi=RF.t_max).sample(RF, 64, torch.Generator().manual_seed(1))
    eps = noise - sample / RF.sigma_max  # the line x0 + sigma eps passes through sigma_max z
    torch.testing.assert_close(spy.c_noise, t, rtol=0, atol=1e-12)  # velocity prediction feeds c_noise = t
    torch.testing.assert_close(spy.x_in, (1 - t[:, None]) * sample + t[:, None] * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss0, ((eps - sample) ** 2).mean(1), rtol=1e-12, atol=0)
    spy.out = eps - sample
    assert Reflow()(model, pack(noise, sample), generator=torch.Generator().manual_seed(1)).max() < 1e-24
    spy.out = eps - sample + 0.5
    torch.testing.assert_close(Reflow()(model, pack(noise, sample), generator=torch.Generator().manual_seed(2)),
                               torch.full((64,), 0.25, dtype=torch.float64), rtol=1e-12, atol=0)
    # Distillation trains only at the start times of k Euler steps (k = 1: t = t_max).
    Reflow(distill=True)(model, pack(noise, sample), generator=g)
    torch.testing.assert_close(spy.c_noise, torch.full((64,), RF.t_max, dtype=torch.float64), rtol=0, atol=1e-12)
    Reflow(distill=4)(model, pack(noise, sample), generator=g)
    want = torch.tensor([4, 3, 2, 1], dtype=torch.float64) * RF.t_max / 4
    torch.testing.assert_close(spy.c_noise.unique().sort().values, want.sort().values, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="pack"):
        Reflow()(model, sample, generator=g)


@pytest.mark.parametrize("grid", [grids.uniform_t(RF, 1), grids.uniform_t(RF, 2), distill_grid(4),
                                  grids.karras(4, RF.sigma_min, RF.sigma_max)], ids=["1", "2", "distill4", "karras4"])
def test_a_perfectly_reflowed_model_maps_noise_to_its_sample_with_euler(grid):
    g = torch.Generator().manual_seed(3)
    sample, noise = torch.randn(2, 16, 2, generator=g, dtype=torch.float64)
    spy = Spy()
    model = Precond(spy, RF, "velocity")
    spy.out = (noise - sample / RF.sigma_max) - sample  # the Reflow target, the same at every t
    torch.testing.assert_close(euler(model, grid[0].item() * noise, grid), sample, rtol=0, atol=1e-10)
    if len(grid) == 2:  # one step is x0_hat = x_t - t_max v; with eps = z it would miss by (1 - t_max) x1
        spy.out = noise - sample
        torch.testing.assert_close(euler(model, grid[0].item() * noise, grid), RF.t_max * sample, rtol=0, atol=1e-10)


def test_straightness_is_zero_for_straight_flows():
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dirac = analytic.GaussianMixture(torch.tensor([[1.5, -2.0]]))  # exact flow: lines from t_max z to the point
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    constant = lambda x, s: (x - s[:, None] * c) / (1 + s[:, None])  # noqa: E731  (velocity c everywhere)
    for field in (dirac, constant):
        for sigmas, sampler in [(1, "euler"), (64, "euler"), (grids.karras(20, 0.002, RF.sigma_max), "heun")]:
            assert straightness(field, z, sigmas, sampler=sampler).abs().max() < 1e-20  # measured <= 1.1e-25


def test_straightness_of_a_two_mode_flow_is_positive_and_converges():
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fine, finer = straightness(TWO_MODES, z, 256).mean(), straightness(TWO_MODES, z, 1024).mean()
    assert fine > 1.0  # measured 1.30 (1.29 with 1024 steps, 1.30 with 128 Heun steps)
    assert abs(fine - finer) < 0.03 * finer
    assert abs(straightness(TWO_MODES, z, 128, sampler="heun").mean() - finer) < 0.03 * finer
    with pytest.raises(ValueError, match="reports every step"):
        straightness(TWO_MODES, z, 8, sampler="rk45")


def test_a_reflowed_model_is_straighter_and_better_in_one_step_than_its_teacher(tmp_path):
    # 1. Couples from the exact (curved) flow, 64 Heun steps. 2. Fit a small MLP to them with Reflow.
    make_couples(TWO_MODES, "heun", grids.uniform_t(RF, 64), (2,), 2048, tmp_path / "couples", progress=False)
    noise, sample, _ = load_couples(tmp_path / "couples")
    torch.manual_seed(0)
    model = Precond(MLP(2, width=64, depth=2, emb=64), RF, "velocity")
    settings = TrainSettings(steps=400, batch=256, lr=3e-3, warmup=50, ema_decay=0.99, checkpoint_every=400)
    train(model, Reflow(), pack(noise, sample), None, settings, tmp_path / "run", progress=False)
    model.eval()
    # 3. Straightness (64 Euler steps) and one-step Euler quality on fresh noise.
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    target = TWO_MODES.sample(2000, torch.Generator().manual_seed(7))
    one_step = grids.uniform_t(RF, 1)
    with torch.no_grad():
        s_teacher = straightness(TWO_MODES, z[:500].double(), 64).mean()
        s_student = straightness(model, z[:500], 64).mean()
        sw_teacher, sw_student = (sliced_wasserstein(euler(d, RF.sigma_max * z, one_step), target,
                                                     generator=torch.Generator().manual_seed(0))
                                  for d in (TWO_MODES, model))
        mismatch = euler(model, RF.sigma_max * z, one_step) - TWO_MODES.flow(RF.sigma_max * z.double(), RF.sigma_max)
    assert s_student < 0.1 * s_teacher  # measured 0.0047 vs 1.37
    # Measured 0.20 vs 1.59 (the teacher's one step lands on the mean); for scale, the teacher's own
    # 64-step Heun samples score 0.198 and a second exact draw of the target 0.158.
    assert sw_student < 0.4 * sw_teacher
    assert mismatch.norm(dim=1).mean() < 0.5  # measured 0.11: one step follows the teacher's coupling (modes 4.5 apart)
