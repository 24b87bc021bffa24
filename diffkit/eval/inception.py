"""FID (Heusel et al. 2017) with the Inception-v3 of the reference TensorFlow FID code, as ported by
torch-fidelity (Obukhov et al. 2020; its resize and layers match the TF graph), loaded from a local file:
nothing here ever downloads. Install with `pip install 'diffkit[fid]'`.

The weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`: fetch it once, on a machine with
network access, from `torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3`, and pass its path. The
Fréchet distance of the features is diffkit.eval.metrics.frechet_distance.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch
from torch import Tensor

from diffkit.eval.metrics import frechet_distance

FEATURES = ("64", "192", "768", "2048")  # torch-fidelity's Inception layers; FID uses the 2048-D pool features


@functools.lru_cache(maxsize=1)
def _extractor(weights: str, feature: str):
    try:  # torch-fidelity unpickles the file in full; accept it only if it holds plain tensors
        torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(f"{weights} is not a plain PyTorch state dict of Inception weights: {err}") from err
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
        raise ImportError("FID needs torch-fidelity, and a torchvision built for this torch: "
                          f"pip install 'diffkit[fid]' ({type(err).__name__}: {err})") from err
    return FeatureExtractorInceptionV3("inception-v3-compat", [feature], feature_extractor_weights_path=weights)


def _uint8_rgb(x: Tensor) -> Tensor:
    """Images in [-1, 1] to the uint8 RGB a PNG of them would hold; grey images are repeated over RGB."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"Inception features need images (N, 1 or 3, H, W), got {tuple(x.shape)}")
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1)


@torch.no_grad()
def inception_features(x: Tensor, *, inception_weights: str | Path, feature: str = "2048", batch_size: int = 50,
                       device: str | torch.device = "cpu") -> Tensor:
    """(N, F) float64 Inception-v3 features of images (N, C, H, W) in [-1, 1], resized to 299 as TF-FID does."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    path = Path(inception_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found; FID never downloads them. Fetch the file "
                                "once from torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3.")
    x = _uint8_rgb(x)
    net = _extractor(str(path.resolve()), feature).to(device)
    return torch.cat([net(x[i:i + batch_size].to(device))[0].double().cpu() for i in range(0, len(x), batch_size)])


def fid(images_a: Tensor, images_b: Tensor, *, inception_weights: str | Path, feature: str = "2048",
        batch_size: int = 50, device: str | torch.device = "cpu") -> float:
    """Fréchet Inception distance between two image sets (N, C, H, W) in [-1, 1] (C = 1 or 3, any size).

    Published FIDs use feature "2048" and 50,000 samples; the estimate is biased upward at smaller N.
    """
    options = dict(inception_weights=inception_weights, feature=feature, batch_size=batch_size, device=device)
    return frechet_distance(inception_features(images_a, **options), inception_features(images_b, **options))
