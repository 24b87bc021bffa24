"""The .ddcm file format (version 1): a DDCM bitstream (diffkit.codecs.ddcm) with everything needed to check it.

All integers little-endian; offsets in bytes.

    0   4  magic b"DDCM"
    4   1  format version (1)
    5   8  model fingerprint: the first 8 bytes of the sha256 of the model's weights (`fingerprint`)
    13  4  grid fingerprint: the first 4 bytes of the sha256 of the float64 sigma grid
    17  4  K, codebook size (uint32, a power of two)
    21  1  M, atoms per step (uint8)
    22  1  C, bits per mixing coefficient (uint8)
    23  2  T, sampler steps (uint16); T - 1 of them are coded
    25  4  codebook seed (uint32)
    29  2  image height, 30 2 image width (uint16 each, at most MAX_SIDE)
    33  1  channels (uint8: 1 or 3)
    34  2  tile side (uint16)
    36  -  payload: for each tile in row-major order (tiles cover the image padded at its right and bottom edges
           to a multiple of the tile side), for each coded step: M indices of log2 K bits, then M - 1
           coefficient levels of C bits; most significant bit first, zero bits to the end of the last byte
    -4  4  CRC-32 (zlib) of every byte before it

A file is refused, with an error naming the problem, when it is too short, has another magic or a newer
version, fails its CRC, declares values outside these ranges, or holds a payload of another length than its
header implies (checked before anything is allocated, so a forged size cannot exhaust memory). The model and
grid fingerprints are checked by the decoder against the model and grid it was given.
"""
from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from diffkit.codecs.ddcm import Settings

MAGIC, VERSION = b"DDCM", 1
HEADER = struct.Struct("<4sB8s4sIBBHIHHBH")
MAX_SIDE = 16384


class FormatError(ValueError):
    """A .ddcm file that cannot be decoded (the message says why)."""


@dataclass(frozen=True, eq=False)
class Stream:
    """A parsed file: settings, image geometry, fingerprints and the coded tiles' indices (N, T - 1, M) and
    levels (N, T - 1, M - 1)."""

    settings: Settings
    height: int
    width: int
    channels: int
    tile: int
    model: bytes
    grid: bytes
    indices: torch.Tensor
    levels: torch.Tensor

    @property
    def tiles(self) -> tuple[int, int]:
        """Tile rows and columns."""
        return -(-self.height // self.tile), -(-self.width // self.tile)


def fingerprint(state: dict[str, torch.Tensor]) -> bytes:
    """The first 8 bytes of the sha256 over a state dict's names and float32 values, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.digest()[:8]


def grid_fingerprint(sigmas: torch.Tensor) -> bytes:
    return hashlib.sha256(sigmas.detach().to("cpu", torch.float64).numpy().tobytes()).digest()[:4]


def _fields(s: Settings) -> list[int]:
    return [int(math.log2(s.k))] * s.atoms + [s.coef_bits] * (s.atoms - 1)


def _payload_bits(s: Settings, n_tiles: int) -> int:
    return n_tiles * s.bits_per_tile()


def pack(stream: Stream) -> bytes:
    """The file's bytes."""
    s = stream.settings
    rows, cols = stream.tiles
    table = torch.cat([stream.indices, stream.levels], 2).reshape(-1, 2 * s.atoms - 1).numpy().astype(np.int64)
    bits = np.hstack([(table[:, [f]] >> np.arange(w - 1, -1, -1)) & 1 for f, w in enumerate(_fields(s))])
    head = HEADER.pack(MAGIC, VERSION, stream.model, stream.grid, s.k, s.atoms, s.coef_bits, s.steps, s.seed,
                       stream.height, stream.width, stream.channels, stream.tile)
    body = head + np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes) -> Stream:
    """Parse and check a file's bytes (module docstring); FormatError names what is wrong."""
    if len(data) < HEADER.size + 4:
        raise FormatError(f"not a .ddcm file: {len(data)} bytes, shorter than the {HEADER.size + 4}-byte header "
                          "and checksum (a truncated file?)")
    if data[:4] != MAGIC:
        raise FormatError(f"not a .ddcm file: it starts with {data[:4]!r}, not {MAGIC!r}")
    if data[4] != VERSION:
        newer = data[4] > VERSION
        raise FormatError(f".ddcm format version {data[4]}; this diffkit reads version {VERSION}"
                          + (": decode it with a newer diffkit" if newer else ""))
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise FormatError("the file fails its CRC-32 checksum: it was truncated or damaged after it was written")
    _, _, model, grid, k, m, c, steps, seed, height, width, channels, tile = HEADER.unpack(data[:HEADER.size])
    try:
        settings = Settings(k=k, atoms=m, coef_bits=c, steps=steps, seed=seed)
    except ValueError as err:
        raise FormatError(f"the header declares impossible settings: {err}") from None
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE and channels in (1, 3) and 1 <= tile <= MAX_SIDE):
        raise FormatError(f"the header declares an impossible image: {height}x{width}, {channels} channels, tiles of "
                          f"{tile} (sides 1..{MAX_SIDE}, 1 or 3 channels)")
    rows, cols = -(-height // tile), -(-width // tile)
    n_bits = _payload_bits(settings, rows * cols)
    payload = data[HEADER.size:-4]
    if len(payload) != -(-n_bits // 8):
        raise FormatError(f"the payload holds {len(payload)} bytes where the header implies {-(-n_bits // 8)} "
                          f"({rows * cols} tiles x {settings.bits_per_tile()} bits)")
    widths = np.array(_fields(settings))
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))[:n_bits].reshape(-1, int(widths.sum())).astype(np.int64)
    values, start = [], 0
    for w in widths:
        values.append(bits[:, start:start + w] @ (1 << np.arange(w - 1, -1, -1, dtype=np.int64)))
        start += w
    table = torch.from_numpy(np.stack(values, 1).reshape(rows * cols, steps - 1, len(widths)))
    return Stream(settings, height, width, channels, tile, model, grid, table[..., :m], table[..., m:])
