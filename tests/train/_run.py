"""A small training job run in a subprocess by the trainer tests (plain, under torchrun, or to be killed)."""
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffkit import data, paths
from diffkit.nets.mlp import MLP
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train.loop import TrainSettings, train


def job(run_dir: Path, steps: int, micro: int, sleep: float = 0.0, optimizer: str = "adamw",
        ctrl_c_at: int | None = None):
    """ctrl_c_at: the objective call during which Ctrl-C is pressed (a SIGINT to this process)."""
    torch.manual_seed(0)  # same initial weights everywhere
    path = paths.RectifiedFlow()
    model = Precond(MLP(2, width=64, depth=2), path, "velocity")
    objective = Denoising(path)
    calls = []

    def slow(*args, **kw):
        time.sleep(sleep)
        calls.append(1)
        if len(calls) == ctrl_c_at:
            signal.raise_signal(signal.SIGINT)
        return objective(*args, **kw)

    x = data.toy("checkerboard", 512, torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=steps, batch=64, micro_batch=micro, lr=3e-3, warmup=5, checkpoint_every=5,
                             log_every=5, optimizer=optimizer, ema_decay=0.9)
    ema = train(model, slow, x, None, settings, run_dir, config={"job": "test"}, progress=False)
    return model, ema


if __name__ == "__main__":
    run_dir, steps, micro, sleep = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model, _ = job(run_dir, steps, micro, sleep)
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / f"final-rank{rank}.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()
