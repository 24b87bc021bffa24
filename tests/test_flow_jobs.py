"""Flows and likelihood through the jobs: a TARFLOW run trains, samples and scores like any run, and
`diffkit eval --likelihood` gives every run kind's bits/dim by the rule its method states.

Each test checks what the job computed against the library call it must have made, not only that it ran.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit import cli, likelihood, run
from diffkit import config as configs
from diffkit import data as datasets
from diffkit.flows.tarflow import Flow, tarflow_sample
from diffkit.samplers.noise import GaussianNoise

ROOT = Path(__file__).resolve().parents[1]
TINY_FLOW = ["model.args={patch_size: 2, width: 16, blocks: 2, layers: 1, heads: 2}", "train.batch=32",
             "train.steps=3", "train.warmup=1", "train.log_every=1", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flows") / "tarflow"
    assert cli.main(["train", str(ROOT / "configs" / "digits-tarflow.yaml"), *TINY_FLOW, "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def cond_flow_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flows") / "tarflow-cfg"
    assert cli.main(["train", str(ROOT / "configs" / "digits-tarflow-cfg.yaml"), *TINY_FLOW, "--out", str(folder)]) == 0
    return folder


def noise(seed: int, n: int, shape) -> torch.Tensor:
    return GaussianNoise(seed, indices=range(n)).sample(tuple(shape))


def test_a_flow_run_is_a_flow_sampled_by_inverting_it(flow_run, tmp_path):
    cfg, model, shape, n_classes = run.load_run(flow_run)
    assert isinstance(model, Flow) and shape == (1, 8, 8) and n_classes == 0
    assert "tarflow, 1 NFE" in (flow_run / "report.md").read_text()
    assert cli.main(["sample", str(flow_run), "--n", "6", "--seed", "2", "--out", str(tmp_path / "s")]) == 0
    got = load_file(tmp_path / "s" / "samples.safetensors")["samples"]
    # Trained on dequantized pixels (no Gaussian noise), so no denoising step: the inverse of the seeded noise.
    torch.testing.assert_close(got, tarflow_sample(model, noise(2, 6, shape)), rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="own sampler.*not 'heun'"):
        cli.main(["sample", str(flow_run), "--sampler", "heun", "--n", "2"])


def test_the_conditional_flow_denoises_and_guides(cond_flow_run, tmp_path):
    cfg, model, shape, n_classes = run.load_run(cond_flow_run)
    assert n_classes == 10 and cfg.objective.args == {"noise": "gaussian", "sigma": 0.05}
    argv = ["sample", str(cond_flow_run), "--n", "4", "--seed", "1", "--label", "3", "--guidance", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "g")]) == 0
    assert "tarflow, 3 NFE" in (tmp_path / "g" / "report.md").read_text()  # guided inverse (2) + Tweedie (1)
    got = load_file(tmp_path / "g" / "samples.safetensors")["samples"]
    labels = torch.full((4,), 3)
    want = tarflow_sample(model, noise(1, 4, shape), cond=labels, guidance=2.0, null=10, denoise_sigma=0.05)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    raw = tarflow_sample(model, noise(1, 4, shape), cond=labels, guidance=2.0, null=10)
    assert (raw - got).abs().max() > 1e-4  # the denoising step did something
    with pytest.raises(SystemExit, match="pass --label"):
        cli.main(["sample", str(cond_flow_run), "--n", "2", "--guidance", "2"])


def test_flow_bits_per_dim_is_its_exact_density_of_dequantized_pixels(flow_run, capsys):
    assert cli.main(["eval", str(flow_run), "--likelihood", "--n", "50", "--seed", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg, model, _, _ = run.load_run(flow_run)
    held, _ = configs.dataset(cfg, "test")
    x = datasets.dequantize(held[:50], levels=17, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        bpd = datasets.dequantized_bits(model.log_prob(x).double(), dims=64, levels=17)
    assert result["how"] == "exact" and result["n"] == 50 and result["levels"] == 17
    assert result["bits_per_dim"] == pytest.approx(bpd.mean().item(), rel=1e-6)
    assert json.loads((flow_run / "likelihood-50-seed4.json").read_text()) == result


def test_diffusion_likelihood_is_its_probability_flow_likelihood(tmp_path):
    # On continuous data (a 2-D toy) the job reports nats per dimension of the held-out points, undequantized.
    folder = tmp_path / "edm"
    run.train_run(configs.load(None, ["data.name=checkerboard", "data.n=256", "model.args={width: 32, depth: 2}",
                                      "train.steps=20", "train.batch=64", "train.warmup=1", "sample.steps=2"]),
                  folder, progress=False)
    result = run.likelihood_run(folder, n=16, seed=0, progress=False)
    cfg, model, _, _ = run.load_run(folder)
    held, _ = configs.dataset(cfg, "test")
    want = likelihood.log_likelihood(model, held[:16], sigma_min=0.002, sigma_max=80.0)
    assert result["how"] == "probability-flow ODE from sigma 0.002 to 80, exact trace" and "bits_per_dim" not in result
    assert result["nats_per_dim"] == pytest.approx((-want.double() / 2).mean().item(), rel=1e-5)


def test_a_one_step_generator_has_no_likelihood(tmp_path):
    folder = tmp_path / "sc"
    run.train_run(configs.load(ROOT / "configs" / "checkerboard-shortcut.yaml",
                               ["data.n=64", "model.args={width: 16, depth: 1}", "train.steps=1", "train.batch=16",
                                "train.warmup=1"]), folder, progress=False)
    with pytest.raises(ValueError, match="shortcut run, whose model defines no likelihood"):
        run.likelihood_run(folder, progress=False)
