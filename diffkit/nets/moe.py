"""A mixture-of-experts MLP with top-k token-choice routing, for the DiT's blocks (`model.args.moe`).

Routing (DeepSeek-V3, Liu et al. 2024, §2.1.2 eqs. 12-16; older models use softmax scores):
    s_i = sigmoid(u . e_i)  (or softmax over i),     chosen = topk_i(s_i + b_i, k),
    g_i = s_i / sum_{j in chosen} s_j  for i in chosen (k > 1; k = 1 keeps g = s_i so the router still learns),
    y = sum_{i in chosen} g_i FFN_i(u)  +  sum of the shared experts' FFN(u).
The bias b is used for selection only, never in the gate weights.

Balancing (`balance`):
- "none".
- "aux_loss": the classic auxiliary loss (Switch Transformer, Fedus et al. 2021, eq. 4, with top-k counts as in
  GShard): alpha E sum_i f_i P_i, f_i = share of the k T routing slots that went to expert i, P_i = the mean
  normalised score of expert i. `aux_loss()` hands it to the training loop, which adds it to the objective.
- "aux_free": auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664, Alg. 1; DeepSeek-V3 eq. 16 ff.):
  after every optimizer step b_i <- b_i + gamma sign(mean load - load_i), the loads counted over the whole
  step (every micro-batch, and every process under torchrun). b is a buffer: checkpoints and the EMA carry it.

Every training forward counts each expert's load; `after_step` closes a step (bias update, history) and `drain`
returns the per-step MaxVio (max load / mean load - 1) and the per-expert loads since the last drain, for the
loop's log. Written by hand: the MoE layers in torchtitan, Megatron and DeepSpeed are tied to their own
parallelism. Experts run as a loop over experts on their gathered tokens (plain Linear layers, so Muon, the
spectral parametrization and adapters treat them like any MLP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffkit.nets.recompute import recomputing

SCORES = ("sigmoid", "softmax")
BALANCE = ("none", "aux_loss", "aux_free")


def mlp(width: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """The transformer MLP, Linear -> GELU(tanh) -> Dropout -> Linear: the DiT's, and each expert's."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                         nn.Linear(hidden, width))


def max_violation(load: Tensor) -> Tensor:
    """MaxVio of expert loads (..., E): the largest load over the mean load, minus 1 (0 is perfect balance)."""
    load = load.float()
    return load.max(-1).values / load.mean(-1) - 1


class MoE(nn.Module):
    """(..., width) -> (..., width): `experts` routed MLPs of `hidden` units, `top_k` per token, plus `shared`.

    hidden defaults to the dense MLP's hidden / top_k, so a token passes through as many parameters as in the
    dense block (the same active parameters)."""

    def __init__(self, width: int, hidden: int, *, experts: int = 8, top_k: int = 2, score: str = "sigmoid",
                 shared: int = 0, balance: str = "aux_free", bias_rate: float = 1e-3, aux_weight: float = 1e-2,
                 dropout: float = 0.0):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown MoE score {score!r}; expected one of {SCORES}")
        if balance not in BALANCE:
            raise ValueError(f"unknown MoE balance {balance!r}; expected one of {BALANCE}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"MoE top_k must be in [1, experts={experts}], got {top_k}")
        if shared < 0 or hidden < 1:
            raise ValueError(f"MoE needs shared >= 0 and hidden >= 1, got shared={shared}, hidden={hidden}")
        self.top_k, self.score, self.balance = top_k, score, balance
        self.bias_rate, self.aux_weight = bias_rate, aux_weight
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(mlp(width, hidden, dropout) for _ in range(experts))
        self.shared = nn.ModuleList(mlp(width, hidden, dropout) for _ in range(shared))
        self.register_buffer("bias", torch.zeros(experts))
        self.register_buffer("load", torch.zeros(experts), persistent=False)  # tokens per expert this step
        self._aux: Tensor | None = None
        self._counted = False  # a training forward counted loads this step (known on the host: no read-back)
        self._history: list[Tensor] = []  # per-step loads since the last drain, on the device

    def route(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T, width) tokens -> (chosen (T, k) expert indices, gates (T, k), scores (T, E))."""
        logits = self.router(u).float()
        s = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(-1)
        chosen = (s + self.bias).topk(self.top_k, dim=-1).indices  # the bias chooses ...
        gates = s.gather(-1, chosen)  # ... the unbiased scores weigh
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return chosen, gates, s

    def forward(self, x: Tensor) -> Tensor:
        u = x.reshape(-1, x.shape[-1])
        chosen, gates, s = self.route(u)
        # Group the (token, slot) pairs by expert: one read-back per layer (the group sizes), not one per expert.
        flat = chosen.flatten()
        counts = torch.bincount(flat, minlength=len(self.experts))
        order = flat.argsort(stable=True)
        out = torch.zeros_like(u)
        for expert, pairs in zip(self.experts, order.split(counts.tolist())):
            if len(pairs):
                token, slot = pairs // self.top_k, pairs % self.top_k
                out.index_add_(0, token, expert(u[token]) * gates[token, slot, None].to(u.dtype))
        for expert in self.shared:
            out = out + expert(u)
        if self.training and torch.is_grad_enabled():
            # Under grad_checkpoint the backward pass runs this forward again: it must save the same tensors
            # (so the aux loss is computed again) but count and hand over nothing a second time.
            again = recomputing()
            if not again:
                self.load += counts.to(self.load)
                self._counted = True
            if self.balance == "aux_loss":
                f = counts / chosen.numel()
                p = (s / s.sum(-1, keepdim=True)).mean(0)
                aux = self.aux_weight * len(self.experts) * (f * p).sum()
                if not again:
                    self._aux = aux if self._aux is None else self._aux + aux
        return out.reshape(x.shape)

    def aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the training forwards since the last call (None without one), then reset."""
        aux, self._aux = self._aux, None
        return aux

    @torch.no_grad()
    def after_step(self, applied: bool) -> None:
        """Close one training step: with `applied` (the optimizer stepped), record its load and, under
        aux_free, move the bias towards balance; a skipped step's counts are dropped."""
        if applied and self._counted:
            if dist.is_initialized():
                dist.all_reduce(self.load)
            if self.balance == "aux_free":
                self.bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
            self._history.append(self.load.clone())
        self.load.zero_()
        self._aux, self._counted = None, False

    def drain(self) -> dict:
        """Log fields for the steps closed since the last drain: MaxVio of each step, and each expert's share of
        the routing slots over them."""
        if not self._history:
            return {}
        loads = torch.stack(self._history).cpu()
        self._history.clear()
        return {"maxvio": max_violation(loads).tolist(), "load": (loads.sum(0) / loads.sum()).tolist()}
