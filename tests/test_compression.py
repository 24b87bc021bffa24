"""`diffkit compress` / `diffkit decompress` end to end on a tiny digits model: tiles, the file, bit-exact decoding
and the errors a user meets."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffkit import cli, compression
from diffkit import config as configs
from diffkit import run


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddcm")
    cfg = configs.load(None, ["train.steps=10", "train.batch=32", "model.args={width: 32, depth: 1}"])
    run.train_run(cfg, root / "run", progress=False)
    run.train_run(configs.derive(cfg, ["sample.rho=3"]), root / "rho3", progress=False)  # same weights, other grid
    image = (np.arange(20 * 13).reshape(20, 13) * 7 % 256).astype(np.uint8)
    Image.fromarray(image).save(root / "img.png")
    return root


def test_tiles_round_trip():
    image = torch.rand(3, 20, 13)
    parts = compression.tiles(image, 8)
    assert parts.shape == (3 * 2, 3, 8, 8)  # rows 3, cols 2, row-major
    assert torch.equal(parts[1], torch.nn.functional.pad(image[None, :, :8, 8:], (0, 3, 0, 0), mode="replicate")[0])
    assert torch.equal(compression.untile(parts, 20, 13), image)


def test_compress_then_decompress_gives_the_encoders_reconstruction(model_run, tmp_path, capsys):
    out = tmp_path / "img.ddcm"
    assert cli.main(["compress", str(model_run / "run"), str(model_run / "img.png"), "-o", str(out), "--k", "64",
                     "--steps", "6", "--atoms", "2", "--coef-bits", "2"]) == 0
    line = capsys.readouterr().out
    assert "bits per pixel" in line and "PSNR" in line and "6 tiles" in line
    size = out.stat().st_size
    assert size == 36 + -(-6 * 5 * (2 * 6 + 2) // 8) + 4  # header, 6 tiles x 5 coded steps x (2 log2 K + C) bits, CRC
    result, recon = compression.compress(model_run / "run", model_run / "img.png", tmp_path / "again.ddcm", k=64,
                                         steps=6, atoms=2, coef_bits=2, progress=False)
    assert (tmp_path / "again.ddcm").read_bytes() == out.read_bytes()
    assert result["bpp"] == pytest.approx(8 * size / (20 * 13))
    assert cli.main(["decompress", str(model_run / "run"), str(out), "-o", str(tmp_path / "out.png")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    assert decoded.shape == (20, 13)
    assert np.array_equal(decoded, ((recon[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    by_rate, _ = compression.compress(model_run / "run", model_run / "img.png", tmp_path / "r.ddcm", k=64, bpp=1.0,
                                      progress=False)
    assert by_rate["payload_bpp"] <= 1.0 and by_rate["steps"] == 1.0 * 20 * 13 // (6 * 6) + 1


def test_decoding_errors_name_the_problem(model_run, tmp_path):
    out = tmp_path / "img.ddcm"
    compression.compress(model_run / "run", model_run / "img.png", out, k=16, steps=4, progress=False)
    with pytest.raises(SystemExit, match="another sigma grid"):
        cli.main(["decompress", str(model_run / "rho3"), str(out)])
    other = tmp_path / "other"
    run.train_run(configs.load(None, ["train.steps=10", "train.batch=32", "model.args={width: 32, depth: 1}",
                                      "train.seed=1"]), other, progress=False)
    with pytest.raises(SystemExit, match="compressed with another model"):
        cli.main(["decompress", str(other), str(out)])
    broken = tmp_path / "broken.ddcm"
    broken.write_bytes(out.read_bytes()[:-7])
    with pytest.raises(SystemExit, match="checksum"):
        cli.main(["decompress", str(model_run / "run"), str(broken)])
    with pytest.raises(SystemExit, match="power of two"):
        cli.main(["compress", str(model_run / "run"), str(model_run / "img.png"), "--k", "100"])
    with pytest.raises(SystemExit, match="cannot read image"):
        cli.main(["compress", str(model_run / "run"), str(broken)])
    assert not (tmp_path / "out.png").exists()
