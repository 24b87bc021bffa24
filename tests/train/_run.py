"""A small training job run in a subprocess by the trainer tests (plain, under torchrun, or to be killed).

python _run.py RUN_DIR STEPS MICRO SLEEP [NET PARALLEL]: NET "mlp" (2-D toy data) or "dit" (4x4 images),
PARALLEL "ddp" or "fsdp" under torchrun."""
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffkit import data, paths
from diffkit.nets.dit import DiT
from diffkit.nets.mlp import MLP
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train.loop import TrainSettings, train


def job(run_dir: Path, steps: int, micro: int, sleep: float = 0.0, optimizer: str = "adamw",
        ctrl_c_at: int | None = None, net: str = "mlp", parallel: str = "ddp", grad_clip: float | str = 1.0):
    """ctrl_c_at: the objective call during which Ctrl-C is pressed (a SIGINT to this process)."""
    torch.manual_seed(0)  # same initial weights everywhere
    path = paths.RectifiedFlow()
    if net == "dit":
        model = Precond(DiT(4, 1, patch_size=2, width=16, depth=2, heads=2, mlp_ratio=2), path, "velocity")
        x = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    else:
        model = Precond(MLP(2, width=64, depth=2), path, "velocity")
        x = data.toy("checkerboard", 512, torch.Generator().manual_seed(0))
    objective = Denoising(path)
    calls = []

    def slow(*args, **kw):
        time.sleep(sleep)
        calls.append(1)
        if len(calls) == ctrl_c_at:
            signal.raise_signal(signal.SIGINT)
        return objective(*args, **kw)

    settings = TrainSettings(steps=steps, batch=64, micro_batch=micro, lr=3e-3, warmup=5, checkpoint_every=5,
                             log_every=5, optimizer=optimizer, ema_decay=0.9, parallel=parallel,
                             grad_clip=grad_clip)
    ema = train(model, slow, x, None, settings, run_dir, config={"job": "test"}, progress=False)
    return model, ema


if __name__ == "__main__":
    run_dir, steps, micro, sleep = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    net, parallel = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else ("mlp", "ddp")
    model, ema = job(run_dir, steps, micro, sleep, net=net, parallel=parallel)
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / f"final-rank{rank}.safetensors")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, run_dir / f"ema-rank{rank}.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()
