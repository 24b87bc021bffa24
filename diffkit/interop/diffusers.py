"""diffusers folders as diffkit denoisers (`load_diffusers`), and diffkit runs as diffusers pipelines (`export`).

Loading reads a pipeline folder (model_index.json, a `unet` or `transformer` folder, scheduler/) or a model folder
(config.json + safetensors weights) with its scheduler config beside it or in scheduler/. The scheduler config
fixes the path, prediction and time input (diffkit.interop.schedule); the model is wrapped as F(x, c_noise, cond)
(nets.diffusers_unet.DiffusersNet) inside a Precond, so every diffkit sampler, grid and guidance wrapper runs on
it. Weights load from safetensors only (a folder with only .bin files is refused: those are pickles).

Export saves a run whose net is `diffusers_unet2d` as a DDPMPipeline folder: on a VP path with trained_betas that
reproduce the run's path (DDIMPipeline loads the same folder), on rectified flow with a flow-matching scheduler
(DDPMPipeline's loop, model then scheduler.step, is flow-matching Euler with it); schedule.scheduler_config.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffkit._tensor import per_sample
from diffkit.interop import schedule as schedules
from diffkit.nets.diffusers_unet import DiffusersNet, DiffusersUNet2D, import_diffusers
from diffkit.paths import Path as NoisePath
from diffkit.precond import Precond

MODEL_FOLDERS = ("unet", "transformer")


class DiffusersDenoiser(Precond):
    """A Precond that hands the net its time c_noise in float64: the timestep N t - 1 of a float32 t would be off
    by up to 1e-4 from the integer diffusers feeds."""

    def _net(self, x: Tensor, c_in: Tensor, c_noise: Tensor, cond: Tensor | None, extra: Tensor | None) -> Tensor:
        return self.net(per_sample(c_in, x) * x, c_noise, cond, extra=extra).to(x.dtype)


@dataclass
class Loaded:
    """A loaded diffusers model: `denoiser` D(x, sigma[, cond]) on `path` (what every sampler takes), its
    `prediction`, the per-sample `shape` (None when the config does not say), `num_classes` (class-label models),
    `conditioning` ("none", "class_labels" or "encoder_hidden_states"), and the Schedule it came from."""

    denoiser: DiffusersDenoiser
    path: NoisePath
    prediction: str
    schedule: schedules.Schedule
    shape: tuple[int, ...] | None
    num_classes: int
    conditioning: str
    scheduler_config: dict = field(repr=False)


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the folder is damaged; save it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def is_diffusers_folder(folder: str | Path) -> bool:
    """Whether `folder` looks like a diffusers pipeline or model folder (not a diffkit run)."""
    folder = Path(folder)
    return (folder / "model_index.json").is_file() or (
        (folder / "config.json").is_file() and not (folder / "checkpoints").exists())


def _locate(folder: Path, subfolder: str | None) -> tuple[Path, Path]:
    """(model folder, scheduler config file) of a pipeline or model folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers folder {folder} not found")
    if (folder / "model_index.json").is_file() and subfolder is None:
        index = _json(folder / "model_index.json")
        found = [name for name in MODEL_FOLDERS if name in index]
        if not found:
            raise ValueError(f"{folder}/model_index.json names no {' or '.join(MODEL_FOLDERS)} component (it has "
                             f"{', '.join(k for k in index if not k.startswith('_'))}); pass subfolder= the denoiser's")
        subfolder = found[0]
    model = folder / subfolder if subfolder else folder
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                      model / "scheduler_config.json"):
        if candidate.is_file():
            return model, candidate
    raise FileNotFoundError(f"{folder} has no scheduler config (scheduler/scheduler_config.json or "
                            "scheduler_config.json): diffkit needs it to know the model's noise path")


def _model(model_dir: Path, device, dtype):
    config = _json(model_dir / "config.json")
    name = config.get("_class_name")
    diffusers = import_diffusers()
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{model_dir}/config.json: _class_name {name!r} is not a diffusers model class")
    if not list(model_dir.glob("*.safetensors")):
        has_bin = bool(list(model_dir.glob("*.bin")))
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights" + (
            " (only .bin pickles, which diffkit never loads: re-save them with save_pretrained(..., "
            "safe_serialization=True))" if has_bin else ""))
    model = cls.from_pretrained(model_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    model = model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False), config


def _facts(config: dict) -> tuple[tuple[int, ...] | None, int, str]:
    """(per-sample shape, classes, conditioning kind) from a model config."""
    size, channels = config.get("sample_size"), config.get("in_channels")
    shape = None
    if channels and size:
        shape = (channels, *([size, size] if isinstance(size, int) else size))
    classes = config.get("num_class_embeds") or config.get("num_embeds_ada_norm") or 0
    if config.get("cross_attention_dim") or config.get("joint_attention_dim"):
        return shape, classes, "encoder_hidden_states"
    return shape, classes, "class_labels" if classes else "none"


def load_diffusers(folder: str | Path, *, subfolder: str | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, strict: bool = True) -> Loaded:
    """A diffusers pipeline or model folder as a diffkit denoiser, offline.

    subfolder: the denoiser's folder inside a pipeline (default: unet or transformer). device, dtype: where and
    in what precision the model runs (default: cpu, the saved dtype). strict: see schedule.from_config.
    Pass conditioning as D(x, sigma, cond): class labels (long) or encoder hidden states (float)."""
    model_dir, scheduler_file = _locate(Path(folder), subfolder)
    scheduler_config = _json(scheduler_file)
    schedule = schedules.from_config(scheduler_config, strict=strict)
    model, config = _model(model_dir, device or "cpu", dtype)
    net = DiffusersNet(model, num_train_timesteps=schedule.num_train_timesteps, time_offset=schedule.time_offset)
    shape, classes, conditioning = _facts(config)
    return Loaded(DiffusersDenoiser(net, schedule.path, schedule.prediction), schedule.path, schedule.prediction,
                  schedule, shape, classes, conditioning, scheduler_config)


@torch.no_grad()
def scheduler_sample(loaded: Loaded, scheduler, latents: Tensor, steps: int | None = None, *, cond: Tensor | None = None,
                     generator: torch.Generator | None = None, **timesteps) -> Tensor:
    """Sample a loaded model with a diffusers scheduler as diffusers' pipelines do: latents * init_noise_sigma,
    then per timestep scale_model_input, the model, scheduler.step. The peer of diffkit's samplers on the same
    model (benchmarks/interop.py, the parity tests). steps or timesteps (e.g. sigmas=[...]) go to set_timesteps;
    generator to a stochastic step. Returns the scheduler's last sample (B, ...)."""
    scheduler.set_timesteps(steps, **timesteps) if steps is not None else scheduler.set_timesteps(**timesteps)
    noise = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = loaded.denoiser.net.at_timestep(model_input, t.expand(len(x)), cond)
        x = scheduler.step(out.to(x.dtype), t, x, **noise).prev_sample
    return x


def export(model: Precond, path: NoisePath, prediction: str, out: str | Path) -> Path:
    """Save a trained Precond whose net is DiffusersUNet2D as a DDPMPipeline folder `out`.

    The folder is written beside `out` under a temporary name and renamed into place (an existing `out` is an
    error, never overwritten)."""
    out = Path(out)
    if not isinstance(model, Precond) or not isinstance(model.net, DiffusersUNet2D):
        raise ValueError("only runs with model.net: diffusers_unet2d export to diffusers; diffkit's own nets have "
                         "no diffusers class (export them with --to diffkit: weights.safetensors + diffkit.yaml)")
    if out.exists():
        raise FileExistsError(f"{out} exists: pass a new folder")
    diffusers = import_diffusers()
    config = schedules.scheduler_config(path, prediction, model.net.num_train_timesteps, model.net.time_offset)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipeline = diffusers.DDPMPipeline(unet=model.net.model, scheduler=scheduler)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    return out
