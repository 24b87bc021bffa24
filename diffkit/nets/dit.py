"""A Diffusion Transformer (DiT, Peebles & Xie 2023): F(x, c_noise, cond, extra=None), x (B, C, H, W).

Patchify with a stride-p conv, add a fixed 2-D sin-cos position embedding (§3.2), run `depth` transformer
blocks with adaLN-Zero (§3.2): each block regresses shift, scale and gate for its attention and MLP branches
from the conditioning vector, and the regression starts at zero so every block starts as the identity. A final
adaLN + linear layer (also zero-initialised) maps tokens to patch pixels, and unpatchify restores the image.
So at initialisation F = 0 exactly. Attention is `scaled_dot_product_attention`.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkit.nets.embed import Conditioning
from diffkit.nets.moe import MoE, mlp
from diffkit.nets.recompute import run_block


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) fixed position embedding: half the channels encode the row, half the column (§3.2)."""
    if dim % 4:
        raise ValueError(f"DiT width must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        angle = p.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """x + gate * Attn(adaLN(x)); x + gate * MLP(adaLN(x)); shift/scale/gate = Linear(SiLU(e)), zero at init."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, moe: dict | None = None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        if moe is None:
            self.mlp = mlp(width, hidden, dropout)
        else:  # the same active parameters as the dense MLP unless moe names its own `hidden`
            moe = {"hidden": max(1, hidden // moe.get("top_k", 2)), "dropout": dropout, **moe}
            self.mlp = MoE(width, **moe)
        self.ada = nn.Linear(width, 6 * width)  # zero-initialised by DiT._init (adaLN-Zero)

    def attention(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, w))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(e).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """(B, in_channels, image_size, image_size) -> same shape, through (image_size / patch_size)^2 tokens.

    num_classes > 0 adds a label embedding (cond = num_classes or None: no label). extra_scalars > 0 makes
    forward require `extra`, (B, extra_scalars) floats embedded beside c_noise (e.g. a shortcut model's d).
    DiT-S/2 is the default (width 384, depth 12, 6 heads). moe, a dict of nets.moe.MoE's arguments (e.g.
    {experts: 8, top_k: 2, balance: aux_free}), puts a mixture-of-experts MLP in every block.
    grad_checkpoint recomputes each block's activations in the backward pass instead of storing them
    (nets.recompute).
    """

    muon_exclude = ("patch", "cond", "final")  # patch embedding, conditioning embeddings, output layer

    def __init__(self, image_size: int, in_channels: int, patch_size: int = 2, width: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4, num_classes: int = 0, extra_scalars: int = 0,
                 dropout: float = 0.0, moe: dict | None = None, grad_checkpoint: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}: "
                             "choose a patch size that divides it, or pad the images")
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        known = set(inspect.signature(MoE).parameters) - {"width"}
        if moe is not None and set(moe) - known:
            raise ValueError(f"unknown model.args.moe keys {sorted(set(moe) - known)}; expected some of {sorted(known)}")
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.grad_checkpoint = grad_checkpoint
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(image_size // patch_size, width), persistent=False)
        self.cond = Conditioning(width, features=256, num_classes=num_classes, extra_scalars=extra_scalars)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, moe) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, patch_size**2 * in_channels)
        self._init()

    def _init(self) -> None:
        # DiT's initialisation: Xavier-uniform linears and patch conv (as a linear), N(0, 0.02) label table,
        # then adaLN-Zero: every modulation and the output layer start at zero.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:  # an MoE router has none
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        if self.cond.labels is not None:
            nn.init.normal_(self.cond.labels.table.weight, std=0.02)
        for m in [block.ada for block in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,), cond (B,) int64 labels or None, extra (B, extra_scalars) or None."""
        s, p = self.image_size, self.patch_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, s, s):
            raise ValueError(f"DiT was built for (B, {self.in_channels}, {s}, {s}) inputs, got {tuple(x.shape)}: "
                             "build it with the data's in_channels and image_size")
        b, g = x.shape[0], s // p
        e = F.silu(self.cond(c_noise, cond, extra, b))
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, g*g, width)
        for block in self.blocks:
            h = run_block(block, self.grad_checkpoint, h, e)
        shift, scale = self.final_ada(e).chunk(2, dim=1)
        h = self.final(_modulate(self.final_norm(h), shift, scale))  # (B, g*g, p*p*C)
        # Unpatchify: token (i, j) holds the p x p x C pixels of patch (i, j).
        h = h.reshape(b, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.in_channels, s, s)
