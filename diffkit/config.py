"""Run configs: YAML files mapped onto dataclasses, overridden by `key=value`, and built into objects.

A mistyped key is an error naming the nearest valid key. The defaults are the built-in digits recipe
(`diffkit demo`); configs/*.yaml in the repository are the named recipes. The config is saved with every
checkpoint, so sampling always uses the path, parametrization and training density the model was trained with.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from diffkit import data as datasets
from diffkit import adapters, grids, paths, registry, samplers
from diffkit.adapters import AdapterSettings
from diffkit.onestep import reflow
from diffkit.precond import PREDICTIONS, Precond
from diffkit.train import clip, distributed, optim, spectral
from diffkit.train.loop import TrainSettings


@dataclass
class DataConfig:
    name: str = "digits"  # a toy name, "digits", "photos", "folder" or "hf"
    source: str | None = None  # folder path or Hugging Face dataset name
    size: int | None = None  # image side for folder / hf; patch side for photos (default 32)
    stride: int | None = None  # photos: the patches' stride (default: their side, no overlap)
    channels: int = 3
    n: int = 20000  # points drawn for a toy
    conditional: bool = False  # train with labels (and label dropout for guidance)
    couples: str | None = None  # reflow: train on the (noise, sample) couples in this folder instead
    tokenizer: str | None = None  # latent diffusion: train on the latents of this tokenizer run (diffkit.latent)
    classes: list | None = None  # keep only the samples with these labels, in both splits; null: all


@dataclass
class ModelConfig:
    net: str = "mlp"  # mlp | unet | dit | diffusers_unet2d (denoiser backbones) | tarflow (a flow) | autoencoder
    args: dict = field(default_factory=dict)  # the net's keyword arguments; {} = its own defaults
    path: str = "edm"  # vp_linear | vp_cosine | ve | edm | rectified_flow
    shift: float = 1.0  # log-SNR shift scale (Shifted path) when != 1
    prediction: str = "edm"  # eps | x0 | v | velocity | score | edm
    sigma_data: float = 0.5
    init: str | None = None  # a run folder: its EMA weights start the net (reflow, finetune) or are SiD's teacher
    adapter: AdapterSettings = field(default_factory=AdapterSettings)  # low-rank adapters (diffkit.adapters)


@dataclass
class ObjectiveConfig:
    name: str = "denoising"  # a method of diffkit.registry: denoising | shortcut | reflow | sid | tarflow | tokenizer
    args: dict = field(default_factory=dict)  # the method's own options (its objective's keyword arguments)
    density: str = "lognormal"  # uniform | lognormal | logit_normal
    density_args: dict = field(default_factory=dict)
    weighting: str = "uniform"  # uniform | edm | min_snr
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.1  # used only when data.conditional


@dataclass
class SampleConfig:
    sampler: str = "heun"
    steps: int = 18
    grid: str = "karras"  # karras | uniform_t | log_snr | distill (a reflow-distilled model's own times)
    rho: float = 7.0
    sigma_min: float | None = None  # default: the path's range
    sigma_max: float | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    sample: SampleConfig = field(default_factory=SampleConfig)


PATHS = {"vp_linear": paths.VPLinear, "vp_cosine": paths.VPCosine, "ve": paths.VE, "edm": paths.EDM,
         "rectified_flow": paths.RectifiedFlow}


def _unknown(key: str, valid, where: str) -> ValueError:
    near = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown key {key!r} in {where}{hint}")


def _coerce(value, annotation: str, where: str):
    """YAML 1.1 reads 3e-4 as a string: convert to the field's number type, or say what is wrong (2.7 is not an
    integer; a mapping is not a number)."""
    kind = annotation.split(" | ")[0]
    if isinstance(value, str) and "str" in annotation.split(" | ")[1:]:  # a number or a name (grad_clip: auto)
        try:
            return float(value)
        except ValueError:
            return value  # validate checks the name
    if value is None or kind not in ("float", "int", "bool", "str", "dict"):
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping ({{key: value, ...}}), got {value!r}")
        return value
    if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a folder or dataset named 123
    if kind in ("bool", "str"):
        if not isinstance(value, {"bool": bool, "str": str}[kind]):
            raise ValueError(f"{where} must be {'true or false' if kind == 'bool' else 'a string'}, got {value!r}")
        return value
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (kind == "int" and not number.is_integer()):
        raise ValueError(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    return int(number) if kind == "int" else number


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, fields, where)
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        nested = sub is not None and dataclasses.is_dataclass(sub())
        kwargs[key] = _build(type(sub()), value, f"{where}.{key}") if nested else _coerce(value, str(fields[key].type), f"{where}.{key}")
    return cls(**kwargs)


def from_dict(values: dict) -> Config:
    """Config from nested dicts; missing keys take the defaults, unknown keys and bad values are errors."""
    if not isinstance(values or {}, dict):
        raise ValueError(f"a config must be a mapping of sections (data, model, objective, train, sample), got "
                         f"{type(values).__name__}")
    default = dataclasses.asdict(Config())
    return validate(_build(Config, _merge(default, values or {}), "config"))


POSITIVE = {"train": ("steps", "batch", "checkpoint_every", "keep", "log_every", "max_nonfinite", "spectral_base"),
            "data": ("n",),
            "sample": ("steps",)}
PRECISIONS = ("auto", "fp32", "bf16")


def _choice(value: str, allowed, key: str) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), list(allowed), n=1)
        raise ValueError(f"unknown {key} {value!r}" + (f"; did you mean {near[0]!r}?" if near else ".") +
                         f" Choose one of: {', '.join(allowed)}")


def validate(cfg: Config) -> Config:
    """Every check on a config that needs no data: names, ranges and counts, each a ValueError naming the key.

    It runs whenever a config is made (load, derive, from_dict), so a run fails before its folder is written or
    a step is trained, never at the end (a mistyped sample.sampler used to surface only at the final sampling).
    """
    for section, keys in POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value < 1:
                raise ValueError(f"{section}.{key} must be a positive integer, got {value}")
    t, s, m, o, d = cfg.train, cfg.sample, cfg.model, cfg.objective, cfg.data
    if t.micro_batch is not None and not 1 <= t.micro_batch <= t.batch:
        raise ValueError(f"train.micro_batch must be in [1, train.batch = {t.batch}] (or null), got {t.micro_batch}")
    for key, ok, rule in (("train.lr", t.lr >= 0, ">= 0"), ("train.warmup", t.warmup >= 0, ">= 0"),
                          ("train.ema_decay", 0 <= t.ema_decay < 1, "in [0, 1)"),
                          ("train.ema_rampup", t.ema_rampup >= 0, ">= 0"),
                          ("objective.label_dropout", 0 <= o.label_dropout < 1, "in [0, 1)"),
                          ("sample.rho", s.rho > 0, "> 0")):
        if not ok:
            raise ValueError(f"{key} must be {rule}")
    if t.precision == "fp16":
        raise ValueError("train.precision=fp16 is not supported (it needs loss scaling): use bf16, fp32 or auto")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.optimizer, optim.OPTIMIZERS, "train.optimizer")
    optim.check_installed(t.optimizer)
    _choice(t.muon_adjust_lr, optim.MUON_ADJUST, "train.muon_adjust_lr")
    _choice(t.parametrization, spectral.PARAMETRIZATIONS, "train.parametrization")
    _choice(t.parallel, distributed.PARALLEL, "train.parallel")
    clip.check(t.grad_clip)
    if t.parametrization == "spectral" and m.init is not None:
        raise ValueError("train.parametrization=spectral draws the initial weights itself; it cannot start from "
                         f"model.init={m.init} (use train.parametrization=standard there)")
    _choice(m.path, list(PATHS), "model.path")
    _choice(m.prediction, [*PREDICTIONS, "edm"], "model.prediction")
    _choice(m.net, list(_nets()), "model.net")
    _choice(s.grid, list(grids.NAMED), "sample.grid")
    if not registry.get(o.name).samplers:
        try:
            samplers.get(s.sampler)
        except ValueError as err:
            raise ValueError(f"sample.sampler: {err}") from None
    _choice(d.name, ["digits", "photos", "folder", "hf", *datasets.TOYS], "data.name")
    if d.name in (*datasets.TOYS, "photos") and d.conditional and d.couples is None:
        raise ValueError(f"data.conditional=true needs labels; {d.name} has none (use digits, or a folder "
                         "with one sub-folder per class)")
    for key in ("size", "stride"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            raise ValueError(f"data.{key} must be a positive integer (or null), got {getattr(d, key)}")
    datasets.check_classes(d.classes)
    if d.classes is not None and (d.name in (*datasets.TOYS, "photos") or d.couples is not None):
        raise ValueError("data.classes keeps the samples of some labels; " + ("reflow couples have none" if d.couples
                         else f"{d.name} has none (use digits, or a folder of class sub-folders)"))
    adapters.check(m.adapter, m.init)
    if d.name in ("folder", "hf") and (d.source is None or d.size is None):
        raise ValueError(f"data.name={d.name} needs data.source (the {'folder' if d.name == 'folder' else 'dataset'}) "
                         "and data.size (the image side in pixels)")
    return cfg


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("args", "density_args") else v
    return out


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = the defaults) and apply `section.key=value` overrides (values parsed as YAML)."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections (data, model, objective, train, "
                             f"sample), not a {type(values).__name__}")
    return from_dict(_override(values, overrides))


def derive(base: Config, overrides: list[str] = ()) -> Config:
    """A copy of `base` with `section.key=value` overrides applied (new runs made from a trained one)."""
    return from_dict(_override(to_dict(base), overrides))


def _override(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = values
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from None
    return values


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dataset(cfg: Config, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training (or held-out 'test') data: images (N, C, H, W) in [-1, 1] or vectors (N, d).

    Digits have a fixed split; photos split by photo (data.PHOTOS); toys draw the held-out points with another seed; image folders hold out about 1
    in 10 files by a hash of their path (data.held_out); Hugging Face datasets use their own splits.
    With data.couples the training split is reflow's (N, 2, ...) [sample, noise] couples; the held-out split
    stays the real data of data.name, so reflowed models are scored against what the teacher learned.
    """
    d = cfg.data
    if d.couples is not None and split == "train":
        noise, sample, labels = reflow.load_couples(d.couples)
        return reflow.pack(noise, sample), (labels if d.conditional else None)
    if d.name == "digits":
        x, y = datasets.digits(split)
    elif d.name in datasets.TOYS:
        x, y = datasets.toy(d.name, d.n, torch.Generator().manual_seed(0 if split == "train" else 1)), None
    elif d.name == "photos":
        x, y = datasets.photos(split, size=d.size or 32, stride=d.stride, channels=d.channels), None
    elif d.name == "folder":
        x, y = datasets.image_folder(d.source, d.size, channels=d.channels, split=split)
        if d.conditional and y is None:
            raise ValueError(f"data.conditional=true needs labels: put the images of {d.source} in one sub-folder per "
                             "class (or set data.conditional=false)")
    elif d.name == "hf":
        x, y = datasets.hf_dataset(d.source, d.size, split=split, channels=d.channels)
    else:
        raise ValueError(f"unknown data.name {d.name!r}; use digits, photos, folder, hf or a toy: {', '.join(datasets.TOYS)}")
    if d.classes is not None:
        x, y = datasets.keep_classes(x, y, d.classes, f"{d.name} ({split} split)")
    return x, (y if d.conditional else None)


LEVELS = {"digits": 17, "photos": 256, "folder": 256, "hf": 256}  # integer levels of each image source (pixel values 0..16, 8-bit)


def levels(cfg: Config) -> int | None:
    """How many integer levels the data's values take (for bits/dim), or None for continuous data (the toys)."""
    return LEVELS.get(cfg.data.name)


def sample_shape(cfg: Config, x: torch.Tensor) -> tuple[int, ...]:
    """The per-sample shape of training data x (couples carry a pair axis first)."""
    return tuple(x.shape[2:] if cfg.data.couples is not None else x.shape[1:])


def _nets() -> dict[str, tuple[type, Callable[[tuple[int, ...]], dict]]]:
    """model.net -> (network class, its data-shape arguments for a sample of a given shape)."""
    from diffkit.flows.tarflow import TarFlow
    from diffkit.nets.autoencoder import Autoencoder
    from diffkit.nets.diffusers_unet import DiffusersUNet2D
    from diffkit.nets.dit import DiT
    from diffkit.nets.mlp import MLP
    from diffkit.nets.unet import UNet

    image = lambda shape: {"in_channels": shape[0], "image_size": shape[-1]}  # noqa: E731
    return {"mlp": (MLP, lambda shape: {"dim": math.prod(shape)}), "unet": (UNet, image), "dit": (DiT, image),
            "diffusers_unet2d": (DiffusersUNet2D, image),
            "tarflow": (TarFlow, lambda shape: {"data_shape": shape}), "autoencoder": (Autoencoder, image)}


def num_classes(cfg: Config, labels: torch.Tensor | None) -> int:
    return int(labels.max()) + 1 if labels is not None else 0


def model(cfg: Config, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The run's model for data of per-sample shape `sample_shape`: its network, as the run's method wraps it
    (a Precond denoiser; a shortcut net also takes d; a flow)."""
    m, method = cfg.model, registry.get(cfg.objective.name)
    if m.path not in PATHS:
        raise ValueError(f"unknown model.path {m.path!r}; choose one of {', '.join(PATHS)}")
    nets = _nets()
    if m.net not in nets:
        raise ValueError(f"unknown model.net {m.net!r}; choose {', '.join(nets)}")
    method.check(cfg)
    cls, shape_args = nets[m.net]
    data_args = shape_args(tuple(sample_shape))
    fixed = (*data_args, "num_classes", "extra_scalars")
    params = inspect.signature(cls).parameters
    for key in m.args:
        if key not in params or key in fixed:
            raise _unknown(key, [p for p in params if p not in fixed], f"model.args of {m.net}")
    extra = {"extra_scalars": method.extra_scalars} if method.extra_scalars else {}
    try:
        net = cls(**data_args, num_classes=n_classes, **extra, **m.args)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"model.args {m.args} do not build a {m.net}: {err}") from None
    if m.adapter.name is not None:  # the adapters' structure; their weights come from a checkpoint or run.train_run
        adapters.attach(net, m.adapter, init=False)
    return method.wrap(net, cfg, path(cfg))


def trainable(cfg: Config, denoiser: Precond) -> nn.Module:
    """What the loop trains: the denoiser itself, or what the run's method builds around it (SiD: a pair)."""
    return registry.get(cfg.objective.name).trainable(denoiser)


def path(cfg: Config) -> paths.Path:
    base = PATHS[cfg.model.path]()
    return base if cfg.model.shift == 1 else paths.Shifted(base, cfg.model.shift)


def objective(cfg: Config, n_classes: int, teacher: Precond | None = None) -> Callable:
    """The training objective of the method objective.name with objective.args (a teacher for distillation)."""
    o = cfg.objective
    method = registry.get(o.name)
    method.check_args(o.args)
    method.check(cfg)
    dropout = o.label_dropout if cfg.data.conditional else 0.0
    return method.objective(cfg, path(cfg), label_dropout=dropout, null=n_classes if dropout else None,
                            teacher=teacher)


def describe(cfg: Config) -> dict[str, Any]:
    """The facts a reader of a report needs, in one line each."""
    method = registry.get(cfg.objective.name)
    facts = {"data": cfg.data.name, "net": cfg.model.net}
    if method.generates:  # a codec has no noise path
        facts |= {"path": cfg.model.path, "prediction": cfg.model.prediction}
    if cfg.data.tokenizer is not None:
        facts["latents of"] = cfg.data.tokenizer
    if cfg.data.classes is not None:
        facts["classes"] = ", ".join(map(str, cfg.data.classes))
    if cfg.model.adapter.name is not None:
        facts["adapter"] = f"{cfg.model.adapter.name}, rank {cfg.model.adapter.rank}"
    return {**facts, **method.facts(cfg), "steps": cfg.train.steps}
