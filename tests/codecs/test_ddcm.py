"""DDCM: the paper's selection rules against brute force, bit-exact decoding, the rate, and the .ddcm format
under thousands of damaged and forged files."""
import math
import os
import random
import struct
import zlib

import pytest
import torch

from diffkit import grids, paths
from diffkit.analytic import GaussianMixture
from diffkit.codecs import bitstream, ddcm
from diffkit.nets.unet import UNet
from diffkit.precond import Precond

SIGMAS = grids.karras(8, 0.002, 80.0)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=8, channels=16, channel_mult=[1], num_res_blocks=1, attn_resolutions=[],
               num_groups=4)
    return Precond(net, paths.EDM(), "edm").eval()


def test_greedy_choice_is_the_code_best_aligned_with_the_residual():
    s = ddcm.Settings(k=32, steps=8, seed=5)
    target, x0_hat = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    source = ddcm.Encoder(target, s)
    z = source(2, x0_hat, x0_hat)
    codes = ddcm.codebook(s, 2, (3, 2, 2), "cpu")
    for b in range(4):
        scores = [float(codes[k] @ (target[b] - x0_hat[b]).flatten()) for k in range(32)]  # Sec. 4.1, by hand
        best = max(range(32), key=scores.__getitem__)
        assert source.indices[b, 2, 0] == best and torch.equal(z[b].flatten(), codes[best])


def test_matching_pursuit_picks_the_best_mixture_or_keeps_z():
    s = ddcm.Settings(k=16, atoms=2, coef_bits=2, steps=8, seed=1)
    target, x0_hat = torch.randn(6, 12).double(), torch.randn(6, 12).double()
    source = ddcm.Encoder(target, s)
    z = source(0, x0_hat, x0_hat)
    codes = ddcm.codebook(s, 0, (12,), "cpu", torch.float64)
    r = target - x0_hat
    for b in range(6):
        first = codes[source.indices[b, 0, 0]]
        # Every (level, code): <mix(z, z^k, c), r> computed by mixing explicitly.
        options = {(j, k): float(ddcm.mix(first[None], codes[k][None], torch.tensor([ddcm.coefficient(j, 2)],
                                                                                   dtype=torch.float64))[0] @ r[b])
                   for j in range(4) for k in range(16)}
        j, k = int(source.levels[b, 0, 0]), int(source.indices[b, 0, 1])
        assert options[(j, k)] == pytest.approx(max(options.values()), rel=1e-12)
        assert options[(j, k)] >= options[(3, 0)] - 1e-12  # never worse than keeping z (c = 1)
        torch.testing.assert_close(z[b], ddcm.mix(first[None], codes[k][None],
                                                  torch.tensor([ddcm.coefficient(j, 2)], dtype=torch.float64))[0])
    assert ddcm.coefficient(3, 2) == 1.0


@pytest.mark.parametrize("atoms, bits", [(1, 0), (3, 2)])
def test_decoding_is_bit_exact_whatever_the_batch(unet, atoms, bits):
    s = ddcm.Settings(k=64, atoms=atoms, coef_bits=bits, steps=8, seed=3)
    x = torch.rand(20, 3, 8, 8) * 2 - 1  # two chunks, the second padded
    indices, levels, recon = ddcm.encode(unet, x, SIGMAS, s)
    assert indices.shape == (20, 7, atoms) and levels.shape == (20, 7, atoms - 1)
    assert torch.equal(ddcm.decode(unet, indices, levels, SIGMAS, s, (3, 8, 8), device="cpu"), recon)
    for part in (slice(3, 6), slice(17, 20), slice(0, 1)):  # other batches: the same tiles, bit for bit
        assert torch.equal(ddcm.decode(unet, indices[part], levels[part], SIGMAS, s, (3, 8, 8), device="cpu"),
                           recon[part])
    again = ddcm.encode(unet, x[5:9], SIGMAS, s)
    assert torch.equal(again[0], indices[5:9]) and torch.equal(again[2], recon[5:9])


def test_more_codes_and_steps_code_closer():
    """With the exact denoiser of a Gaussian prior, images drawn from it are coded closer as K and T grow (and the
    rate with them): Sec. 4's rate-distortion trade-off."""
    exact = GaussianMixture(torch.zeros(1, 12), 0.25 * torch.eye(12)[None])
    targets = 0.5 * torch.randn(32, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(k, steps):
        s = ddcm.Settings(k=k, steps=steps, seed=0)
        recon = ddcm.encode(exact, targets, grids.karras(steps, 0.002, 80.0).double(), s)[2]
        return (recon - targets).pow(2).mean().item()
    assert error(4096, 8) < 0.8 * error(4, 8) and error(256, 16) < 0.8 * error(256, 4)


def test_compressed_generation_is_decoding_random_indices(unet):
    s = ddcm.Settings(k=8, steps=8, seed=2)
    a = ddcm.generate(unet, 5, SIGMAS, s, (3, 8, 8), device="cpu", generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    indices, levels = torch.randint(8, (5, 7, 1), generator=g), torch.randint(1, (5, 7, 0), generator=g)
    assert torch.equal(a, ddcm.decode(unet, indices, levels, SIGMAS, s, (3, 8, 8), device="cpu"))


def test_rate():
    s = ddcm.Settings(k=256, atoms=3, coef_bits=2, steps=51)
    assert s.bits_per_step == 3 * 8 + 2 * 2 and s.bits_per_tile() == 50 * 28  # (T - 1)(M log2 K + (M - 1) C)
    for bad in ({"k": 100}, {"k": 1}, {"atoms": 2}, {"atoms": 0}, {"steps": 1}, {"seed": -1}, {"coef_bits": 9}):
        with pytest.raises(ValueError):
            ddcm.Settings(**bad)


# --- the file format ------------------------------------------------------------------------------------------

def _stream(atoms=2, bits=3, h=40, w=70):
    s = ddcm.Settings(k=256, atoms=atoms, coef_bits=bits if atoms > 1 else 0, steps=6, seed=9)
    n = -(-h // 32) * -(-w // 32)
    g = torch.Generator().manual_seed(0)
    return bitstream.Stream(s, h, w, 3, 32, b"12345678", b"abcd", torch.randint(256, (n, 5, atoms), generator=g),
                            torch.randint(2 ** s.coef_bits, (n, 5, atoms - 1), generator=g))


@pytest.mark.parametrize("atoms", [1, 2])
def test_pack_unpack_round_trip_and_size(atoms):
    stream = _stream(atoms)
    data = bitstream.pack(stream)
    assert len(data) == bitstream.HEADER.size + math.ceil(6 * stream.settings.bits_per_tile() / 8) + 4
    back = bitstream.unpack(data)
    assert torch.equal(back.indices, stream.indices) and torch.equal(back.levels, stream.levels)
    assert back.settings == stream.settings and (back.height, back.width, back.channels, back.tile) == (40, 70, 3, 32)
    assert (back.model, back.grid) == (b"12345678", b"abcd") and back.tiles == (2, 3)


def _forge(**fields):
    """A file with a valid CRC whose header says `fields` (the rest from _stream)."""
    s = _stream()
    values = dict(magic=b"DDCM", version=1, model=s.model, grid=s.grid, k=256, m=2, c=3, steps=6, seed=9, h=40, w=70,
                  ch=3, tile=32) | fields
    body = bitstream.HEADER.pack(*values.values()) + bitstream.pack(s)[bitstream.HEADER.size:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than"),
    (b"PK\x03\x04" + bytes(60), "not a .ddcm file"),
    (_forge(version=2), "version 2; this diffkit reads version 1: decode it with a newer diffkit"),
    (_forge(k=100), "impossible settings"),
    (_forge(h=60000, w=60000), "impossible image"),
    (_forge(h=16384, w=16384, tile=1), "the payload holds"),
    (_forge(ch=2), "impossible image"),
])
def test_bad_files_are_named(data, message):
    with pytest.raises(bitstream.FormatError, match=message):
        bitstream.unpack(data)


def test_fuzz_only_clear_errors():
    """Thousands of truncated, bit-flipped, spliced and random files: each is decoded exactly or refused with a
    FormatError; none raises anything else, and a damaged file is never decoded."""
    rng = random.Random(0)
    good = bitstream.pack(_stream())
    cases = []
    for _ in range(3000):
        kind = rng.randrange(4)
        if kind == 0:
            cases.append(good[:rng.randrange(len(good))])
        elif kind == 1:
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            cases.append(bytes(b))
        elif kind == 2:
            cases.append(os.urandom(rng.randrange(0, 200)))
        else:
            cases.append(_forge(h=rng.randrange(65536), w=rng.randrange(65536), tile=rng.randrange(65536),
                                steps=rng.randrange(65536), k=rng.choice([2 ** rng.randrange(32), rng.randrange(2 ** 32)]),
                                m=rng.randrange(256), c=rng.randrange(256)))
    for data in cases:
        try:
            stream = bitstream.unpack(data)
        except bitstream.FormatError:
            continue
        assert data == good or bitstream.pack(stream) == data  # only intact (or consistent forged) files decode


def test_rate_needed_to_reach_a_quality():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("codec", Path(__file__).resolve().parents[2] / "benchmarks" / "codec.py")
    codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codec)
    points = [{"bpp": 0.1, "ms_ssim": 0.5}, {"bpp": 0.2, "ms_ssim": 0.7}, {"bpp": 0.3, "ms_ssim": 0.6},
              {"bpp": 0.4, "ms_ssim": 0.9}]
    assert codec.bpp_to_reach(points, 0.6) == pytest.approx(0.15)  # between 0.1 and 0.2
    assert codec.bpp_to_reach(points, 0.8) == pytest.approx(0.3)  # 0.3's 0.6 is no better than 0.2's 0.7
    assert codec.bpp_to_reach(points, 0.4) == 0.1 and codec.bpp_to_reach(points, 0.95) is None
