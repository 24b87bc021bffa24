"""Datasets as in-memory tensors: built-in 2-D toys, sklearn's digits, natural-photo patches, image folders,
Hugging Face datasets.

Images come back as (N, C, H, W) float32 in [-1, 1]; labels as (N,) int64 or None. This module imports no
model code.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TOYS = ("checkerboard", "moons", "8gaussians", "spirals", "swissroll")
HELD_OUT_EVERY = 10  # an image folder holds out about 1 in 10 files (data.held_out)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def dequantize(x: Tensor, *, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of integer data as this module scales it, x_k = delta k - 1 with delta = 2 / (L - 1)
    (L = `levels`: the digits' 17, 8-bit images' 256): x_k + delta w, w ~ U[-1/2, 1/2)^D drawn from `generator`.

    Integer vector k owns the cell x_k + delta [-1/2, 1/2)^D, so a density fitted to dequantized data bounds the
    probability of k from below (Theis et al. 2016, "A note on the evaluation of generative models");
    `dequantized_bits` turns its log-density into bits per dimension of the integers. x off the grid is an error.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (17 for the digits, 256 for 8-bit images), got {levels!r}")
    delta = 2 / (levels - 1)
    k = (x.detach() + 1) / delta
    if ((k - k.round()).abs() > 1e-3).any() or (k.round() < 0).any() or (k.round() > levels - 1).any():
        raise ValueError(f"x is not on the grid of {levels} levels x = 2 k / {levels - 1} - 1, k = 0..{levels - 1}: "
                         "pass the data as diffkit.data scales it, with its number of levels")
    device = x.device if generator is None else generator.device
    w = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device) - 0.5
    return k.round() * delta - 1 + delta * w


def dequantized_bits(log_p: Tensor, *, dims: int, levels: int) -> Tensor:
    """Bits per dimension of integer data from the log-density log_p (nats, (B,)) of its dequantized version.

    With y = (x + 1) / delta the data in units of the integer grid, log q(y) = log p(x) + D log delta, so
    bits/dim = -(log p + D log delta) / (D ln 2) = -log p / (D ln 2) + log2((L - 1) / 2). (Papers that scale by
    2 / L instead add log2(L / 2): 7 for 8-bit data where this adds 6.994.)
    """
    return -log_p / (dims * math.log(2)) + math.log2((levels - 1) / 2)


def toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, 2) float32 from a built-in 2-D distribution, roughly within [-4, 4]^2."""
    g = generator
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    z = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if name == "checkerboard":  # uniform on the 8 dark squares of a 4 x 4 board of side 2
        x = 8 * u(n) - 4
        row = torch.randint(0, 2, (n,), generator=g) * 4
        y = row + 2 * u(n) - 4 + 2 * (torch.floor((x + 4) / 2) % 2)
        return torch.stack([x, y], 1)
    if name == "moons":
        t = math.pi * u(n)
        upper = torch.rand(n, generator=g) < 0.5
        pts = torch.where(upper[:, None], torch.stack([t.cos(), t.sin()], 1), torch.stack([1 - t.cos(), 0.5 - t.sin()], 1))
        return 2 * (pts - torch.tensor([0.5, 0.25])) + 0.1 * z(n, 2)
    if name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
        return 3 * torch.stack([k.cos(), k.sin()], 1) + 0.3 * z(n, 2)
    if name == "spirals":
        t = 3 * math.pi * u(n).sqrt()
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return sign[:, None] * 0.35 * t[:, None] * torch.stack([t.cos(), t.sin()], 1) + 0.1 * z(n, 2)
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * u(n))
        return 0.3 * t[:, None] * torch.stack([t.cos(), t.sin()], 1) + 0.1 * z(n, 2)
    raise ValueError(f"unknown toy dataset {name!r}; choose one of {TOYS}")


def digits(split: str = "train", *, holdout: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """sklearn's 8x8 digits as (N, 1, 8, 8) in [-1, 1] with labels; a fixed stratified train / test split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1  # pixel values are 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    if split == "all":
        return x, y
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(data.target == c)
        test[rng.choice(idx, int(round(holdout * len(idx))), replace=False)] = True
    keep = torch.from_numpy(test if split == "test" else ~test)
    return x[keep], y[keep]


# The everyday photographs inside the scikit-image and scikit-learn wheels (no download), split by photo, never
# by patch: patches of one photo are correlated, so a held-out patch of a training photo measures memory, not
# generalisation. Left out: skimage's retina, hubble_deep_field and immunohistochemistry (microscope and telescope
# images, and half of all the pixels), the grey ones, and the right view of stereo_motorcycle (a near copy).
PHOTOS = {"train": ("astronaut", "rocket", "stereo_motorcycle", "china"), "test": ("chelsea", "coffee", "flower")}


def photo(name: str) -> Tensor:
    """One bundled photograph as (3, H, W) float32 in [-1, 1] (PHOTOS names them)."""
    if name not in {n for names in PHOTOS.values() for n in names}:
        raise ValueError(f"unknown photo {name!r}; the bundled photos are {PHOTOS}")
    return torch.from_numpy(_photo_pixels(name)).permute(2, 0, 1) / 127.5 - 1


@functools.lru_cache(maxsize=None)
def _photo_pixels(name: str) -> np.ndarray:
    """The photo's (H, W, 3) pixel values, decoded once per process (private: photo() returns a new tensor)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    else:
        try:
            import skimage.data
        except ImportError as err:
            raise ImportError("the photos data needs scikit-image (its wheel carries the photographs): "
                              "pip install 'diffkit[photos]'") from err
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    return np.array(arr, dtype=np.float32)


def photos(split: str = "train", *, size: int = 32, stride: int | None = None, channels: int = 3) -> Tensor:
    """Patches (N, channels, size, size) in [-1, 1] of the photos of one split (PHOTOS), photo by photo, each
    cut row-major at `stride` (default `size`: no overlap) from its top-left corner; a border narrower than a
    patch is dropped. channels=1 gives the luminance (ITU-R BT.601 weights)."""
    if split not in PHOTOS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stride = stride or size
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be positive, got size={size}, stride={stride}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (luminance) or 3 (RGB), got {channels}")
    out = []
    for name in PHOTOS[split]:
        image = photo(name)
        if channels == 1:
            image = (torch.tensor([0.299, 0.587, 0.114]) @ image.flatten(1)).reshape(1, *image.shape[1:])
        cut = image.unfold(1, size, stride).unfold(2, size, stride)  # (C, rows, cols, size, size)
        out.append(cut.permute(1, 2, 0, 3, 4).reshape(-1, channels, size, size))
    return torch.cat(out)


def _to_tensor(image, size: int, channels: int) -> Tensor:
    """Resize the short side to `size`, centre-crop to size x size, and scale to [-1, 1]."""
    from PIL import Image

    image = image.convert("RGB" if channels == 3 else "L")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def held_out(relative: str) -> bool:
    """Whether the image at `relative` (its path under the folder's root, with /) is in an image folder's held-out
    split: about 1 in HELD_OUT_EVERY files, chosen by a hash of the path, so a file keeps its split when others
    are added or removed."""
    return hashlib.sha1(relative.encode()).digest()[0] % HELD_OUT_EVERY == 0


def image_folder(root: str | Path, size: int, *, channels: int = 3,
                 split: str | None = None) -> tuple[Tensor, Tensor | None]:
    """The images under `root`; sub-folders of root are classes (labels in sorted order), else labels are None.

    split: "train" or "test" keeps that side of the held-out rule (`held_out`); None keeps every image."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        files = [p for p in files if held_out(p.relative_to(root).as_posix()) == (split == "test")]
        if not files:
            raise ValueError(f"{root} has no images in its {split} split (about 1 in {HELD_OUT_EVERY} images is held "
                             f"out, by a hash of its path): add images")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(_to_tensor(im, size, channels))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {p}: {err}. Remove or fix the file.") from err
    labels = torch.tensor([classes.index(p.relative_to(root).parts[0]) for p in files]) if classes and \
        all(len(p.relative_to(root).parts) > 1 for p in files) else None
    return torch.stack(images), labels


def hf_dataset(name: str, size: int, *, split: str = "train", image_key: str = "image", label_key: str | None = "label",
               channels: int = 3) -> tuple[Tensor, Tensor | None]:
    """A Hugging Face `datasets` image dataset (pip install 'diffkit[hf]'), loaded from the local cache or the hub."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("hf_dataset needs the `datasets` package: pip install 'diffkit[hf]'") from err
    ds = datasets.load_dataset(name, split=split)
    if image_key not in ds.column_names:
        raise ValueError(f"dataset {name} has no column {image_key!r}; columns: {ds.column_names}")
    x = torch.stack([_to_tensor(im, size, channels) for im in ds[image_key]])
    y = torch.tensor(ds[label_key]) if label_key and label_key in ds.column_names else None
    return x, y


def keep_classes(x: Tensor, y: Tensor | None, classes: list[int], what: str) -> tuple[Tensor, Tensor]:
    """The samples of x (and their labels y) whose label is in `classes` (data.classes); every class must have
    some. `what` names the data in errors."""
    if y is None:
        raise ValueError(f"data.classes keeps the samples of some labels; {what} has no labels (a folder needs one "
                         "sub-folder per class)")
    present = y.unique().tolist()
    missing = sorted(set(classes) - set(present))
    if missing:
        raise ValueError(f"data.classes: {what} has no sample of class {', '.join(map(str, missing))} (its labels "
                         f"are {', '.join(map(str, present))})")
    keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
    return x[keep], y[keep]


def check_classes(classes) -> None:
    """data.classes: null, or a non-empty list of distinct class indices >= 0."""
    ok = isinstance(classes, list) and classes and len(set(classes)) == len(classes) and \
        all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in classes)
    if classes is not None and not ok:
        raise ValueError("data.classes must be null or a non-empty list of distinct class indices >= 0, e.g. "
                         f"[5, 6, 7, 8, 9]; got {classes!r}")
