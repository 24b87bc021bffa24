from pathlib import Path

import pytest
import yaml

from diffkit import config
from diffkit.flows.tarflow import Flow

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
    else:
        assert model.prediction == cfg.model.prediction


def test_overrides_are_typed():
    cfg = config.load(None, ["train.lr=3e-4", "model.net=mlp", "data.conditional=true", "model.args={width: 8}"])
    assert cfg.train.lr == 3e-4 and cfg.data.conditional is True and cfg.model.args == {"width": 8}


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["train.lrr=1"], "unknown key 'lrr' in config.train; did you mean 'lr'"),
        (["modle.net=mlp"], "unknown key 'modle' in config; did you mean 'model'"),
        (["train.lr"], "must look like section.key=value"),
        (["train.steps=many"], "config.train.steps must be a number"),
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
