import pytest
import torch

from diffkit import analytic, paths

ALL_PATHS = {
    "vp_linear": paths.VPLinear(),
    "vp_cosine": paths.VPCosine(),
    "ve": paths.VE(),
    "edm": paths.EDM(),
    "rectified_flow": paths.RectifiedFlow(),
    "shifted_vp": paths.Shifted(paths.VPCosine(), 2.0),
    "shifted_rf": paths.Shifted(paths.RectifiedFlow(), 3.0),
}


@pytest.fixture(params=list(ALL_PATHS), ids=list(ALL_PATHS))
def path(request):
    return ALL_PATHS[request.param]


@pytest.fixture(scope="session")
def ring_gmm():
    return analytic.ring()


@pytest.fixture(scope="session")
def gauss3():
    """A single anisotropic 3-D Gaussian (closed-form flow map)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return analytic.GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), (a @ a.T + 0.1 * torch.eye(3))[None])
