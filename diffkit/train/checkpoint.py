"""Checkpoints: a directory per step with model.safetensors, ema.safetensors, state.safetensors, config.yaml
and checksums.json.

Nothing is ever unpickled: tensors live in safetensors files and everything else (step, optimizer
hyper-parameters, counters) in JSON metadata or YAML. A checkpoint is written under a temporary name and
renamed into place, so a crash mid-write leaves the previous checkpoints intact; only the newest `keep`
are kept. checksums.json holds the sha256 of every other file: bytes damaged in place (a safetensors file
whose header still parses) fail the check on load instead of loading as NaN weights, and `load_latest` falls
back to the newest checkpoint that passes. Checkpoints written before checksums load unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

PREFIX = "step-"
CHECKSUMS = "checksums.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizers: list[dict]
    extra: dict
    config: dict


def _flatten_optimizers(states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Tensors keyed 'optimizer{i}.{param id}.{name}'; everything else as JSON-able metadata."""
    tensors, metas = {}, []
    for i, state in enumerate(states):
        scalars = {}
        for pid, entries in state["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer{i}.{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{name}"] = value
        metas.append({"param_groups": state["param_groups"], "scalars": scalars})
    return tensors, metas


def _unflatten_optimizers(tensors: dict[str, torch.Tensor], metas: list[dict]) -> list[dict]:
    states: list[dict] = [{"state": {}, "param_groups": m["param_groups"]} for m in metas]
    for key, value in tensors.items():
        opt, pid, name = key.split(".", 2)
        states[int(opt.removeprefix("optimizer"))]["state"].setdefault(int(pid), {})[name] = value
    for state, meta in zip(states, metas):
        for key, value in meta["scalars"].items():
            pid, name = key.split(".", 1)
            state["state"].setdefault(int(pid), {})[name] = value
    return states


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11; we support 3.10
            digest.update(block)
    return digest.hexdigest()


def save(run_dir: Path, step: int, *, model: dict, ema: dict, optimizers: list[dict], extra: dict, config: dict,
         keep: int = 3) -> Path:
    """Write checkpoint `step` atomically under run_dir/checkpoints and prune all but the newest `keep`.

    Checkpoints past `step` go too: training resumed from before them, so they were found bad (load_latest)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{PREFIX}{step:09d}", root / f".{PREFIX}{step:09d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model), tmp / "model.safetensors")
    save_file(_contiguous(ema), tmp / "ema.safetensors")
    opt_tensors, opt_meta = _flatten_optimizers(optimizers)
    meta = {"step": str(step), "extra": json.dumps(extra), "optimizers": json.dumps(opt_meta)}
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "state.safetensors", metadata=meta)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    found = sorted(root.glob(f"{PREFIX}*"))
    upto = found.index(final) + 1
    for old in found[:upto][:-keep] + found[upto:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = sorted((Path(run_dir) / "checkpoints").glob(f"{PREFIX}*"))
    return found[-1] if found else None


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of a run that loads and matches its checksums, or None if it has none.

    A bad one is skipped with a warning that names it; if every one is bad, a ValueError says what to do."""
    bad = []
    for path in reversed(sorted((Path(run_dir) / "checkpoints").glob(f"{PREFIX}*"))):
        try:
            ck = load(path)
        except ValueError as err:
            bad.append(str(err))
            continue
        if bad:
            warnings.warn(f"{'; '.join(bad)}. Using the newest good checkpoint, {path}, instead", stacklevel=2)
        return ck
    if bad:
        raise ValueError(f"no checkpoint of {run_dir} is intact: {'; '.join(bad)}. Train again in a new run folder "
                         f"(or delete {Path(run_dir) / 'checkpoints'} to start this one over)")
    return None


def _verify(path: Path) -> None:
    """Check each file against the sha256 written with it (none written: a checkpoint from before checksums)."""
    if not (path / CHECKSUMS).exists():
        return
    for name, digest in json.loads((path / CHECKSUMS).read_text()).items():
        if _sha256(path / name) != digest:
            raise ValueError(f"checkpoint {path} is corrupt or truncated: {name} does not match the sha256 saved "
                             "with it")


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint directory; a missing, corrupt or truncated file is a ValueError that names it."""
    path = Path(path)
    try:
        _verify(path)
        model = load_file(path / "model.safetensors")
        ema = load_file(path / "ema.safetensors")
        tensors = load_file(path / "state.safetensors")
        with safe_open(path / "state.safetensors", "pt") as f:
            meta = f.metadata()
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {path} is missing, corrupt or truncated ({err})") from err
    tensors.pop("_empty", None)
    optimizers = _unflatten_optimizers(tensors, json.loads(meta["optimizers"]))
    return Checkpoint(path, int(meta["step"]), model, ema, optimizers, json.loads(meta["extra"]), config)
