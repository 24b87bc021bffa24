"""A residual MLP for vector data (2-D toys, flattened small images): F(x, c_noise, cond)."""
from __future__ import annotations

from torch import Tensor, nn

from diffkit.nets.embed import Conditioning


class Block(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(x) * (1 + scale) + shift))), modulated by the embedding (adaLN-style)."""

    def __init__(self, width: int, emb: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(emb, 2 * width)
        self.ff = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        scale, shift = self.mod(e).chunk(2, dim=1)
        return h + self.ff(self.norm(h) * (1 + scale) + shift)


class MLP(nn.Module):
    """dim -> width -> depth residual blocks -> dim. num_classes > 0 adds a label embedding (None = no label);
    extra_scalars > 0 makes forward require `extra`, (B, extra_scalars) floats embedded beside c_noise."""

    muon_exclude = ("inp", "out", "cond")  # input/output layers and embeddings stay on AdamW

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb: int = 128, num_classes: int = 0,
                 extra_scalars: int = 0, dropout: float = 0.0):
        super().__init__()
        self.cond = Conditioning(emb, features=emb, num_classes=num_classes, extra_scalars=extra_scalars)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(Block(width, emb, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        shape = x.shape
        e = self.cond(c_noise, cond, extra, shape[0])
        h = self.inp(x.reshape(shape[0], -1))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h).reshape(shape)
