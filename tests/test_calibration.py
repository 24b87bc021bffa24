"""`diffkit calibrate` and `--grid calibrated` on trained runs: stored, reused, keyed by guidance, clear errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit import calibration, cli, generate, run, samplers
from diffkit import config as configs
from diffkit.samplers.noise import GaussianNoise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal") / "cb"
    cfg = configs.load(ROOT / "configs" / "checkerboard-fm.yaml",
                       ["train.steps=300", "model.args={width: 64, depth: 3}", "train.checkpoint_every=300",
                        "train.warmup=20", "sample.steps=8"])
    run.train_run(cfg, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal") / "digits"
    cfg = configs.load(None, ["data.conditional=true", "train.steps=60", "train.warmup=5", "train.checkpoint_every=60",
                              "model.args={width: 32, depth: 2}", "train.batch=64"])
    run.train_run(cfg, folder, progress=False)
    return folder


def endpoint_error(model, sigmas, x, reference, sampler="dpmpp_2m"):
    return (samplers.get(sampler)(model, x, sigmas) - reference).norm(dim=1).median().item()


def test_calibrated_grid_is_stored_and_beats_the_config_grid_on_unseen_noise(flow_run, tmp_path):
    assert cli.main(["calibrate", str(flow_run), "--sampler", "dpmpp_2m", "--steps", "4", "--n", "128"]) == 0
    record = json.loads((flow_run / "grids" / "dpmpp_2m-4steps.json").read_text())
    assert record["calibration_error"] < record["config_grid_error"]
    assert record["checkpoint_step"] == 300 and record["sampler_runs"] > 0 and record["guidance"] is None
    cfg, model, shape, _ = run.load_run(flow_run)
    sigmas = torch.tensor(record["sigmas"], dtype=torch.float64)
    # Sample noise the calibration never saw: the stored grid solves the model's own ODE better than the
    # config's grid at the same 4 steps.
    with torch.no_grad():
        x = sigmas[0].item() * GaussianNoise(7, 256).sample(shape)
        reference = samplers.rk45(model, x, torch.tensor([sigmas[0].item(), 1e-4, 0.0], dtype=torch.float64),
                                  rtol=1e-6, atol=1e-6)
        ours = endpoint_error(model, sigmas, x, reference)
        config_grid = endpoint_error(model, generate.grid(cfg, 4), x, reference)
    assert ours < config_grid / 2, (ours, config_grid)
    # --grid calibrated samples on exactly that grid.
    assert cli.main(["sample", str(flow_run), "--grid", "calibrated", "--sampler", "dpmpp_2m", "--steps", "4",
                     "--n", "16", "--out", str(tmp_path / "s")]) == 0
    expected, nfe = generate.sample(model, cfg, shape, 16, sampler="dpmpp_2m", sigmas=sigmas, progress=False)
    torch.testing.assert_close(load_file(tmp_path / "s" / "samples.safetensors")["samples"], expected)
    assert nfe == 4


def test_missing_grid_names_the_command_to_run(flow_run):
    with pytest.raises(SystemExit, match=r"no calibrated grid for dpmpp_2m at 5 steps: make it with "
                                         r"`diffkit calibrate .* --sampler dpmpp_2m --steps 5`"):
        cli.main(["eval", str(flow_run), "--grid", "calibrated", "--sampler", "dpmpp_2m", "--steps", "5", "--n", "8"])


def test_calibrate_refuses_what_it_cannot_calibrate(flow_run):
    with pytest.raises(SystemExit, match="calibrated grids are for deterministic fixed-grid samplers"):
        cli.main(["calibrate", str(flow_run), "--sampler", "ddpm", "--steps", "4"])
    with pytest.raises(SystemExit, match="unknown sampler"):
        cli.main(["calibrate", str(flow_run), "--sampler", "dpmpp2m", "--steps", "4"])
    with pytest.raises(SystemExit, match="trained without labels"):
        cli.main(["calibrate", str(flow_run), "--steps", "4", "--guidance", "2"])


def test_a_stale_grid_warns(flow_run, tmp_path):
    path = calibration.grid_file(flow_run, "euler", 3)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"sigmas": [80.0, 1.0, 0.1, 0.0], "checkpoint_step": 100}))
    with pytest.warns(UserWarning, match="calibrated at step 100 and the run is now at step 300"):
        run.sample_run(flow_run, sampler="euler", steps=3, n=4, seed=0, grid="calibrated", out=tmp_path / "o",
                       progress=False)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a calibrated grid"):
        run.sample_run(flow_run, sampler="euler", steps=3, n=4, seed=0, grid="calibrated", progress=False)


def test_guided_grids_are_kept_per_guidance_scale(cond_run, tmp_path):
    record = run.calibrate_run(cond_run, sampler="euler", steps=3, n=32, guidance=2.0, progress=False)
    assert record["guidance"] == 2.0 and (cond_run / "grids" / "euler-3steps-w2.json").exists()
    assert record["calibration_error"] <= record["config_grid_error"]
    folder = run.sample_run(cond_run, sampler="euler", steps=3, n=8, seed=0, guidance=2.0, grid="calibrated",
                            progress=False)
    assert folder.name == "samples-euler-calibrated-3nfe-n8-seed0-w2"
    with pytest.raises(FileNotFoundError, match="--guidance 3`"):
        run.sample_run(cond_run, sampler="euler", steps=3, n=8, seed=0, guidance=3.0, grid="calibrated",
                       progress=False)
    with pytest.raises(FileNotFoundError, match="no calibrated grid for euler at 3 steps: make it"):
        run.sample_run(cond_run, sampler="euler", steps=3, n=8, seed=0, grid="calibrated", progress=False)


def test_guidance_without_a_label_samples_the_classes_evenly(cond_run):
    _, model, _, n_classes = run.load_run(cond_run)
    seen = []
    model_call = model.forward
    guided = generate.denoiser(lambda x, s, c: seen.append(c) or model_call(x, s, c), range(5, 30), guidance=2.0,
                               label=None, n_classes=n_classes, device=torch.device("cpu"))
    guided(torch.zeros(25, 1, 8, 8), torch.full((25,), 1.0))
    labels = seen[0][:25]  # the conditional half of the one batched guided call
    assert labels.tolist() == [i % n_classes for i in range(5, 30)]
