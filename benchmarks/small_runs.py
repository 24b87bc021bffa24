"""Small runs for the training-stack benchmark (optimizers.py, scaling.py): an MLP denoiser on digits (the
default config) or on a 2-D toy (a config file such as configs/checkerboard-fm.yaml), trained with diffkit's own
loop and scored by its held-out training objective.

`curve` trains segment by segment (the loop resumes each from the last checkpoint). With a constant learning
rate after warm-up (train.cosine=false) a run stopped and resumed at step k is exactly the run that was never
stopped (diffkit.train.loop), so the curve costs one run; scores use the EMA weights with EDM's ramp-up
(half-life <= 5% of the steps so far), so the score at step k stands for a run of k steps.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from diffkit import config as configs
from diffkit import generate, run
from diffkit.train.loop import train

BASE = ["train.batch=128", "train.warmup=50", "train.ema_rampup=0.05", "train.log_every=1000000",
        "train.checkpoint_every=1000000", "train.keep=1", "sample.steps=18"]


class SmallRun:
    """One configured MLP run (`config`: a YAML file, None = digits): its config, data, model and objective."""

    def __init__(self, width: int, depth: int, overrides: list[str] = (), *, conditional: bool = False,
                 config: Path | None = None):
        self.cfg = configs.load(config, [*BASE, f"model.args={{width: {width}, depth: {depth}}}",
                                       f"data.conditional={str(conditional).lower()}", *overrides])
        self.x, self.y = configs.dataset(self.cfg, "train")
        self.x_test, self.y_test = configs.dataset(self.cfg, "test")
        self.classes = configs.num_classes(self.cfg, self.y)
        torch.manual_seed(self.cfg.train.seed)
        self.model = configs.model(self.cfg, tuple(self.x.shape[1:]), self.classes)
        if self.cfg.model.init is not None:  # a run started from a trained one (with adapters: fine-tuning)
            self.model.load_state_dict(run.start_weights(self.cfg, tuple(self.x.shape[1:]), self.classes, self.x,
                                                         self.y))
        self.objective = configs.objective(self.cfg, self.classes)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.seconds = 0.0

    def train(self, steps: int, folder: Path):
        """Train (or resume) to `steps` in `folder`; returns the EMA."""
        t0 = time.perf_counter()
        settings = dataclasses.replace(self.cfg.train, steps=steps)
        ema = train(self.model, self.objective, self.x, self.y, settings, folder, progress=False)
        self.seconds += time.perf_counter() - t0
        return ema

    @torch.no_grad()
    def heldout_loss(self, model, repeats: int = 4) -> float:
        """The objective on the held-out split, averaged over `repeats` fixed noise draws (the same for every run)."""
        model.eval()
        total = 0.0
        for r in range(repeats):
            cond = self.y_test if self.y is not None else None
            gen = torch.Generator().manual_seed(1000 + r)
            total += self.objective(model, self.x_test, cond, generator=gen).mean().item() / repeats
        model.train()
        return total if math.isfinite(total) else math.inf

    def curve(self, at: list[int], folder: Path, measure: Callable | None = None) -> list[dict]:
        """Rows {step, loss (EMA held-out), seconds, **measure(self, ema)} at each step count in `at`."""
        rows = []
        for steps in at:
            ema = self.train(steps, folder)
            row = {"step": steps, "loss": self.heldout_loss(ema.model), "seconds": self.seconds}
            rows.append(row | (measure(self, ema) if measure else {}))
        return rows

    def quality(self, ema, n: int = 500) -> dict:
        """run.evaluate's distances of n EMA samples (the config's sampler and grid) to the held-out split:
        classifier FD / KID on digits, sliced W / energy distance / MMD on a 2-D toy."""
        samples, _ = generate.sample(ema.model, self.cfg, tuple(self.x.shape[1:]), n, n_classes=self.classes,
                                     progress=False)
        return run.evaluate(self.cfg, samples)
