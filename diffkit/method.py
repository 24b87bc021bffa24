"""What a training method is to the jobs: the one place a method family plugs in.

A method (denoising, shortcut models, ReFlow, SiD; flows, tokenizers and codecs next) is

    its objective      built from the run's config; `objective.args` are checked against its signature
    its model          what the loop trains: the Precond denoiser itself, or e.g. SiD's generator/fake pair
    what it needs      the path and prediction it trains (`trains_flow`), extra scalar inputs of its net
    its network        a denoiser backbone wrapped in Precond (`wrap`), or e.g. a flow (`nets` names those it takes)
    how it samples     any sigma-grid sampler (`samplers = ()`), or its own (`samplers` names them, `draw` runs them);
                       codecs generate nothing (`generates = False`) and `reconstruct` instead
    what it logs       optionally numbers measured on held-out data during training (`monitor`)
    its likelihood     by the probability-flow ODE (diffkit.likelihood), exact (`log_prob`, flows), or none
    how it is derived  optionally a command that makes a new run of it from a trained one (`command`, a
                       Derivation; fine-tuning is one too, for runs of any method with `finetunes`)

Each method subclasses `Method` next to its algorithm (objectives.py, onestep/*.py) and is listed once in
diffkit.registry. config, generate, run and cli look the method up there and never test a method's name.
The config reaches the hooks as the `diffkit.config.Config` dataclass; this module sits below config in the
layering, so it reads the config's fields without importing the module.
"""
from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any, Callable

import torch
from torch import Tensor, nn

from diffkit.precond import Precond


@dataclass(frozen=True)
class Option:
    """One command-line option of a method's command: `--name` with its type, default and help text."""

    name: str
    type: type
    default: Any
    help: str


@dataclass
class Trained:
    """A trained run as a method's command sees it (diffkit.run.load_run's results, plus where and how)."""

    folder: FilePath
    cfg: Any  # diffkit.config.Config
    model: nn.Module  # the EMA model, eval mode, on `device`
    shape: tuple[int, ...]
    n_classes: int
    method: Method  # the method it was trained with
    grid: Callable[[str, int], Tensor]  # the run's sigma grid of a given name and step count
    device: torch.device


class Derivation:
    """A command that makes a new run from a trained one: `diffkit <command> RUN --out NEW` (diffkit.run.derive_run).
    Methods derive runs of themselves (reflow, distill); fine-tuning (diffkit.finetune) keeps the trained run's
    method and adds adapters, so it is a derivation without a method of its own."""

    command: str | None = None  # `diffkit <command> RUN --out NEW`
    command_help = ""
    options: tuple[Option, ...] = ()

    def derive(self, teacher: Trained, options: dict, out_dir: FilePath) -> list[str]:
        """Check the trained run `teacher` can start this new run, and return the new run's config overrides."""
        raise NotImplementedError

    def before_training(self, teacher: Trained, options: dict, out_dir: FilePath, *, progress: bool) -> None:
        """Work the new run needs before it trains (ReFlow draws its couples here)."""

    def after_training(self, teacher: Trained, trained: Trained, options: dict) -> tuple[dict[str, dict], str]:
        """Measurements of the new run against its teacher: ({JSON file name: content}, lines for its report)."""
        return {}, ""


class Method(Derivation):
    """Defaults are those of plain denoising: a Precond trained as it is, sampled by any sigma-grid sampler."""

    name: str = ""
    objective_class: type | None = None  # objective.args are checked against its keyword arguments
    own_args: tuple[str, ...] = ()  # its keyword arguments the jobs fill in themselves (not objective.args)
    trains_flow = False  # needs model.path=rectified_flow, model.prediction=velocity, model.shift=1
    nets: tuple[str, ...] = ("mlp", "unet", "dit", "diffusers_unet2d")  # the model.net values it trains
    extra_scalars = 0  # scalar inputs its net takes besides c_noise (a shortcut model's step size)
    samplers: tuple[str, ...] = ()  # its own samplers, the first the default; (): diffkit.samplers' grid samplers
    likelihood: str | None = "ode"  # "ode" (its Precond's PF-ODE), "exact" (`log_prob`) or None (none defined)
    generates = True  # False: a codec (tokenizer), which reconstructs its input instead of sampling
    finetunes = True  # its runs can be fine-tuned (model.init starts its net; False where model.init is a teacher)
    # command, command_help, options (Derivation): `diffkit <command> RUN --out NEW`, a new run of this method

    # --- config -------------------------------------------------------------------------------------------
    def check(self, cfg) -> None:
        """Refuse a config this method cannot train or sample, before anything is built or written."""
        m = cfg.model
        if m.net not in self.nets:
            raise ValueError(f"objective.name={self.name} trains model.net {' or '.join(self.nets)}, not {m.net!r}")
        if m.adapter.name is not None and not self.finetunes:
            raise ValueError(f"objective.name={self.name} takes no model.adapter: its model.init is a teacher")
        if self.trains_flow and (m.path != "rectified_flow" or m.prediction != "velocity" or m.shift != 1):
            raise ValueError(f"objective.name={self.name} trains a flow: set model.path=rectified_flow, "
                             f"model.prediction=velocity, model.shift=1 (got {m.path}, {m.prediction}, {m.shift})")

    def check_args(self, args: dict) -> None:
        """objective.args must be keyword arguments of the objective that the jobs do not fill in."""
        valid = [p for p in inspect.signature(self.objective_class).parameters if p not in self.own_args]
        for key in args:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
                raise ValueError(f"unknown key {key!r} in objective.args of {self.name}{hint}")

    def objective(self, cfg, path, *, label_dropout: float, null: int | None, teacher: nn.Module | None) -> Callable:
        """The training objective: loss(model, x0, cond, *, generator, ...) -> (B,) per-sample losses."""
        raise NotImplementedError

    def wrap(self, net: nn.Module, cfg, path) -> nn.Module:
        """The run's model around its network: a Precond denoiser on the config's path and prediction."""
        return Precond(net, path, cfg.model.prediction, sigma_data=cfg.model.sigma_data)

    def trainable(self, denoiser: nn.Module) -> nn.Module:
        """What the loop trains, built around the run's model (`wrap`'s result)."""
        return denoiser

    def facts(self, cfg) -> dict[str, Any]:
        """What a report says about the method, one entry per fact."""
        return {"method": self.name, **cfg.objective.args}

    def monitor(self, cfg, held: Callable[[], Tensor]) -> Callable[[nn.Module], dict[str, float]] | None:
        """A function of the EMA model that the loop logs every train.log_every steps, measured on the held-out
        data `held()` returns; None (the default): nothing beyond the loss."""
        return None

    # --- sampling -----------------------------------------------------------------------------------------
    def sampler_name(self, requested: str | None, default: str) -> str:
        """The sampler a run of this method uses when `requested` (None: the config's `default`) is asked for."""
        if not self.samplers:
            return requested or default
        if requested not in (None, *self.samplers):
            raise ValueError(f"a {self.name} model samples with its own sampler ({', '.join(self.samplers)}), "
                             f"not {requested!r}")
        return requested or self.samplers[0]

    def draw(self, model: nn.Module, cfg, *, sampler: str, steps: int, guidance: float | None, label: int | None,
             n_classes: int) -> Callable[[Tensor, Any], tuple[Tensor, int]]:
        """Its own `sampler` bound to a trained model: draw(z, noise) -> (samples, NFE per sample) from unit noise
        z (B, *shape) and its NoiseSource. Methods with `samplers` override this."""
        raise NotImplementedError

    def reconstruct(self, model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Codecs (generates = False): (reconstructions of x, statistics of its codes)."""
        raise NotImplementedError

    def log_prob(self, model: nn.Module, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """The exact log-density (B,) of x (B, *shape) for methods with likelihood = "exact"."""
        raise NotImplementedError


def labels_of(label: int | None, z: Tensor) -> Tensor | None:
    """The class `label` for every row of z, or None (unconditional)."""
    return None if label is None else torch.full((len(z),), label, dtype=torch.long, device=z.device)


def quote(folder: str | FilePath) -> str:
    """A folder as a YAML string for a config override: unquoted, `1`, `on` or `a #b` would parse as a number,
    a bool, or be cut short."""
    return json.dumps(str(FilePath(folder)))
