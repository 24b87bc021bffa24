"""diffkit runs as diffusers pipelines: `diffkit export RUN --to diffusers OUT`, then diffusers (or diffkit again)
loads OUT offline and samples what the run samples."""
import json
from pathlib import Path

import pytest
import torch

from diffkit import cli, run, samplers
from diffkit import export as export_job
from diffkit import config as configs
from diffkit.interop.diffusers import export, load_diffusers, scheduler_sample

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.args={block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4, attention_head_dim: 4}"]


def _model(*overrides):
    cfg = configs.load(ROOT / "configs" / "digits-diffusers.yaml", [*TINY, *overrides])
    torch.manual_seed(0)
    model = configs.model(cfg, (1, 8, 8), 0).eval()
    for p in model.parameters():  # random nets give O(1) outputs; a smaller scale keeps samples in range
        p.data.mul_(0.5)
    return cfg, model


def _grid(path, timesteps):
    """The run's own (continuous) path at the scheduler's timesteps, t = (i + 1) / N, then 0."""
    t = (timesteps.to(torch.float64) + 1) / 1000
    return torch.cat([path.sigma(t), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("path, prediction", [("vp_linear", "eps"), ("vp_linear", "v"), ("vp_cosine", "x0")])
def test_exported_ddim_pipeline_samples_as_diffkit_ddim(tmp_path, path, prediction):
    cfg, model = _model(f"model.path={path}", f"model.prediction={prediction}")
    out = export(model, configs.path(cfg), prediction, tmp_path / "pipe")
    pipe = diffusers.DDIMPipeline.from_pretrained(out).to(torch.float64)
    # diffusers' table is a float32 cumprod: use the float64 one of the same (float64, exported) betas.
    loaded = load_diffusers(out, dtype=torch.float64)
    pipe.scheduler.alphas_cumprod = loaded.path.alphas_cumprod
    pipe.scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if prediction == "x0":  # the pipeline itself, whose output is clamped to [0, 1] (x0 stays in range)
        got = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=6,
                   output_type="pt").images
        assert ((got > 0) & (got < 1)).float().mean() > 0.5
    else:  # its loop, unclamped
        got = scheduler_sample(loaded, pipe.scheduler, latents, 6)
    sigmas = _grid(configs.path(cfg), pipe.scheduler.timesteps)
    x = samplers.get("ddim")(model.double(), latents * torch.sqrt(1 + sigmas[0] ** 2), sigmas)
    want = (x / 2 + 0.5).clamp(0, 1) if prediction == "x0" else x
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_exported_flow_reloads_as_the_same_denoiser(tmp_path):
    cfg, model = _model("model.path=rectified_flow", "model.prediction=velocity", "objective.density=logit_normal",
                        "model.args.time_offset=0")
    out = export(model, configs.path(cfg), "velocity", tmp_path / "flow")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"
    loaded = load_diffusers(out, dtype=torch.float64)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(loaded.denoiser(x, sigma), model.double()(x, sigma), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["model.net=unet", "model.args={}"], "only runs with model.net: diffusers_unet2d"),
    (["model.prediction=edm"], "prediction 'edm' has no diffusers prediction_type"),
    (["model.path=rectified_flow", "model.prediction=velocity", "model.shift=3"], "shifted flow"),
    (["model.path=rectified_flow", "model.prediction=velocity"], "time_offset: 0"),
    (["model.path=edm", "model.prediction=eps"], "does not export"),
])
def test_runs_that_cannot_export_say_why(tmp_path, overrides, match):
    cfg = configs.load(ROOT / "configs" / "digits-diffusers.yaml", [*TINY, *overrides])
    model = configs.model(cfg, (1, 8, 8), 0)
    with pytest.raises(ValueError, match=match):
        export(model, configs.path(cfg), cfg.model.prediction, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_labels_travel_as_class_embeddings(tmp_path):
    """A conditional run's labels (and its null label, the last embedding) export as UNet2DModel class embeddings;
    `diffkit sample --label` samples the exported folder, and no label is a clear error."""
    cfg = configs.load(ROOT / "configs" / "digits-diffusers.yaml", [*TINY, "data.conditional=true"])
    out = export(configs.model(cfg, (1, 8, 8), 10), configs.path(cfg), "v", tmp_path / "pipe")
    assert diffusers.DDPMPipeline.from_pretrained(out).unet.config.num_class_embeds == 11
    assert cli.main(["sample", str(out), "--steps", "3", "--n", "4", "--label", "7"]) == 0
    assert list(out.glob("samples-dpmpp_2m-karras-3nfe-n4-seed0-label7/samples.png"))
    with pytest.raises(SystemExit, match="class-conditional: pass class labels"):
        cli.main(["sample", str(out), "--steps", "3", "--n", "4"])


def test_train_export_sample_eval_from_the_command_line(tmp_path, capsys):
    """A two-step run of configs/digits-diffusers.yaml through the CLI: exported, then sampled and scored as a
    diffusers folder."""
    folder = tmp_path / "run"
    assert cli.main(["train", str(ROOT / "configs" / "digits-diffusers.yaml"), *TINY, "train.steps=2",
                     "train.batch=16", "train.warmup=1", "sample.steps=2", "--out", str(folder)]) == 0
    out = tmp_path / "exported"
    assert cli.main(["export", str(folder), str(out), "--to", "diffusers"]) == 0
    with pytest.raises(SystemExit, match="exists: pass a new folder"):
        cli.main(["export", str(folder), str(out), "--to", "diffusers"])
    assert cli.main(["sample", str(out), "--steps", "3", "--n", "4"]) == 0
    with pytest.raises(SystemExit, match="--data"):
        cli.main(["eval", str(out), "--n", "8"])
    with pytest.raises(SystemExit, match="shape"):
        cli.main(["eval", str(out), "--n", "8", "--data", "moons"])
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--n", "40", "--steps", "3", "--data", "digits"]) == 0
    assert "digits_fd" in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit, match="diffusers folder: `diffkit sample`"):
        cli.main(["calibrate", str(out)])


def test_any_run_exports_in_the_diffkit_format(tmp_path, capsys):
    """`--to diffkit`: weights.safetensors + diffkit.yaml, read back by load_export to the run's own model;
    load_diffusers does not claim the folder."""
    cfg = configs.load(None, ["train.steps=4", "train.batch=16", "model.args={width: 16, depth: 1}"])
    run.train_run(cfg, tmp_path / "run", progress=False)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--to", "diffkit"]) == 0
    assert "load_export" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["diffkit.yaml", "weights.safetensors"]
    cfg_x, model_x, shape, n_classes = export_job.load_export(tmp_path / "out")
    cfg_r, model_r, shape_r, _ = run.load_run(tmp_path / "run")
    assert configs.to_dict(cfg_x) == configs.to_dict(cfg_r) and shape == shape_r == (1, 8, 8) and n_classes == 0
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(model_x(x, sigma), model_r.cpu()(x, sigma))
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_diffusers(tmp_path / "out")
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--to", "diffkit"])
    with pytest.raises(ValueError, match="not a diffkit export"):
        export_job.load_export(tmp_path / "run")
