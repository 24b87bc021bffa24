"""A DDPM++-style UNet for images: F(x, c_noise, cond, extra=None), x (B, C, H, W).

The layout is DDPM's (Ho et al. 2020, App. B): per resolution level `num_res_blocks` residual blocks
(GroupNorm, SiLU, 3x3 conv, the conditioning added through a projection between the two convs), self-attention
at the resolutions in `attn_resolutions`, a strided-conv downsample between levels; a middle res-attn-res; an
up path of `num_res_blocks + 1` blocks per level, each fed one skip from the down path, with nearest-neighbour
upsampling. From DDPM++ (Song et al. 2021, App. H): residual sums are scaled by 1/sqrt(2). As in both papers'
code, the last layer of every residual branch and of the network starts at zero, so the net starts at F = 0.

Attention runs on (B, H*W, C) tokens through `scaled_dot_product_attention`; with channels_last inputs the
token view needs no copy. Forward has no data-dependent Python control flow, so it compiles as one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkit.nets.embed import Conditioning
from diffkit.nets.recompute import run_block

SKIP_SCALE = 1 / math.sqrt(2)  # DDPM++: keeps the variance of residual sums constant


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """(x + conv(drop(act(norm(conv(act(norm(x))) + W e))))) / sqrt(2), with a 1x1 conv on x when channels change."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.drop = nn.GroupNorm(groups, cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * SKIP_SCALE


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual: (x + proj(SDPA(qkv(norm(x))))) / sqrt(2)."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(channels // head_channels, 1)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): a view when x is channels_last
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return (x + self.proj(a).transpose(1, 2).reshape(b, c, h, w)) * SKIP_SCALE


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """in_channels -> out_channels (default in_channels) UNet; level i has channels * channel_mult[i] channels
    at resolution image_size / 2^i. The DDPM CIFAR-10 net is UNet(3, image_size=32) (35.7M parameters).

    num_classes > 0 adds a label embedding (cond = num_classes or None: no label). extra_scalars > 0 makes
    forward require `extra`, (B, extra_scalars) floats embedded beside c_noise (e.g. a shortcut model's d).
    Inputs of any H, W divisible by 2^(len(channel_mult) - 1) work; attention sits at the levels chosen for
    image_size. grad_checkpoint recomputes each block's activations in the backward pass instead of storing them
    (nets.recompute).
    """

    muon_exclude = ("inp", "out", "cond")  # input/output convs and the embeddings stay on AdamW

    def __init__(self, in_channels: int, out_channels: int | None = None, *, channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] | None = None, dropout: float = 0.1, num_classes: int = 0,
                 extra_scalars: int = 0, image_size: int = 32, num_groups: int = 32, head_channels: int = 64,
                 grad_checkpoint: bool = False):
        super().__init__()
        self.in_channels, self.factor = in_channels, 2 ** (len(channel_mult) - 1)
        self.grad_checkpoint = grad_checkpoint
        widths = [channels * m for m in channel_mult]
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        if attn_resolutions is None:  # DDPM's choice, attention at 16x16 of 32x32 images: at half the image side
            attn_resolutions = (image_size // 2,)
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(channel_mult) - 1) = {self.factor}: "
                             "pad the images or use fewer levels in channel_mult")
        if not set(attn_resolutions) <= set(resolutions):
            raise ValueError(f"attn_resolutions {tuple(attn_resolutions)} must be among the level resolutions "
                             f"{tuple(resolutions)} of image_size {image_size}")
        if any(w % num_groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by num_groups={num_groups}")
        emb = 4 * channels
        self.cond = Conditioning(emb, features=channels, num_classes=num_classes, extra_scalars=extra_scalars)
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)

        def level_blocks(cin: int, cout: int, res: int) -> list[nn.Module]:
            blocks = [ResBlock(cin, cout, emb, dropout, num_groups)]
            return blocks + [Attention(cout, head_channels, num_groups)] if res in attn_resolutions else blocks

        # Down path; `skips` records the channels of each tensor the up path will concatenate.
        self.down, skips, c = nn.ModuleList(), [channels], channels
        for i, (w, res) in enumerate(zip(widths, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList(level_blocks(c, w, res)))
                c = w
                skips.append(c)
            if i < len(widths) - 1:
                self.down.append(nn.ModuleList([Downsample(c)]))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout, num_groups), Attention(c, head_channels, num_groups),
                                  ResBlock(c, c, emb, dropout, num_groups)])
        # Up path: each block takes one skip; the first block of a level follows an upsample.
        self.up = nn.ModuleList()
        for i, (w, res) in reversed(list(enumerate(zip(widths, resolutions)))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList(level_blocks(c + skips.pop(), w, res)))
                c = w
            if i > 0:
                self.up.append(nn.ModuleList([Upsample(c)]))
        self.out = nn.Sequential(nn.GroupNorm(num_groups, c), nn.SiLU(),
                                 _zero(nn.Conv2d(c, out_channels or in_channels, 3, padding=1)))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,), cond (B,) int64 labels or None, extra (B, extra_scalars) or None."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) with H and W divisible by {self.factor}, "
                             f"got {tuple(x.shape)}: check in_channels, or pad/crop the images")
        e = F.silu(self.cond(c_noise, cond, extra, x.shape[0]))
        h = self.inp(x)
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = run_block(block, self.grad_checkpoint, h, e)
            hs.append(h)
        for block in self.mid:
            h = run_block(block, self.grad_checkpoint, h, e)
        for blocks in self.up:
            if not isinstance(blocks[0], Upsample):
                h = torch.cat([h, hs.pop()], dim=1)
            for block in blocks:
                h = run_block(block, self.grad_checkpoint, h, e)
        return self.out(h)
