"""The registry of training methods: every method family is listed here once (diffkit.method says what one is).

`objective.name` in a config names the method; `get` finds it, and `commands` lists the commands that derive new
runs from trained ones (`diffkit reflow`, `diffkit distill`, and `diffkit finetune`, which keeps the run's method).
Adding a family is a subclass of Method next to its algorithm and one entry below.
"""
from __future__ import annotations

import difflib

from diffkit.codecs.tokenizer import TokenizerMethod
from diffkit.finetune import Finetune
from diffkit.flows.tarflow import TarFlowMethod
from diffkit.method import Derivation, Method
from diffkit.objectives import DenoisingMethod
from diffkit.onestep.reflow import ReflowMethod
from diffkit.onestep.shortcut import ShortcutMethod
from diffkit.onestep.sid import SiDMethod

METHODS: dict[str, Method] = {m.name: m for m in (DenoisingMethod(), ShortcutMethod(), ReflowMethod(), SiDMethod(),
                                                   TarFlowMethod(), TokenizerMethod())}


def get(name: str) -> Method:
    """The method `objective.name = name`; an unknown name is an error that suggests the nearest one."""
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(METHODS)}"
        raise ValueError(f"unknown key {name!r} in objective.name{hint}")
    return METHODS[name]


DERIVATIONS: tuple[Derivation, ...] = (Finetune(),)  # derived runs that keep the trained run's method


def commands() -> dict[str, Derivation]:
    """The commands that derive a new run from a trained one (methods' own, and fine-tuning), by name."""
    return {d.command: d for d in (*METHODS.values(), *DERIVATIONS) if d.command is not None}
