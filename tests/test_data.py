import pytest
import torch
from PIL import Image

from diffkit import data


def test_checkerboard_lives_on_the_dark_squares():
    x = data.toy("checkerboard", 20_000, torch.Generator().manual_seed(0))
    assert x.abs().max() <= 4
    cell = torch.floor((x + 4) / 2)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount((cell[:, 0] * 4 + cell[:, 1]).long(), minlength=16)
    assert (counts > 0).sum() == 8 and counts.max() / counts[counts > 0].min() < 1.2  # 8 squares, evenly


@pytest.mark.parametrize("name", data.TOYS)
def test_toys_are_seeded_and_bounded(name):
    a = data.toy(name, 500, torch.Generator().manual_seed(1))
    b = data.toy(name, 500, torch.Generator().manual_seed(1))
    assert a.shape == (500, 2) and torch.equal(a, b) and a.abs().max() < 6 and a.std() > 0.5


def test_digits_split():
    xtr, ytr = data.digits("train")
    xte, yte = data.digits("test")
    assert xtr.shape[1:] == (1, 8, 8) and len(xtr) + len(xte) == 1797
    assert xtr.min() == -1 and xtr.max() == 1
    assert abs(len(xte) / 1797 - 0.2) < 0.01 and set(yte.tolist()) == set(range(10))
    flat_tr, flat_te = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    assert torch.cdist(flat_te[:50], flat_tr).min() >= 0  # split is well defined
    torch.testing.assert_close(data.digits("test")[0], xte)  # deterministic


def test_image_folder(tmp_path):
    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 20), colour).save(tmp_path / cls / "a.png")
        Image.new("L", (16, 30), 128).save(tmp_path / cls / "b.jpg")
    x, y = data.image_folder(tmp_path, 8)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(x[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    grey, _ = data.image_folder(tmp_path, 8, channels=1)
    assert grey.shape == (4, 1, 8, 8)


def test_image_folder_splits_are_disjoint_stable_and_cover_the_folder(tmp_path):
    for i in range(60):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i:02d}.png")
    train, _ = data.image_folder(tmp_path, 8, split="train")
    test, _ = data.image_folder(tmp_path, 8, split="test")
    every, _ = data.image_folder(tmp_path, 8)
    assert len(train) + len(test) == len(every) == 60 and 2 <= len(test) <= 15
    values = lambda x: {round(v, 4) for v in x[:, 0, 0, 0].tolist()}  # noqa: E731 (each image one grey level)
    assert values(train).isdisjoint(values(test))
    (tmp_path / "late.png").write_bytes((tmp_path / "00.png").read_bytes())  # a new file moves no old one
    assert values(data.image_folder(tmp_path, 8, split="test")[0]) >= values(test)


def test_image_folder_errors_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="no images"):
        data.image_folder(_empty(tmp_path), 8)
    with pytest.raises(FileNotFoundError):
        data.image_folder(tmp_path / "missing", 8)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_unknown_toy():
    with pytest.raises(ValueError, match="unknown toy dataset 'circle'"):
        data.toy("circle", 10)


def test_hf_dataset_converts_images_and_labels(monkeypatch):
    # A stand-in for the `datasets` package (no network here): the loader's own conversion is what is tested.
    import sys
    import types

    class Fake:
        column_names = ["img", "label"]

        def __getitem__(self, key):
            return [Image.new("RGB", (12, 10), (0, 255, 0))] * 3 if key == "img" else [4, 1, 4]

    fake = types.SimpleNamespace(load_dataset=lambda name, split: Fake())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    x, y = data.hf_dataset("someone/flowers", 8, image_key="img")
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [4, 1, 4]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="no column 'image'"):
        data.hf_dataset("someone/flowers", 8)


def test_hf_dataset_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'diffkit\[hf\]'"):
        data.hf_dataset("x", 8)


def test_photos_split_by_photo_and_cut_deterministically(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the photos must load with no network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert not set(data.PHOTOS["train"]) & set(data.PHOTOS["test"])
    train, test = data.photos("train"), data.photos("test")
    # Every patch is a crop of its own split's photos, at the stride, row-major from the top-left corner.
    first = data.photo(data.PHOTOS["train"][0])
    assert torch.equal(train[0], first[:, :32, :32]) and torch.equal(train[1], first[:, :32, 32:64])
    cols = first.shape[2] // 32
    assert torch.equal(train[cols], first[:, 32:64, :32])  # the second row of patches
    counts = [(data.photo(n).shape[1] // 32) * (data.photo(n).shape[2] // 32) for n in data.PHOTOS["test"]]
    assert len(test) == sum(counts) and train.shape[1:] == (3, 32, 32)
    assert train.min() >= -1 and train.max() <= 1 and torch.equal(data.photos("train"), train)
    # No held-out patch appears among the training patches (the split is by photo).
    flat_train = train.flatten(1)
    assert torch.cdist(test[::50].flatten(1), flat_train).min() > 0.5
    overlap = data.photos("test", size=16, stride=8)
    assert len(overlap) == sum((data.photo(n).shape[1] - 8) // 8 * ((data.photo(n).shape[2] - 8) // 8)
                               for n in data.PHOTOS["test"])
    grey = data.photos("test", channels=1)
    torch.testing.assert_close(grey[0, 0], 0.299 * test[0, 0] + 0.587 * test[0, 1] + 0.114 * test[0, 2])


def test_photos_bad_input():
    with pytest.raises(ValueError, match="split must be"):
        data.photos("validation")
    with pytest.raises(ValueError, match="unknown photo"):
        data.photo("lena")
    with pytest.raises(ValueError, match="channels"):
        data.photos(channels=4)
