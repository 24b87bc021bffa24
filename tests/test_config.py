import re
from pathlib import Path

import pytest
import yaml

from diffkit import config, generate
from diffkit.codecs.tokenizer import Tokenizer
from diffkit.flows.tarflow import Flow
from diffkit.samplers.advice import few_step_warning

ROOT = Path(__file__).resolve().parents[1]


def test_digits_yaml_is_the_builtin_default():
    assert config.load(ROOT / "configs" / "digits.yaml") == config.Config()
    # Every key, not only those the file has: a default added or changed in the code must show in the file.
    raw = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    assert raw == config.to_dict(config.Config())


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_build(name):
    cfg = config.load(ROOT / "configs" / name)
    x, y = config.dataset(cfg)
    model = config.model(cfg, tuple(x.shape[1:]), config.num_classes(cfg, y))
    config.objective(cfg, config.num_classes(cfg, y))
    if cfg.model.net == "tarflow":  # a flow: no path or prediction
        assert isinstance(model, Flow)
    elif cfg.objective.name == "tokenizer":  # a codec: no path, no sampling
        assert isinstance(model, Tokenizer)
        return
    else:
        assert model.prediction == cfg.model.prediction
    # No shipped recipe samples by default with a setting the few-step rule warns about.
    assert few_step_warning(cfg.sample.sampler, generate.grid(cfg)) is None


def test_overrides_are_typed():
    cfg = config.load(None, ["train.lr=3e-4", "model.net=mlp", "data.conditional=true", "model.args={width: 8}"])
    assert cfg.train.lr == 3e-4 and cfg.data.conditional is True and cfg.model.args == {"width": 8}


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["train.lrr=1"], "unknown key 'lrr' in config.train; did you mean 'lr'"),
        (["modle.net=mlp"], "unknown key 'modle' in config; did you mean 'model'"),
        (["train.lr"], "must look like section.key=value"),
        (["train.steps=many"], "config.train.steps must be an integer"),
    ],
)
def test_typos_name_the_nearest_key(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        config.load(None, overrides)


def test_net_argument_typo_is_caught():
    cfg = config.load(None, ["model.args={widht: 8}"])
    with pytest.raises(ValueError, match="did you mean 'width'"):
        config.model(cfg, (1, 8, 8), 0)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model.path 'vpp'"):
        config.model(config.load(None, ["model.path=vpp"]), (2,), 0)
    with pytest.raises(ValueError, match="unknown data.name"):
        config.dataset(config.load(None, ["data.name=cifar"]))
    with pytest.raises(FileNotFoundError):
        config.load("no/such.yaml")


BAD = [  # (overrides, what the message must say): each refused when the config is made, before any work
    (["sample.sampler=hune"], "sample.sampler: unknown sampler 'hune'. Did you mean heun"),
    (["sample.grid=karas"], "did you mean 'karras'"),
    (["train.steps=0"], "train.steps must be a positive integer, got 0"),
    (["train.steps=-5"], "train.steps must be a positive integer, got -5"),
    (["train.steps=2.7"], "train.steps must be an integer, got 2.7"),
    (["train.batch=0"], "train.batch must be a positive integer"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be a positive integer"),
    (["train.log_every=0"], "train.log_every must be a positive integer"),
    (["data.n=0"], "data.n must be a positive integer"),
    (["train.precision=fp16"], "fp16 is not supported"),
    (["train.micro_batch=1000"], "train.micro_batch must be in"),
    (["train.lr=-1e-3"], "train.lr must be >= 0"),
    (["train.steps.x=1"], "train.steps must be an integer"),
    (["data.name=checkerboard", "data.conditional=true"], "checkerboard has none"),
    (["data.name=folder"], "needs data.source"),
    (["model.path=vp"], "unknown model.path 'vp'"),
    (["train.cosine=1"], "train.cosine must be true or false"),
    (["train.parallel=fsdp2"], "unknown train.parallel 'fsdp2'; did you mean 'fsdp'"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_values_are_refused_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config.load(None, overrides)


def test_a_bad_config_writes_nothing_and_trains_nothing(tmp_path):
    from diffkit import cli

    with pytest.raises(SystemExit, match="sample.sampler"):
        cli.main(["train", "sample.sampler=hune", "train.steps=5", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_config_files_that_are_not_configs_are_named(tmp_path):
    for text, message in (("train: [1, 2\n", "is not valid YAML"), ("- 1\n- 2\n", "must hold a mapping"),
                          (b"\xff\xfe\x00garbage", "is not valid YAML")):
        path = tmp_path / "bad.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} {message}"):
            config.load(path)


def test_model_args_are_checked_against_the_net(tmp_path):
    cfg = config.load(None, ["model.args.width=abc"])
    with pytest.raises(ValueError, match="model.args .* do not build a mlp"):
        config.model(cfg, (1, 8, 8), 0)
    unet = config.load(None, ["model.net=unet", "model.args={channels: 32, channel_mult: [1, 2], attn_resolutions: []}"])
    assert type(config.model(unet, (1, 8, 8), 0).net).__name__ == "UNet"  # the MLP's args no longer leak into it
    plain = config.load(None, ["model.net=unet"])  # its own defaults, attention at half the image side
    assert type(config.model(plain, (1, 8, 8), 0).net).__name__ == "UNet"
