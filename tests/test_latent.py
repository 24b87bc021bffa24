"""Latent diffusion: a run on a frozen tokenizer's latents, scaled to sigma_data, sampled through its decoder."""
import pytest
import torch

from diffkit import config as configs
from diffkit import generate, latent, run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    tok = configs.load("configs/digits-vq.yaml", ["model.args.bottleneck=continuous", "model.args.channels=8",
                                                  "train.steps=20", "train.batch=64"])
    run.train_run(tok, root / "tok", progress=False)
    cfg = configs.load("configs/digits-latent.yaml", [f"data.tokenizer={root / 'tok'}", "train.steps=20",
                                                      "train.batch=64", "model.args={width: 32, depth: 1}"])
    run.train_run(cfg, root / "lat", progress=False)
    return root


def test_latents_are_the_encoder_output_scaled_to_sigma_data(runs):
    cfg = run.load_run(runs / "lat")[0]
    x, _ = configs.dataset(cfg, "train")
    z = latent.encode(cfg, x)
    model, shape, _ = latent.tokenizer(runs / "tok")
    assert shape == (1, 8, 8) and z.shape == (len(x), 4, 4, 4)
    assert z.double().std().item() == pytest.approx(cfg.model.sigma_data, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(x) * latent.scale(cfg))
        # Decoding undoes the scale: decode(encode(x)) is the tokenizer's own reconstruction.
        torch.testing.assert_close(latent.decode(cfg, z), model(x)[0], atol=1e-5, rtol=1e-4)


def test_a_latent_run_samples_images_through_the_decoder(runs):
    cfg, model, shape, _ = run.load_run(runs / "lat")
    assert shape == (4, 4, 4)
    images, nfe = generate.sample(model, cfg, shape, 6, sampler="euler", steps=4, progress=False)
    plain = configs.derive(cfg, ["data.tokenizer=null"])  # the same model, its latents left undecoded
    z, _ = generate.sample(model, plain, shape, 6, sampler="euler", steps=4, progress=False)
    assert images.shape == (6, 1, 8, 8) and nfe == 4
    torch.testing.assert_close(images, latent.decode(cfg, z))
    result = run.eval_run(runs / "lat", sampler="euler", steps=4, n=50, seed=0)
    assert result["digits_fd"] > 0 and result["real_data_floor"]["digits_fd"] < result["digits_fd"]


def test_latent_run_errors(runs, tmp_path):
    base = ["train.steps=2", "model.args={width: 8, depth: 1}"]
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        run.train_run(configs.load("configs/digits-latent.yaml", base + [f"data.tokenizer={tmp_path / 'none'}"]),
                      tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="not a tokenizer run"):
        run.train_run(configs.load("configs/digits-latent.yaml", base + [f"data.tokenizer={runs / 'lat'}"]),
                      tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="was trained on images of shape"):
        run.train_run(configs.load("configs/digits-latent.yaml", base + [f"data.tokenizer={runs / 'tok'}",
                                                                         "data.name=checkerboard"]),
                      tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="not on another tokenizer's latents"):
        configs.model(configs.load("configs/digits-vq.yaml", [f"data.tokenizer={runs / 'tok'}"]), (1, 8, 8), 0)
    with pytest.raises(ValueError, match="no bits/dim of the data"):
        run.likelihood_run(runs / "lat", n=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reflow_of_a_latent_flow_draws_latent_couples_and_decodes(runs, tmp_path):
    from diffkit import registry

    flow = configs.load("configs/digits-latent.yaml", [f"data.tokenizer={runs / 'tok'}", "train.steps=10",
                                                       "train.batch=64", "model.args={width: 32, depth: 1}",
                                                       "model.path=rectified_flow", "model.prediction=velocity"])
    run.train_run(flow, tmp_path / "flow", progress=False)
    out = run.derive_run(registry.commands()["reflow"], tmp_path / "flow", tmp_path / "rf", progress=False,
                         options={"n": 16, "sampler": "euler", "steps": 2, "grid": "uniform_t", "seed": 0,
                                  "distill": 0}, overrides=["train.steps=2"])
    cfg, model, shape, _ = run.load_run(out)
    assert shape == (4, 4, 4) and cfg.data.tokenizer == str(runs / "tok")
    x, _ = configs.dataset(cfg, "train")
    assert x.shape == (16, 2, 4, 4, 4) and torch.equal(latent.encode(cfg, x), x)  # couples are latents already
    result = run.eval_run(out, sampler=None, steps=None, n=16, seed=0)
    assert result["digits_fd"] > 0 and result["real_data_floor"]["digits_fd"] > 0
