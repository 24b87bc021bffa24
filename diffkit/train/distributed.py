"""Training on several processes (torchrun): DDP, or FSDP2 (`train.parallel`), behind one small interface.

- "ddp": every process holds the whole net, optimizer state and EMA; DistributedDataParallel all-reduces the
  gradients on the last micro-batch of a step.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023) shards the parameters, gradients and
  optimizer state over the processes: each block (the outermost modules held in the net's nn.ModuleLists: DiT
  and MLP blocks, the UNet's res / attention / resampling blocks) is one unit gathered just before its forward
  and backward, and the net itself holds what is left. The EMA copy is sharded the same way, so its update is a
  local lerp of shards and an objective that reads the EMA (shortcut models) calls it as the net is called.

Checkpoints stay one format whatever wrote them: the sharded states are gathered into full tensors
(`DTensor.full_tensor`, one tensor at a time, kept on rank 0) and saved as a single process saves them, and a
checkpoint is loaded into full weights before sharding and into the optimizers by cutting each full state
tensor into the shard of its parameter (`distribute_tensor`). So a run moves between one process, DDP and FSDP
at any checkpoint. The gradient clip's global norm over sharded gradients is all-reduced (train.clip).
Optimizers step the shards as DTensors, whose operations are those of the whole tensor: torch's Muon
orthogonalises the whole matrix (one step on a 2-process shard equals one process's to bf16 rounding, as its
Newton-Schulz iteration runs in bf16; tested).

Under FSDP the loop builds the optimizers after sharding (their parameters are the shards), and at the end of
training the net and EMA are gathered back into plain modules on every process, for sampling and export.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

PARALLEL = ("ddp", "fsdp")


def _blocks(module: nn.Module, in_list: bool = False) -> list[nn.Module]:
    """The outermost modules held in nn.ModuleLists below `module` (a list of lists counts as one list): the
    blocks FSDP gathers one at a time. Nothing inside a block is a unit of its own, so a block whose forward
    skips a part (an expert no token was routed to) still makes the same collectives on every rank."""
    found = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            found += _blocks(child, in_list=True)
        elif in_list:
            found.append(child)
        else:
            found += _blocks(child)
    return found


def _plain_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` whose parameters are on the meta device (no memory); buffers are copied as they are."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in net.parameters()}
    return copy.deepcopy(net, memo)


def _full(value, keep: bool):
    """A DTensor gathered into a full tensor (kept only where `keep`); anything else as it is."""
    if not isinstance(value, DTensor):
        return value
    full = value.full_tensor()
    return full if keep else None


def _shard_like(value, param: Tensor):
    """An optimizer state tensor of a sharded parameter's full shape cut to that parameter's shard; anything
    else (a step count, the state of an unsharded parameter) as it is."""
    if isinstance(param, DTensor) and isinstance(value, Tensor) and value.shape == param.shape:
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


class Parallel:
    """How the loop's model is spread over the processes: none (one process), "ddp" or "fsdp"."""

    def __init__(self, kind: str, *, phases: int, monitor: bool):
        if kind not in PARALLEL:
            raise ValueError(f"unknown train.parallel {kind!r}; choose one of: {', '.join(PARALLEL)}")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.kind = kind if self.world > 1 else None
        self.phases = phases
        self._plain: tuple[nn.Module, nn.Module] | None = None
        self._net: nn.Module | None = None  # the DDP wrapper, or the sharded net itself (not its compile wrapper)
        # Refused in one process too, so a config fails where it is tried, not first under torchrun.
        if kind == "fsdp" and phases > 1:
            raise ValueError("train.parallel=fsdp trains objectives of one phase; this one alternates "
                             f"{phases} phases (SiD): use train.parallel=ddp")
        if kind == "fsdp" and monitor:
            raise ValueError("train.parallel=fsdp does not run a method's held-out monitor (tokenizers): "
                             "use train.parallel=ddp")

    def split(self, batch: int, micro: int | None) -> tuple[int, int]:
        """(micro-batch, micro-batches per process) of a global batch; micro None: batch / world size."""
        micro = micro or batch // self.world
        if batch % (self.world * micro):
            raise ValueError(f"batch {batch} must be a multiple of world size {self.world} x micro_batch {micro}")
        return micro, batch // (self.world * micro)

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def shard(self, model: nn.Module, ema_model: nn.Module) -> None:
        """FSDP: shard model.net and ema_model.net in place, block by block (before the optimizers are built)."""
        if not self.sharded:
            return
        self._plain = (_plain_copy(model.net), _plain_copy(ema_model.net))
        self._net = model.net
        for net in (model.net, ema_model.net):
            for block in _blocks(net):
                fully_shard(block)
            fully_shard(net)

    def wrap(self, net: nn.Module, *, unused: bool = False) -> nn.Module:
        """DDP: the net in DistributedDataParallel; otherwise the net itself. unused: some parameters may get no
        gradient in a step (besides those of other phases), e.g. experts no token chose."""
        if self.kind == "ddp":
            self._net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=self.phases > 1 or unused)
            return self._net
        return net

    def sync(self, last: bool):
        """A context for one micro-batch's forward and backward: gradients are reduced across the processes on
        the last micro-batch of a step only (FSDP keeps the earlier ones unsharded until then)."""
        if self.kind == "ddp" and not last:
            return self._net.no_sync()
        if self.sharded:
            self._net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def mean(self, value: Tensor) -> Tensor:
        """The mean over processes of a per-process value (in place)."""
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def state_dict(self, state: dict[str, Tensor], everywhere: bool = False) -> dict[str, Tensor]:
        """A module's state dict with every shard gathered into its full tensor: on rank 0 (on every rank with
        `everywhere`; elsewhere the gathered tensors are dropped). Collective under FSDP: call it on every rank."""
        keep = everywhere or self.rank == 0
        return {k: _full(v, keep) for k, v in state.items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() with full tensors, as one process writes it (collective under FSDP)."""
        state = opt.state_dict()
        keep = self.rank == 0
        state["state"] = {pid: {k: _full(v, keep) for k, v in entries.items()} for pid, entries in state["state"].items()}
        return state

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state (any checkpoint) into `opt`, cutting each tensor to its parameter's shard."""
        params = [p for group in opt.param_groups for p in group["params"]]
        shards = {pid: {k: _shard_like(v, params[pid]) for k, v in entries.items()}
                  for pid, entries in state["state"].items()}
        opt.load_state_dict({**state, "state": shards})

    def unshard(self, model: nn.Module, ema_model: nn.Module) -> None:
        """FSDP: replace the sharded nets of model and ema_model by plain ones holding the full weights."""
        if not self.sharded:
            return
        for holder, plain in zip((model, ema_model), self._plain):
            plain.load_state_dict(self.state_dict(holder.net.state_dict(), everywhere=True), assign=True)
            holder.net = plain
