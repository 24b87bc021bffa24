"""The spectral condition's numerical check (libraries-and-data.md): under train.parametrization=spectral the
ratios ||W0||, ||dW_Adam||, ||dW_Muon|| to sqrt(n_out/n_in) stay constant from width 64 to 1024, for square
and rectangular weights; under the standard parametrization the Adam update's ratio grows with width."""
import math

import pytest
import torch
from torch import nn

from diffkit.train import optim, spectral

WIDTHS = (64, 256, 1024)
SHAPES = {"square": lambda w: (w, w), "wide-out": lambda w: (4 * w, w), "narrow-out": lambda w: (w // 4, w)}


def _ratios(shape, kind: str, parametrization: str) -> tuple[float, float]:
    """(||W0||_2, ||dW||_2 after one step) over sqrt(n_out/n_in), for one Linear layer with a rank-1 gradient
    (a gradient of a batch of one is rank 1: u v^T)."""
    n_out, n_in = shape
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=False)
    if parametrization == "spectral":
        spectral.init_(layer, g)
    w0 = layer.weight.detach().clone()
    (opt,) = [o for o in optim.build(layer, kind, lr=1e-3, muon_lr=1e-2, parametrization=parametrization,
                                    spectral_base=256) if o.param_groups[0]["params"]]
    u, v = torch.randn(n_out, generator=g), torch.randn(n_in, generator=g)
    (u @ layer.weight @ v).backward()
    opt.step()
    scale = math.sqrt(n_out / n_in)
    norm = lambda m: torch.linalg.matrix_norm(m, ord=2).item()  # noqa: E731
    return norm(w0) / scale, norm(layer.weight.detach() - w0) / scale


@pytest.mark.parametrize("name", list(SHAPES))
def test_spectral_norms_scale_like_sqrt_fan_out_over_fan_in(name):
    for kind in ("adamw", "muon"):
        init, step = zip(*(_ratios(SHAPES[name](w), kind, "spectral") for w in WIDTHS))
        assert max(init) / min(init) < 1.15, (kind, init)  # Gaussian: 1 + sqrt(min/max aspect), any width
        assert max(step) / min(step) < 1.15, (kind, step)
    adam_step = [_ratios((w, w), "adamw", "spectral")[1] for w in WIDTHS]
    assert adam_step == pytest.approx([1e-3 * 256] * 3, rel=1e-3)  # lr*base/n_in * sqrt(n_in*n_out) / 1


def test_standard_adam_updates_grow_with_width():
    step = [_ratios((w, w), "adamw", "standard")[1] for w in WIDTHS]
    assert step == pytest.approx([1e-3 * w for w in WIDTHS], rel=1e-3)  # lr * sqrt(n_in * n_out): 16x over 16x width


def test_zero_initialised_weights_stay_zero():
    layer = nn.Linear(8, 8)
    nn.init.zeros_(layer.weight)
    spectral.init_(layer)
    assert not layer.weight.any()
