"""A MoE DiT trained by the loop in a subprocess: alone, or as one of two processes under torchrun."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffkit import paths
from diffkit.nets.dit import DiT
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train.loop import TrainSettings, train


def job(run_dir: Path, steps: int, micro: int):
    torch.manual_seed(0)
    net = DiT(8, 1, patch_size=2, width=16, depth=2, heads=2,
              moe={"experts": 4, "top_k": 2, "balance": "aux_free", "bias_rate": 0.01})
    model = Precond(net, paths.RectifiedFlow(), "velocity")
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=steps, batch=16, micro_batch=micro, warmup=1, log_every=steps,
                             checkpoint_every=steps, ema_decay=0.9)
    train(model, Denoising(paths.RectifiedFlow()), x, None, settings, run_dir, progress=False)
    return model


if __name__ == "__main__":
    run_dir, steps, micro = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model = job(run_dir, steps, micro)
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / f"final-rank{rank}.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()
