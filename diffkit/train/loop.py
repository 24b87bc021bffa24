"""The training loop, generic in the objective: data -> objective(model, x0, cond) -> reduce -> step -> EMA.

Reproducibility is by construction, not by saved RNG state: the data order of epoch e comes from a
generator seeded by (seed, e), and every random draw of micro-batch j at step s (noise levels, eps,
label dropout, dropout) from one seeded by (seed, s, j), or (seed, s, j, p) in an objective's phase p > 0.
So a resumed run repeats exactly what an uninterrupted one does, and a run on R processes (torchrun, DDP or
FSDP: train.distributed) processes the same micro-batches as one process with R times the gradient accumulation.

Resuming (`resume_point`): from the newest intact checkpoint; metrics.jsonl keeps only the rows up to its
step, since the steps after it are trained again. A train.steps other than the checkpoint's continues under
the schedule of the new total; one below the checkpoint's step is an error. Ctrl-C (in a single process)
finishes the current step, saves a checkpoint of it and raises `Interrupted`; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from diffkit.contracts import StepHooks
from diffkit.train import checkpoint, clip, fast, optim, spectral
from diffkit.train.distributed import Parallel
from diffkit.train.ema import EMA


@dataclass
class TrainSettings:
    """The `train` section of a run's config; the defaults are those of the built-in digits recipe (`diffkit demo`)."""

    steps: int = 3000
    batch: int = 256  # global batch per optimizer step
    micro_batch: int | None = None  # per forward/backward; default batch / world size
    optimizer: str = "adamw"  # adamw | muon (+AdamW for the rest) | lion | tiger (train.optim)
    lr: float = 1e-3
    muon_lr: float = 0.02
    muon_adjust_lr: str = "original"  # torch Muon's lr adjustment: original | match_rms_adamw
    sign_embeddings_adamw: bool = True  # lion/tiger: embedding tables train with AdamW (the embedding anomaly)
    parametrization: str = "standard"  # standard | spectral (train.spectral: init and per-layer lr)
    spectral_base: int = 256  # spectral: the fan-in whose layers keep lr x 1 (the width the lr was tuned at)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # SiD uses 0 for both of its networks
    adam_beta2: float = 0.999
    warmup: int = 200
    cosine: bool = True
    grad_clip: float | str = 1.0  # global-norm clip: a number, .inf (off) or "auto" (train.clip)
    ema_decay: float = 0.999
    ema_rampup: float = 0.0  # EDM's ramp-up ratio: EMA half-life <= ratio x steps so far (0: off; SiD 0.05)
    checkpoint_every: int = 1000
    keep: int = 3
    log_every: int = 50
    seed: int = 0
    max_nonfinite: int = 10  # consecutive skipped steps before the run stops
    precision: str = "auto"  # "fp32", "bf16", or "auto" (bf16 autocast on CUDA)
    compile: bool = False  # channels_last + torch.compile the net (CUDA only; train.fast.prepare)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2: sharded weights, gradients, optimizer state)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _batch_indices(step: int, batch: int, n: int, seed: int) -> Tensor:
    """Positions [step*batch, (step+1)*batch) of the stream of per-epoch permutations of range(n)."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 1, epoch)))
        mask = pos // n == epoch
        out[mask] = perm[pos[mask] % n]
    return out


def _to(t: Tensor, device: torch.device) -> Tensor:
    """t on `device`; host memory goes to a GPU through a pinned buffer, so the host queues the step's kernels
    while the copy runs instead of waiting for the GPU to finish the last step."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two steps, after a checkpoint of the last one was saved."""


def resume_point(run_dir: Path, settings: TrainSettings) -> tuple[checkpoint.Checkpoint | None, list[dict]]:
    """The checkpoint training in run_dir resumes from (the newest intact one; None: a fresh start), and the
    changes of train.steps the run has had, this one included, as {"at_step", "from_steps", "to_steps"}.

    A run continued with another train.steps follows the learning-rate schedule of the new total (warm-up and
    cosine) from the checkpoint's step on; a train.steps below that step is an error."""
    ck = checkpoint.load_latest(run_dir)
    if ck is None:
        return None, []
    if settings.steps < ck.step:
        raise ValueError(f"{run_dir} holds a checkpoint at step {ck.step}, past train.steps={settings.steps}: use "
                         f"train.steps >= {ck.step} to resume it, or a new run folder (--out)")
    changes = ck.extra.get("length_changes", [])
    before = ck.extra.get("settings", {}).get("steps", settings.steps)
    if before != settings.steps:
        changes = [*changes, {"at_step": ck.step, "from_steps": before, "to_steps": settings.steps}]
    return ck, changes


def _truncate_log(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (and no line torn by a kill): training resumed from `step`
    logs the later ones again. Atomic: temp file + rename."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line if line.endswith("\n") else line + "\n" for line in lines if kept(line)]
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


@contextlib.contextmanager
def _stop_between_steps(enabled: bool):
    """Yield a list that a first Ctrl-C appends to, for the loop to stop after the current step (so the saved
    checkpoint holds whole steps); a second Ctrl-C raises KeyboardInterrupt at once. Only where Ctrl-C would
    raise KeyboardInterrupt anyway: the main thread, with Python's own handler."""
    stop: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop without it)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _check_labels(labels: Tensor | None, n: int, model: nn.Module) -> None:
    """Labels are checked once here, where the data enters: a net checks only their shape, since checking their
    values inside its forward would read them back to the host on every call."""
    if labels is None:
        return
    if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a ({n},) integer tensor, one class per sample of x; "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    low, high = (int(v) for v in labels.aminmax())
    # A label table (nets.embed.LabelEmbedding) states the classes it was built for as `num_classes`; the loop
    # imports no net code, so it asks every module for that attribute.
    built_for = [m.num_classes for m in model.modules() if isinstance(getattr(m, "num_classes", None), int)]
    if built_for and not 0 <= low <= high < min(built_for):
        raise ValueError(f"labels must be in [0, {min(built_for)}) for a net built with num_classes={min(built_for)}; "
                         f"got labels in [{low}, {high}]. Build the net with num_classes = the number of classes")
    if low < 0:
        raise ValueError(f"labels must be non-negative class indices; got a minimum of {low}")


def train(model: nn.Module, objective: Callable, x: Tensor, labels: Tensor | None, settings: TrainSettings,
          run_dir: Path, *, config: dict | None = None, monitor: Callable[[nn.Module], dict] | None = None,
          progress: bool = True) -> EMA:
    """Train `model` (a Precond) on (x, labels) and return its EMA; resumes from run_dir's latest checkpoint.

    monitor: a function of the EMA model whose numbers join each metrics.jsonl row (a method's held-out
    measurements, e.g. a tokenizer's codebook usage)."""
    _check_labels(labels, len(x), model)
    run_dir = Path(run_dir)
    # Objectives that alternate between parts of the model (SiD: fake score, then generator) name their
    # `phases`: each is a pass over the batch with `phase=` and an optimizer step of its own, in order; the
    # optimizers skip parameters a phase leaves without gradient.
    phases = getattr(objective, "phases", (None,))
    par = Parallel(settings.parallel, phases=len(phases), monitor=monitor is not None)
    rank = par.rank
    micro, accum = par.split(settings.batch, settings.micro_batch)
    device = next(model.parameters()).device
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")

    if settings.parametrization == "spectral":  # a resumed run then loads its trained weights over these
        spectral.init_(model, torch.Generator().manual_seed(_seed(settings.seed, 4)))
    ema = EMA(model, settings.ema_decay, settings.ema_rampup)
    # Objectives that build targets from the EMA weights (shortcut models) declare `uses_ema = True`.
    ema_arg = {"ema": ema.model} if getattr(objective, "uses_ema", False) else {}
    start, skipped_total = 0, 0
    ck, length_changes = resume_point(run_dir, settings)
    if ck is not None:
        model.load_state_dict(ck.model)
        ema.load_state_dict(ck.ema)
    par.shard(model, ema.model)  # FSDP: before the optimizers, whose parameters are then the shards
    opts = optim.build(model, settings.optimizer, lr=settings.lr, muon_lr=settings.muon_lr,
                       weight_decay=settings.weight_decay, betas=(settings.adam_beta1, settings.adam_beta2),
                       muon_adjust_lr=settings.muon_adjust_lr, parametrization=settings.parametrization,
                       spectral_base=settings.spectral_base, sign_embeddings_adamw=settings.sign_embeddings_adamw)
    clippers = [clip.Clipper(settings.grad_clip, device) for _ in phases]
    if ck is not None:
        if len(ck.optimizers) != len(opts):
            raise ValueError(f"checkpoint {ck.path} was written with another optimizer setting; use a new run folder")
        for opt, state in zip(opts, ck.optimizers):
            par.load_optimizer(opt, state)
        start, skipped_total = ck.step, ck.extra.get("skipped_steps", 0)
        for clipper, state in zip(clippers, ck.extra.get("clip", [])):
            clipper.load_state_dict(state)
    raw_net = model.net
    hooked = {name: m for name, m in model.named_modules() if isinstance(m, StepHooks)}  # MoE layers
    if settings.compile and device.type == "cuda":
        model.net = fast.prepare(model.net, device, compile=True)
    elif settings.compile:
        warnings.warn(f"train.compile is for CUDA; training on {device.type} runs the net eagerly", stacklevel=2)
    model.net = par.wrap(model.net, unused=bool(hooked))  # experts no token chose get no gradient
    model.train()

    def save(step: int) -> None:
        # Full states, gathered from the shards under FSDP (every rank takes part), written by rank 0.
        net_state, ema_state = par.state_dict(raw_net.state_dict()), par.state_dict(ema.state_dict())
        opt_states = [par.optimizer_state(opt) for opt in opts]
        if rank == 0:
            extra = {"skipped_steps": skipped_total, "settings": asdict(settings), "length_changes": length_changes,
                     "clip": [c.state_dict() for c in clippers]}
            checkpoint.save(run_dir, step, model={f"net.{k}": v for k, v in net_state.items()}, ema=ema_state,
                            optimizers=opt_states, extra=extra, config=config or {}, keep=settings.keep)
        par.barrier()

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(run_dir / "metrics.jsonl", start)
    log = (run_dir / "metrics.jsonl").open("a") if rank == 0 else None
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="training",
               disable=not progress or rank != 0)
    consecutive, t0 = 0, time.perf_counter()
    # Under DDP every rank would have to agree on the step to stop at: Ctrl-C stops it as before.
    with _stop_between_steps(par.world == 1) as stop, bar, log or contextlib.nullcontext():
        for step in bar:
            factor = optim.lr_factor(step, warmup=settings.warmup, total=settings.steps, cosine=settings.cosine)
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            idx = _batch_indices(step, settings.batch, len(x), settings.seed)
            losses, norms, finite = [], [], True
            for p, phase in enumerate(phases):
                total = torch.zeros((), device=device)
                phase_arg = {} if phase is None else {"phase": phase}
                for k in range(accum):
                    j = rank * accum + k
                    chunk = idx[j * micro:(j + 1) * micro]
                    draws = (step, j) if p == 0 else (step, j, p)  # each phase draws afresh; phase 0 as without phases
                    torch.manual_seed(_seed(settings.seed, 2, *draws))  # dropout and any other global draws
                    gen = torch.Generator(device).manual_seed(_seed(settings.seed, 3, *draws))
                    cond = _to(labels[chunk], device) if labels is not None else None
                    with par.sync(last=k == accum - 1):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                            loss = objective(model, _to(x[chunk], device), cond, generator=gen, **ema_arg, **phase_arg)
                            loss = loss.mean() / accum
                            aux = [a for m in hooked.values() if (a := m.aux_loss()) is not None]
                        (loss + sum(aux) / accum).backward()
                    total += loss.detach()
                par.mean(total)
                grad_norm = clippers[p](model.parameters())  # pre-clip; kept on the device for the log
                # A non-finite gradient skips the step as a non-finite loss does (a loss may mask NaN samples out).
                # This flag is the one value a phase reads back from the device.
                ok = bool(torch.isfinite(total + grad_norm))
                if ok:
                    for opt in opts:
                        opt.step()
                for m in hooked.values():
                    m.after_step(ok)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                losses.append(total)
                norms.append(grad_norm)
                finite = finite and ok
            if finite:
                consecutive = 0
                ema.update(model, step + 1)
            else:  # skip the step, keep count, stop after too many in a row
                consecutive, skipped_total = consecutive + 1, skipped_total + 1
                if consecutive >= settings.max_nonfinite:
                    raise NonFiniteLoss(f"{consecutive} non-finite losses in a row at step {step}; stopped. The last "
                                        f"good checkpoint is {checkpoint.latest(run_dir)}. Lower the learning rate or "
                                        "check the data.")
            last = step + 1 == settings.steps
            if log is not None and consecutive == 0 and ((step + 1) % settings.log_every == 0 or last):
                row = {"step": step + 1, "loss": sum(losses).item(), "lr": opts[0].param_groups[0]["lr"],
                       "grad_norm": torch.stack(norms).norm().item(), "skipped_steps": skipped_total}
                for name, phase_loss, phase_norm, clipper in zip(phases, losses, norms, clippers):
                    if name is not None:
                        row |= {f"loss_{name}": phase_loss.item(), f"grad_norm_{name}": phase_norm.item()}
                    row |= {k if name is None else f"{k}_{name}": v for k, v in clipper.drain().items()}
                # Timed after the reads above, which wait for the device to finish the step.
                row["samples_per_s"] = settings.batch * (step + 1 - start) / (time.perf_counter() - t0)
                for name, m in hooked.items():
                    row |= {f"{name}.{k}": v for k, v in m.drain().items()}
                if monitor is not None:
                    row |= monitor(ema.model)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 or last or stop:
                save(step + 1)
            if stop:
                raise Interrupted(f"interrupted at step {step + 1}: checkpoint saved; run the same command to resume")
    model.net = raw_net
    par.unshard(model, ema.model)
    return ema
