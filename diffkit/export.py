"""`diffkit export`: a trained run's EMA model in a format for use elsewhere.

diffusers: a DDPMPipeline folder (diffkit.interop.diffusers.export), for runs whose net is a diffusers model.
diffkit: any run, as a documented, versioned folder that `load_export` reads back (export_run says what is in it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from diffkit import config as configs
from diffkit import registry, report, run
from diffkit.config import Config
from diffkit.interop import diffusers as interop

EXPORT_FORMAT = "diffkit-export"


def export_run(run_dir: Path, to: str, out: Path) -> Path:
    """Save a trained run's EMA model for use elsewhere (`diffkit export RUN --to diffusers|diffkit OUT`).

    diffusers: runs whose net is `diffusers_unet2d`, on a VP path with an eps, v or x0 prediction, or on unshifted
    rectified flow with velocity prediction (interop.schedule.scheduler_config says why the others cannot).
    diffkit: any run, as a folder of two files (version 1): `weights.safetensors`, the EMA state dict under the
    run model's own names (`net.*`), and `diffkit.yaml` with `format: diffkit-export`, `version: 1`, the checkpoint
    `step`, and the run's `config` (every section), `shape` (one sample's) and `num_classes`; `load_export` reads it
    back. load_diffusers does not read it. Both folders are written under a temporary name, then renamed."""
    if to not in ("diffusers", "diffkit"):
        raise ValueError(f"unknown export format {to!r}; diffkit exports to: diffusers, diffkit")
    if to == "diffkit":
        out, ck = Path(out), run.latest_checkpoint(run_dir)
        if out.exists():
            raise FileExistsError(f"{out} exists: pass a new folder")
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in ck.ema.items()}, tmp / "weights.safetensors")
        meta = {"format": EXPORT_FORMAT, "version": 1, "step": ck.step, **ck.config}
        report.atomic_write(tmp / "diffkit.yaml", yaml.safe_dump(meta, sort_keys=False))
        os.replace(tmp, out)
        return out
    cfg, model = run.load_run(run_dir)[:2]
    if registry.get(cfg.objective.name).samplers:
        raise ValueError(f"{run_dir} is a {cfg.objective.name} run, which samples with its own sampler: only "
                         "denoisers sampled on a sigma grid export to diffusers")
    return interop.export(model.cpu(), configs.path(cfg), cfg.model.prediction, out)


def load_export(folder: Path) -> tuple[Config, torch.nn.Module, tuple[int, ...], int]:
    """(config, model, shape, class count) of a `diffkit export --to diffkit` folder, as load_run gives a run's."""
    meta_file = Path(folder) / "diffkit.yaml"
    meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder} is not a diffkit export (no diffkit.yaml with format: {EXPORT_FORMAT})")
    if meta.get("version") != 1:
        raise ValueError(f"{folder} is a diffkit export of version {meta.get('version')}; this diffkit reads version 1")
    cfg = configs.from_dict(meta["config"])
    shape, n_classes = tuple(meta["shape"]), meta["num_classes"]
    model = configs.trainable(cfg, configs.model(cfg, shape, n_classes))
    model.load_state_dict(load_file(Path(folder) / "weights.safetensors"))
    return cfg, model.eval(), shape, n_classes
