"""Low-rank adapters on a trained network (LoRA, LoRA-GA, PiSSA), through peft (the `lora` extra).

Every adapted layer computes W x + s B A x with s = alpha / r (peft's LoraConfig); only A and B train.

- LoRA (Hu et al. 2021, eq. 3): A random, B = 0, so the adapted network starts as the trained one.
- PiSSA (Meng et al. 2024, §3): A, B from the top-r SVD of W (B A = U_r S_r V_r^T / s, peft's "pissa", an
  exact SVD), and W is replaced by the residual W - s B A: the output at start is unchanged.
- LoRA-GA (Wang et al. 2024, arXiv 2407.05000, §3.2): A, B from the SVD of G, the full weight's gradient
  averaged over a few batches of the run's own objective (peft's `preprocess_loraga`): A0 = V[:, :r]^T,
  B0 = U[:, r:2r] S (peft's "ArB2r" with its "stable" scale), and W is replaced by W - s B0 A0, so the output
  at start is unchanged and the first step of B A lies in the top-2r singular subspace of G.

LoRA-GA and PiSSA are defined for matrices: peft gives a Conv2d layer LoRA-GA's *default* init without a
word and raises for PiSSA. Here the default targets (`all`: every Linear and Conv2d layer) refuse both on a
net with convolutions; `targets: linear` adapts its Linear layers only and leaves the convolutions frozen,
which the run's report states. Plain LoRA adapts Conv2d layers too.

Nothing here re-implements peft: this module picks the target layers, drives peft's inits, and merges.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

KINDS = ("lora", "lora_ga", "pissa")
TARGETS = ("all", "linear")
GRADIENT_INIT = ("lora_ga",)  # kinds whose init needs the gradient of the run's objective
MATRIX_ONLY = ("lora_ga", "pissa")  # kinds peft defines for Linear layers only
NAME = "default"  # peft's adapter name: the only adapter a diffkit run has


@dataclass
class AdapterSettings:
    """The `model.adapter` section of a run's config; `diffkit finetune` sets it (diffkit.finetune)."""

    name: str | None = None  # lora | lora_ga | pissa; null: no adapters (every weight trains)
    rank: int = 8
    alpha: float | None = None  # the scale s = alpha / rank; null: alpha = rank (s = 1)
    targets: str = "all"  # all: every Linear and Conv2d layer; linear: Linear layers only (convolutions frozen)
    grad_batches: int = 8  # lora_ga: batches of the run's objective its gradient estimate averages


class MissingPeft(ImportError):
    """peft is needed and not installed; the message says how to install it."""


def import_peft():
    """The peft module, or MissingPeft saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise MissingPeft(f"model.adapter needs peft (LoRA, LoRA-GA, PiSSA), which did not import ({err}): "
                          "pip install 'diffkit[lora]' (or pip install 'peft>=0.19')") from err
    return peft


def check(a: AdapterSettings, init: str | None) -> None:
    """The model.adapter keys (a ValueError naming the key); adapters need a trained net, model.init."""
    if a.name is None:
        return
    if a.name not in KINDS:
        raise ValueError(f"unknown model.adapter.name {a.name!r}; choose one of {', '.join(KINDS)} (or null: none)")
    if a.targets not in TARGETS:
        raise ValueError(f"unknown model.adapter.targets {a.targets!r}; choose all (Linear and Conv2d layers) or "
                         "linear (Linear layers only)")
    if a.rank < 1 or a.grad_batches < 1:
        raise ValueError("model.adapter.rank and model.adapter.grad_batches must be positive integers")
    if a.alpha is not None and a.alpha <= 0:
        raise ValueError(f"model.adapter.alpha must be > 0 (or null: alpha = rank), got {a.alpha}")
    if init is None:
        raise ValueError("model.adapter adapts a trained net: set model.init to its run folder (or use "
                         "`diffkit finetune RUN --adapter ...`)")


def target_layers(net: nn.Module, kind: str, rank: int, targets: str) -> list[str]:
    """The names of the layers of `net` that take an adapter; a net they cannot all take is an error."""
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if kind in MATRIX_ONLY and targets == "all" and convs:
        raise ValueError(f"{kind} initialises an adapter from the SVD of a weight matrix (Linear layers); this net "
                         f"has {len(convs)} Conv2d layers (e.g. {convs[0]!r}), which peft would silently give "
                         f"plain LoRA's init ({'LoRA-GA' if kind == 'lora_ga' else 'or refuse'}). Use --adapter "
                         "lora, or model.adapter.targets=linear to adapt the Linear layers only (the convolutions "
                         "then stay frozen)")
    kinds = (nn.Linear, nn.Conv2d) if targets == "all" else (nn.Linear,)
    names = []
    for name, m in net.named_modules():
        if not isinstance(m, kinds):
            continue
        fan_in, fan_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else \
            (m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
        if rank > min(fan_in, fan_out):
            raise ValueError(f"model.adapter.rank {rank} exceeds layer {name!r} ({fan_in} -> {fan_out}): use a rank "
                             f"<= {min(fan_in, fan_out)}")
        names.append(name)
    if not names:
        raise ValueError(f"this net has no {'Linear or Conv2d' if targets == 'all' else 'Linear'} layer to adapt")
    return names


def attach(net: nn.Module, a: AdapterSettings, *, init: bool = True,
           train_step: Callable[[], None] | None = None) -> list[str]:
    """Put the adapters `a` describes on `net`'s target layers in place; returns their names.

    init: initialise them by `a.name` from the weights `net` holds now (LoRA-GA runs `train_step`, a function
    that runs forward and backward passes of the objective, to estimate the gradient); False: only the
    structure (LoRA's init), for weights that a checkpoint will replace. Freezes everything but A and B."""
    peft = import_peft()
    names = target_layers(net, a.name, a.rank, a.targets)
    how = a.name if init else "lora"
    config = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, target_modules=names,
                             init_lora_weights={"lora": True, "pissa": "pissa", "lora_ga": "lora_ga"}[how],
                             **({"lora_ga_config": peft.LoraGAConfig()} if how == "lora_ga" else {}))
    if how in GRADIENT_INIT:
        if train_step is None:
            raise ValueError("LoRA-GA initialises from the gradient of the objective: pass train_step")
        with warnings.catch_warnings():  # peft counts backward passes with hooks on layers whose inputs need none
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            peft.preprocess_loraga(net, config, train_step)
    peft.inject_adapter_in_model(config, net, adapter_name=NAME)
    return names


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of `model` (peft's LoRA layers) by name; {} for a model without adapters."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and NAME in getattr(m, "lora_A", {})}


def merge(model: nn.Module) -> int:
    """Add s B A into every adapted layer's weight (peft's merge), in place; returns the number of layers merged.
    A model without adapters is an error: there is nothing to merge."""
    found = layers(model)
    if not found:
        raise ValueError("this run has no adapters to merge (--merge is for runs made by `diffkit finetune`)")
    for layer in found.values():
        layer.merge(adapter_names=[NAME])
    return len(found)


def adapter_state(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """What a fine-tuned model adds to its base run: every adapter's A and B, and for PiSSA and LoRA-GA (which
    replace W by a residual) the adapted layers' base weights too. Keys as in the model's state dict."""
    found = layers(model)
    keep = [f"{n}.lora_A.{NAME}.weight" for n in found] + [f"{n}.lora_B.{NAME}.weight" for n in found]
    if kind in MATRIX_ONLY:
        keep += [f"{n}.base_layer.weight" for n in found]
    state = model.state_dict()
    return {k: state[k].detach().cpu().contiguous() for k in keep}
