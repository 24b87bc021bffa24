"""A small convolutional autoencoder with a choice of bottleneck: the tokenizer of latent diffusion.

    x (C, H, W) -> encoder -> z (latent_dim, H / 2^k, W / 2^k) -> bottleneck -> z_q -> decoder -> x_hat

The bottleneck is one config value (`bottleneck`):

    continuous  z_q = z (a plain autoencoder; no codes)
    ste         VQ-VAE's nearest code with the straight-through gradient (van den Oord et al. 2017, Eq. 3), the
                codebook updated by an exponential moving average of its assigned vectors (App. A.1)
    rotation    the same codebook, with the rotation trick's gradient (Fifty et al. 2024, Eq. 4: z_q = sg[lambda R] z,
                R rotating z onto its code; the forward value is the code itself)
    simvq       SimVQ (Zhu et al. 2024): codes = W C, a frozen random basis C through one trained linear map W
    fsq         FSQ (Mentzer et al. 2023, Eq. 1-2): each of len(levels) projected dimensions bounded and rounded
                to its levels; the implicit codebook has prod(levels) codes

All four quantizers come from `vector-quantize-pytorch` (a maintained implementation of each; their options are
its defaults except where this docstring says): only the encoder, the decoder and this switch are ours.
`codebook_size` is shared; FSQ takes the paper's levels for it (Table 1: 2^8 -> (8, 6, 5), 240 codes).
The net imports only torch and that library, and knows nothing of training.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

BOTTLENECKS = ("continuous", "ste", "rotation", "simvq", "fsq")
FSQ_LEVELS = {2 ** 8: (8, 6, 5), 2 ** 10: (8, 5, 5, 5), 2 ** 12: (7, 5, 5, 5, 5), 2 ** 14: (8, 8, 8, 6, 5),
              2 ** 16: (8, 8, 8, 5, 5, 5)}  # Mentzer et al. 2023, Table 1


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def quantizer(bottleneck: str, latent_dim: int, codebook_size: int) -> nn.Module | None:
    """The bottleneck module on (B, latent_dim, h, w) maps; None for "continuous"."""
    if bottleneck not in BOTTLENECKS:
        raise ValueError(f"unknown bottleneck {bottleneck!r}; choose one of {', '.join(BOTTLENECKS)}")
    if bottleneck == "continuous":
        return None
    try:
        import vector_quantize_pytorch as vq
    except ImportError as err:
        raise ImportError(f"bottleneck={bottleneck} needs vector-quantize-pytorch: pip install 'diffkit[tokenizers]'") \
            from err
    if bottleneck == "fsq":
        if codebook_size not in FSQ_LEVELS:
            raise ValueError(f"fsq takes the paper's levels for codebook_size in {sorted(FSQ_LEVELS)}, "
                             f"got {codebook_size}")
        return vq.FSQ(list(FSQ_LEVELS[codebook_size]), dim=latent_dim, channel_first=True)
    if bottleneck == "simvq":
        return vq.SimVQ(latent_dim, codebook_size, channel_first=True)
    # Plain STE needs rotation_trick=False said explicitly: the library turns the trick on whenever dim > 1.
    return vq.VectorQuantize(latent_dim, codebook_size, rotation_trick=bottleneck == "rotation",
                             accept_image_fmap=True)


class Autoencoder(nn.Module):
    """Encoder (`downsample` stride-2 stages of `channels` x 2^i) -> bottleneck -> mirrored decoder.

    in_channels, image_size: the data's; num_classes must be 0 (a tokenizer sees no labels).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 0, *, channels: int = 32,
                 downsample: int = 2, latent_dim: int = 4, bottleneck: str = "rotation", codebook_size: int = 256):
        super().__init__()
        if num_classes:
            raise ValueError("a tokenizer is trained without labels: set data.conditional=false")
        if downsample < 0 or image_size % 2 ** downsample:
            raise ValueError(f"image_size {image_size} must be divisible by 2^downsample = 2^{downsample}")
        self.bottleneck, self.latent_dim = bottleneck, latent_dim
        self.codebook_size = (math.prod(FSQ_LEVELS[codebook_size]) if bottleneck == "fsq" and
                              codebook_size in FSQ_LEVELS else codebook_size)
        self.latent_size = image_size // 2 ** downsample
        self.quantizer = quantizer(bottleneck, latent_dim, codebook_size)
        widths = [channels * 2 ** i for i in range(downsample + 1)]
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for a, b in zip(widths, widths[1:]):
            enc += [ResBlock(a), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]), nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(),
                nn.Conv2d(widths[-1], latent_dim, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent_dim, widths[-1], 3, padding=1), ResBlock(widths[-1])]
        for a, b in zip(widths[::-1], widths[-2::-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), ResBlock(b)]
        dec += [nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's output z (B, latent_dim, h, w): the bottleneck's input."""
        return self.encoder(x)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(z_q, code indices (B, h, w) or None, auxiliary loss): the bottleneck applied to z."""
        if self.quantizer is None:
            return z, None, z.new_zeros(())
        out = self.quantizer(z)
        z_q, indices = out[0], out[1]
        aux = out[2] if len(out) > 2 else z.new_zeros(())  # FSQ has no commitment or codebook loss
        return z_q, indices.long(), aux

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(reconstruction, code indices or None, auxiliary loss) of x (B, C, H, W)."""
        z_q, indices, aux = self.quantize(self.encode(x))
        return self.decode(z_q), indices, aux

