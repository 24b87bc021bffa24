"""`diffkit finetune` end to end on a tiny digits MLP trained on classes 0-4 and fine-tuned to 5-9: the new run
starts from the trained one with its output unchanged, trains only its adapters, writes them in safetensors,
samples the same merged or unmerged, resumes, and refuses what it cannot fine-tune with a clear error."""
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffkit import adapters, cli, run
from diffkit import config as configs
from diffkit.train import checkpoint

TINY = ["model.args={width: 32, depth: 1, emb: 16}", "train.batch=32", "train.warmup=2", "train.log_every=5",
        "train.checkpoint_every=1000", "sample.sampler=euler", "sample.steps=4"]
NEW = ["data.classes=[5,6,7,8,9]", "train.steps=6"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune") / "base"
    assert cli.main(["train", *TINY, "train.steps=20", "data.classes=[0,1,2,3,4]", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def lora_ga(base):
    folder = base.parent / "lora_ga"
    assert cli.main(["finetune", str(base), "--adapter", "lora_ga", "--rank", "4", "--out", str(folder), *NEW]) == 0
    return folder


def test_data_classes_keep_only_those_labels_in_both_splits():
    for split in ("train", "test"):
        x, _ = configs.dataset(configs.load(None, ["data.classes=[5,9]", "data.conditional=true"]), split)
        _, y = configs.dataset(configs.load(None, ["data.conditional=true"]), split)
        labels = configs.dataset(configs.load(None, ["data.classes=[5,9]", "data.conditional=true"]), split)[1]
        assert set(labels.tolist()) == {5, 9} and len(x) == int(((y == 5) | (y == 9)).sum())
    for bad in ("[]", "[1,1]", "[-1]", "5"):
        with pytest.raises(ValueError, match="data.classes must be"):
            configs.load(None, [f"data.classes={bad}"])
    with pytest.raises(ValueError, match="moons has none"):
        configs.load(None, ["data.name=moons", "data.classes=[0]"])
    with pytest.raises(ValueError, match="no sample of class 10"):
        configs.dataset(configs.load(None, ["data.classes=[3,10]"]))


@pytest.mark.parametrize("kind", adapters.KINDS)
def test_the_fine_tune_starts_from_the_trained_run_unchanged(base, kind):
    cfg = configs.derive(run.load_run(base)[0], ["model.init=" + str(base), f"model.adapter.name={kind}",
                                                  "model.adapter.rank=4", *NEW])
    x, y = configs.dataset(cfg)
    start = configs.model(cfg, (1, 8, 8), 0)
    start.load_state_dict(run.start_weights(cfg, (1, 8, 8), 0, x, y))
    trained = run.load_run(base)[1].cpu()
    z, sigma = torch.randn(8, 1, 8, 8), torch.logspace(-2, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(start(z, sigma), trained(z, sigma), atol=1e-5, rtol=1e-5)


def test_only_the_adapters_train_and_they_are_saved_in_safetensors(base, lora_ga):
    cfg = yaml.safe_load((lora_ga / "config.yaml").read_text())["config"]
    assert cfg["model"]["init"] == str(base) and cfg["data"]["classes"] == [5, 6, 7, 8, 9]
    assert cfg["train"]["ema_rampup"] == 0.05  # the base run's 0 would keep its weights in the EMA
    assert cfg["model"]["adapter"] == {"name": "lora_ga", "rank": 4, "alpha": None, "targets": "all",
                                           "grad_batches": 8}
    before, after = checkpoint.load_latest(base).ema, checkpoint.load_latest(lora_ga).ema
    frozen = [k for k in after if ".lora_" not in k and ".base_layer." not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # LayerNorm, Fourier features
    saved = load_file(lora_ga / "adapter.safetensors")
    layers = {k.removeprefix("net.").rsplit(".lora_A", 1)[0] for k in after if ".lora_A." in k}
    assert set(saved) == {f"net.{n}.{part}" for n in layers
                          for part in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight")}
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert any(not torch.equal(after[k], before[k.replace(".base_layer", "")]) for k in saved if "base_layer" in k)


def test_samples_are_the_same_merged_or_unmerged(lora_ga):
    kw = dict(sampler=None, steps=None, n=16, seed=3, progress=False)
    plain, merged = (load_file(run.sample_run(lora_ga, merge=m, **kw) / "samples.safetensors")["samples"]
                     for m in (False, True))
    assert not torch.equal(plain, merged)  # merging changed the arithmetic ...
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)  # ... not the samples
    with pytest.raises(ValueError, match="no adapters to merge"):
        run.sample_run(lora_ga.parent / "base", merge=True, **kw)


def test_a_fine_tune_resumes_like_any_run(base, lora_ga):
    assert checkpoint.load_latest(lora_ga).step == 6
    args = ["finetune", str(base), "--adapter", "lora_ga", "--rank", "4", "--out", str(lora_ga), *NEW]
    assert cli.main([*args, "train.steps=9"]) == 0
    assert checkpoint.load_latest(lora_ga).step == 9


def test_bad_fine_tunes_are_clear_errors(base, lora_ga, tmp_path, monkeypatch):
    def fails(argv, match):
        with pytest.raises(SystemExit, match=match):
            cli.main(["finetune", *argv, "--out", str(tmp_path / "new")])
    fails([str(tmp_path / "nowhere")], "not found")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "has no checkpoints: train it first")
    fails([str(lora_ga)], "itself fine-tuned with lora_ga adapters: fine-tune its base run")
    fails([str(base), "--adapter", "dora"], "unknown --adapter 'dora'")
    fails([str(base), "--rank", "40"], "rank 40 exceeds layer")
    fails([str(base), "data.conditional=true"], "has 5 classes and .* built for 0: keep its data.conditional")
    monkeypatch.setitem(sys.modules, "peft", None)
    fails([str(base)], r"pip install 'diffkit\[lora\]'")
    assert not (tmp_path / "new").exists()


def test_svd_adapters_on_a_conv_net_are_refused_before_any_work():
    cfg = configs.load(None, ["model.net=unet", "model.init=x", "model.adapter.name=pissa"])
    with pytest.raises(ValueError, match="Conv2d layers .* model.adapter.targets=linear"):
        configs.model(cfg, (1, 8, 8), 0)
    linear = configs.model(configs.derive(cfg, ["model.adapter.targets=linear"]), (1, 8, 8), 0)
    convs = [m for m in linear.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and not any(p.requires_grad for m in convs for p in m.parameters())


def test_sid_runs_take_no_adapters():
    with pytest.raises(ValueError, match="objective.name=sid takes no model.adapter"):
        configs.model(configs.load(None, ["objective.name=sid", "model.init=x", "model.adapter.name=lora"]), (2,), 0)
