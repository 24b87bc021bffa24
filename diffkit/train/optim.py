"""Optimizers and the learning-rate schedule: AdamW, Muon (+AdamW), Lion, Tiger, from maintained libraries.

- "adamw": fused into one kernel per step on CUDA and CPU (its step count stays on the device, so a step reads
  nothing back to the host).
- "muon": `torch.optim.Muon` (Jordan et al. 2024) updates the 2-D hidden weight matrices, AdamW the rest
  (biases, norms, embeddings, and the input/output layers a net lists in its `muon_exclude` name prefixes), as
  the Muon authors recommend. Conv kernels (4-D) stay on AdamW: torch's Muon takes 2-D tensors only, and a
  wrapper that reshapes them to (C_out, C_in*k*k) would have to re-implement Muon's step around torch's (its
  state is keyed by the parameter), which is the copy we avoid; our nets' hidden matrices are Linear layers
  (MLP, DiT) and the UNet's convs keep AdamW. `muon_adjust_lr` picks torch's lr adjustment: "original"
  (Keller Jordan: lr*sqrt(max(1, fan_out/fan_in)), lr ~ 0.02) or "match_rms_adamw" (Moonlight, Liu et al.
  2025: lr*0.2*sqrt(max(fan_out, fan_in)), so AdamW's lr ~ 1e-3 carries over).
- "lion" (Chen et al. 2023) and "tiger" (Su 2023) from `pytorch-optimizer` (the `train` extra), with the
  library's betas. Sign optimizers move a parameter by lr every step even where its gradient is zero (the
  momentum keeps its sign), so an embedding row unused for many steps drifts towards +-1/weight_decay (the
  embedding anomaly of training-stack.md §5). The remedy applied here is the seed's second one: embedding
  tables (nn.Embedding) train with AdamW under a sign optimizer (`sign_embeddings_adamw`, on by default).

`train.parametrization: spectral` sets per-layer lr multipliers (train.spectral); each param group keeps its
base_lr, which the schedule scales. Nothing here re-implements an optimizer's update.
"""
from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from diffkit.train import spectral

OPTIMIZERS = ("adamw", "muon", "lion", "tiger")
MUON_ADJUST = ("original", "match_rms_adamw")
FUSED_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel


def check_installed(kind: str) -> None:
    """A ValueError with the install command when `kind` needs pytorch-optimizer and it is missing."""
    if kind in ("lion", "tiger") and importlib.util.find_spec("pytorch_optimizer") is None:
        raise ValueError(f"train.optimizer={kind} needs pytorch-optimizer: pip install 'diffkit[train]' "
                         "(or pip install pytorch-optimizer)")


def _sign_optimizer(kind: str):
    check_installed(kind)
    import pytorch_optimizer

    return {"lion": pytorch_optimizer.Lion, "tiger": pytorch_optimizer.Tiger}[kind]


def _split(model: nn.Module, kind: str, embeddings_adamw: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters for the main optimizer of `kind`, parameters for AdamW)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "adamw":
        return [], [p for _, p in named]
    if kind == "muon":
        excluded = tuple(getattr(getattr(model, "net", model), "muon_exclude", ()))
        inner = lambda n: n.removeprefix("net.")  # noqa: E731  (Precond wraps the net as .net)
        main = [p for n, p in named if p.ndim == 2 and not inner(n).startswith(excluded)]
    else:
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if embeddings_adamw else set()
        main = [p for _, p in named if id(p) not in tables]
    ids = {id(p) for p in main}
    return main, [p for _, p in named if id(p) not in ids]


def _groups(params: list[nn.Parameter], multipliers: dict[int, float], lr: float) -> list[dict]:
    """One param group per distinct lr multiplier (all of them in one group when there are none)."""
    by_mult: dict[float, list[nn.Parameter]] = {}
    for p in params:
        by_mult.setdefault(multipliers.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * m} for m, ps in by_mult.items()]


def build(model: nn.Module, kind: str = "adamw", *, lr: float = 1e-3, muon_lr: float = 0.02,
          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), muon_adjust_lr: str = "original",
          parametrization: str = "standard", spectral_base: int = 256,
          sign_embeddings_adamw: bool = True) -> list[torch.optim.Optimizer]:
    """One or two optimizers over model's trainable parameters; each param group remembers its base_lr."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")
    if muon_adjust_lr not in MUON_ADJUST:
        raise ValueError(f"unknown muon_adjust_lr {muon_adjust_lr!r}; expected one of {MUON_ADJUST}")
    main, rest = _split(model, kind, sign_embeddings_adamw)
    scaled = parametrization == "spectral"
    adam_mult = spectral.sign_lr_multipliers(model, spectral_base) if scaled else {}
    opts: list[torch.optim.Optimizer] = []
    if rest:
        fused = all(p.device.type in FUSED_DEVICES for p in rest)
        opts.append(torch.optim.AdamW(_groups(rest, adam_mult, lr), lr=lr, betas=betas, weight_decay=weight_decay,
                                      fused=fused or None))
    if main and kind == "muon":
        mult = spectral.muon_lr_multipliers(main, muon_adjust_lr) if scaled else {}
        opts.append(torch.optim.Muon(_groups(main, mult, muon_lr), lr=muon_lr, weight_decay=weight_decay,
                                     adjust_lr_fn=muon_adjust_lr))
    elif main:
        opts.append(_sign_optimizer(kind)(_groups(main, adam_mult, lr), lr=lr, weight_decay=weight_decay))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def lr_factor(step: int, *, warmup: int, total: int, cosine: bool = True) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine or total <= warmup:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
