"""The registry of training methods: every method family is listed here once (diffkit.method says what one is).

`objective.name` in a config names the method; `get` finds it, and `commands` lists the methods that derive new
runs from trained ones (`diffkit reflow`, `diffkit distill`). Adding a family is a subclass of Method next to its
algorithm and one entry below.
"""
from __future__ import annotations

import difflib

from diffkit.codecs.tokenizer import TokenizerMethod
from diffkit.flows.tarflow import TarFlowMethod
from diffkit.method import Method
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


def commands() -> dict[str, Method]:
    """The methods with a command that derives a new run from a trained one, by command name."""
    return {m.command: m for m in METHODS.values() if m.command is not None}
