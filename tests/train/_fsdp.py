"""The FSDP jobs of test_distributed.py, run under torchrun with 2 gloo processes.

python _fsdp.py train OUT: the tiny-DiT job of _run.py, sharded, 12 steps; each rank saves its final weights and EMA.
python _fsdp.py resume OUT CHECKPOINT...: for each checkpoint (any writer), a run folder holding only it, trained
sharded to step 12; each saves its final weights.
python _fsdp.py muon OUT: one torch Muon step on a sharded matrix; rank 0 saves the gathered weights.
"""
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from _run import job


def save(state: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def muon_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """A (48, 16) weight and gradient: an uneven split would show too."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 16, generator=g), torch.randn(48, 16, generator=g)


def main(mode: str, out: Path, *sources: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "train":
        model, ema = job(out, steps=12, micro=16, net="dit", parallel="fsdp")
        save(model.state_dict(), out / f"final-rank{rank}.safetensors")
        save(ema.state_dict(), out / f"ema-rank{rank}.safetensors")
    elif mode == "resume":
        for i, source in enumerate(map(Path, sources)):
            run = out / f"resumed{i}"
            if rank == 0:
                shutil.copytree(source, run / "checkpoints" / source.name)
            dist.barrier()
            model, _ = job(run, steps=12, micro=16, net="dit", parallel="fsdp")
            save(model.state_dict(), run / f"final-rank{rank}.safetensors")
    elif mode == "muon":
        w, g = muon_matrix()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        p = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        torch.optim.Muon([p], lr=0.02).step()
        full = p.detach().full_tensor()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save({"weight": full}, out / "muon.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
