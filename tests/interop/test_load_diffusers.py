"""load_diffusers against diffusers itself: tiny random models saved here (no hub), each scheduler's own initial
latents and timesteps, diffkit's sampler on the loaded denoiser vs the scheduler's loop.

Both sides use the float64 table of the scheduler's betas (`_exact_table`: diffusers' own is a float32 cumprod).
float64 parity (1e-10) holds where the scheduler's step keeps the sample's dtype (DDIM, DDPM); Euler,
DPM-Solver++ and flow matching upcast to float32 inside step(), so they are compared in float32 (1e-4).
"""
import json

import pytest
import torch

from diffkit import samplers
from diffkit.interop import schedule
from diffkit.interop.diffusers import load_diffusers, scheduler_sample

diffusers = pytest.importorskip("diffusers")

BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULERS = {  # diffkit sampler, diffusers scheduler class, its options
    "ddim": ("ddim", diffusers.DDIMScheduler, {"clip_sample": False}),
    "ddpm": ("ddpm", diffusers.DDPMScheduler, {"clip_sample": False}),
    # Leading spacing starts Euler below timestep 999: squaredcos_cap_v2's sigma there is 1.3e4, where a float32
    # state has a rounding step of 2e-3, so no float32 sampler could agree with another to 1e-4.
    "euler": ("euler", diffusers.EulerDiscreteScheduler, {"timestep_spacing": "leading"}),
    "dpmpp_2m": ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}),
}
SCALE_FREE = ("euler",)  # schedulers whose sample is x_t / alpha already; the others keep x_t
STEPS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random diffusers models saved once: plain, class-conditional and text-conditional UNets, a DiT."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    nets = {
        "unet": diffusers.UNet2DModel(in_channels=1, out_channels=1, attention_head_dim=None, **small),
        "unet_labels": diffusers.UNet2DModel(in_channels=1, out_channels=1, attention_head_dim=None,
                                             num_class_embeds=3, **small),
        "unet_text": diffusers.UNet2DConditionModel(
            in_channels=1, out_channels=1, cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **{k: v for k, v in small.items() if "block_types" not in k}),
        "dit": diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1,
                                               out_channels=2, num_layers=1, sample_size=8, patch_size=2,
                                               num_embeds_ada_norm=3),
    }
    for name, net in nets.items():
        for p in net.parameters():  # random nets give O(1) outputs; a smaller scale keeps samples in range
            p.data.mul_(0.5)
        net.save_pretrained(root / name)
    return root


def _folder(models, tmp_path, model: str, scheduler) -> str:
    """A model folder with `scheduler`'s config beside it."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    for f in (models / model).iterdir():
        (folder / f.name).symlink_to(f)
    scheduler.save_config(folder)
    return str(folder)


def _vp_grid(loaded, timesteps) -> torch.Tensor:
    """diffkit's grid at the scheduler's (possibly fractional) timesteps: t = (tau + 1) / N, then 0."""
    t = (timesteps.to(torch.float64) + 1) / loaded.schedule.num_train_timesteps
    return torch.cat([loaded.path.sigma(t), torch.zeros(1, dtype=torch.float64)])


def _exact_table(scheduler, loaded, dtype) -> None:
    """Replace the scheduler's table, a float32 cumprod of 1000 factors (relative error ~1e-5 at the end), by the
    one diffkit rebuilt in float64 from the same betas, rounded once to `dtype`."""
    scheduler.alphas_cumprod = loaded.path.alphas_cumprod.to(dtype)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)


def _parity(models, tmp_path, kind, beta, prediction, dtype, model="unet", cond=None):
    name, cls, options = SCHEDULERS[kind]
    scheduler = cls(beta_schedule=beta, prediction_type=prediction, **options)
    loaded = load_diffusers(_folder(models, tmp_path, model, scheduler), dtype=dtype)
    _exact_table(scheduler, loaded, dtype)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(2)
    expected = scheduler_sample(loaded, scheduler, latents, STEPS, cond=cond, generator=g)
    sigmas = _vp_grid(loaded, scheduler.timesteps)
    denoiser = loaded.denoiser if cond is None else (lambda x, s: loaded.denoiser(x, s, cond))
    # The scheduler's own start, in the scale-free state (Euler's init_noise_sigma is sigma_max, not
    # sqrt(1 + sigma_max^2), under linspace or trailing spacing: its first state is then sigma_max eps).
    x = latents * scheduler.init_noise_sigma * (1 if kind in SCALE_FREE else torch.sqrt(1 + sigmas[0] ** 2))
    got = samplers.get(name)(denoiser, x, sigmas, generator=torch.Generator().manual_seed(2))
    return got, expected


def _close32(got, expected):
    assert expected.abs().max() > 0.1  # the comparison is not between two zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_float32_parity(models, tmp_path, kind, beta, prediction):
    got, expected = _parity(models, tmp_path, kind, beta, prediction, torch.float32)
    _close32(got, expected)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_float64_parity(models, tmp_path, kind, beta, prediction):
    got, expected = _parity(models, tmp_path, kind, beta, prediction, torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind, model, cond", [  # class labels (long) or encoder hidden states (float)
    ("dpmpp_2m", "unet_labels", torch.tensor([0, 2, 1])),
    ("euler", "unet_text", torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(5))),
    ("ddim", "dit", torch.tensor([1, 0, 2])),
])
def test_conditioning_is_passed_through(models, tmp_path, kind, model, cond):
    _close32(*_parity(models, tmp_path, kind, "linear", "epsilon", torch.float32, model=model, cond=cond))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_parity(models, tmp_path, shift):
    """FlowMatchEuler from t = 0.98: its own grid starts at t = 1, where sigma is infinite (the scale-free state
    cannot hold it), so both run the scheduler's grid from a custom first time."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    loaded = load_diffusers(_folder(models, tmp_path, "unet", scheduler))
    assert loaded.prediction == "velocity"
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = scheduler_sample(loaded, scheduler, latents, sigmas=torch.linspace(0.98, 0.1, STEPS).tolist())
    t = scheduler.sigmas.to(torch.float64)
    sigmas = torch.cat([t[:-1] / (1 - t[:-1]), torch.zeros(1, dtype=torch.float64)])
    _close32(samplers.get("euler")(loaded.denoiser, latents / (1 - t[0]), sigmas), expected)


def test_ddim_pipeline_output_is_diffkit_ddim(models, tmp_path):
    """DDIMPipeline itself (not our copy of its loop), on a model that predicts x0, clamped as it clamps."""
    scheduler = diffusers.DDIMScheduler(prediction_type="sample", clip_sample=False)
    folder = tmp_path / "pipeline"
    diffusers.DDIMPipeline(unet=diffusers.UNet2DModel.from_pretrained(models / "unet"), scheduler=scheduler) \
        .save_pretrained(folder)
    loaded = load_diffusers(folder, dtype=torch.float64)
    pipe = diffusers.DDIMPipeline.from_pretrained(folder).to(torch.float64)
    _exact_table(pipe.scheduler, loaded, torch.float64)
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS, eta=0.0,
               output_type="pt").images
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = _vp_grid(loaded, pipe.scheduler.timesteps)
    got = samplers.get("ddim")(loaded.denoiser, latents * torch.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert ((out > 0) & (out < 1)).float().mean() > 0.5
    torch.testing.assert_close((got / 2 + 0.5).clamp(0, 1), out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", [*BETAS, "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers(beta, zero_snr):
    """The float64 rebuild equals the scheduler's float32 table; a zero terminal SNR leaves the last timestep (of
    infinite sigma) out of the path's range."""
    cls = diffusers.DDPMScheduler if beta == "sigmoid" else diffusers.DDIMScheduler
    scheduler = cls(beta_schedule=beta, rescale_betas_zero_snr=zero_snr, clip_sample=False)
    s = schedule.from_config(dict(scheduler.config, _class_name=cls.__name__))
    torch.testing.assert_close(s.path.alphas_cumprod.float(), scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)
    assert s.path.t_max == (999 / 1000 if zero_snr else 1.0)
    assert s.path.sigma_max == pytest.approx((1 / scheduler.alphas_cumprod[-2 if zero_snr else -1].item() - 1) ** 0.5,
                                             rel=1e-4)


def test_discrete_path_interpolation():
    """sigma is linear in the timestep between the knots (diffusers' Euler "linear" interpolation), t inverts it,
    and timestep i is t = (i + 1) / N. (diffusers' sigmas are float32 from 1 - alpha_bar, which near alpha_bar = 1
    keeps about four digits: hence rtol 2e-4.)"""
    path = schedule.from_config({"_class_name": "DDIMScheduler"}).path
    knots = torch.sqrt((1 - path.alphas_cumprod) / path.alphas_cumprod)
    assert path.sigma(torch.tensor([500 / 1000], dtype=torch.float64)).item() == pytest.approx(knots[499].item(), rel=1e-15)
    mid = path.sigma(torch.tensor([500.5 / 1000], dtype=torch.float64)).item()
    assert mid == pytest.approx(((knots[499] + knots[500]) / 2).item(), rel=1e-12)
    scheduler = diffusers.EulerDiscreteScheduler()
    scheduler.set_timesteps(7)  # linspace spacing: fractional timesteps (832.5, ...), sigmas interpolated
    t = (scheduler.timesteps.double() + 1) / 1000
    torch.testing.assert_close(path.sigma(t).float(), scheduler.sigmas[:-1], rtol=2e-4, atol=0)
    t = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (1 - 1e-3) + 1e-3
    torch.testing.assert_close(path.t(path.sigma(t)), t, rtol=1e-12, atol=1e-12)
    assert path.sigma(torch.tensor([0.0])).item() == 0 and path.t_min == 1e-3
    h = 1e-7
    torch.testing.assert_close(path.d_sigma(torch.tensor(0.5004)), (path.sigma(0.5004 + h) - path.sigma(0.5004 - h)) / (2 * h),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("key, value", [("beta_schedule", "laplace"), ("prediction_type", "flow_prediction"),
                                        ("timestep_type", "continuous"), ("clip_sample", True),
                                        ("thresholding", True), ("use_dynamic_shifting", True),
                                        ("_class_name", "LCMScheduler")])
def test_unsupported_config_values_name_the_key(key, value):
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler" if key == "use_dynamic_shifting" else "DDIMScheduler",
              key: value}
    with pytest.raises(ValueError, match=key):
        schedule.from_config(config)


def test_strict_false_waives_sampler_only_keys():
    assert schedule.from_config({"_class_name": "DDPMScheduler", "clip_sample": True}, strict=False).prediction == "eps"
    with pytest.raises(ValueError, match="timestep_type"):
        schedule.from_config({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}, strict=False)


def test_bad_folders_say_what_to_do(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="scheduler config"):
        load_diffusers(models / "unet")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((models / "unet" / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(FileNotFoundError, match="never loads"):
        load_diffusers(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_diffusers(folder)
