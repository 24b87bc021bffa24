import pytest
import torch

from diffkit import paths
from diffkit.objectives import Denoising
from diffkit.precond import Precond

from conftest import OracleNet

CASES = [
    (paths.VPLinear(), "eps", "uniform", paths.Uniform()),
    (paths.VPCosine(), "v", "min_snr", paths.Uniform()),
    (paths.RectifiedFlow(), "velocity", "uniform", paths.LogitNormal()),  # flow matching
    (paths.EDM(), "edm", "edm", paths.LogNormal()),
    (paths.VE(), "score", "uniform", paths.Uniform()),
    (paths.Shifted(paths.RectifiedFlow(), 2.0), "x0", "min_snr", paths.Uniform()),
]


def loss(objective, model, x0, seed=0):
    return objective(model, x0, generator=torch.Generator().manual_seed(seed)).mean().item()


@pytest.mark.parametrize("path,kind,weighting,density", CASES, ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_exact_denoiser_beats_every_perturbation(ring_gmm, path, kind, weighting, density):
    # The posterior mean minimises E |D - x0|^2 at every sigma, so with the same draws any change costs.
    x0 = ring_gmm.sample(20_000, torch.Generator().manual_seed(1))
    objective = Denoising(path, density=density, weighting=weighting)
    exact = loss(objective, Precond(OracleNet(ring_gmm, path, kind), path, kind), x0)
    wrong_cov = ring_gmm.__class__(ring_gmm.means, ring_gmm.covs * 1.5)
    perturbed = [
        Precond(OracleNet(ring_gmm, path, kind, shift=0.05), path, kind),
        Precond(OracleNet(wrong_cov, path, kind), path, kind),
        Precond(OracleNet(lambda x, s: ring_gmm(x, s * 1.1), path, kind), path, kind),
    ]
    for model in perturbed:
        assert loss(objective, model, x0) > exact


def test_flow_matching_loss_is_velocity_mse(ring_gmm):
    # RectifiedFlow + velocity + uniform: |v_hat - (eps - x0)|^2 with x_t = (1 - t) x0 + t eps.
    rf = paths.RectifiedFlow()

    class Zero(torch.nn.Module):
        def forward(self, x, c_noise, cond):
            return torch.zeros_like(x)

    x0 = ring_gmm.sample(8, torch.Generator().manual_seed(0))
    got = Denoising(rf)(Precond(Zero(), rf, "velocity"), x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    paths.Uniform().sample(rf, 8, g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    torch.testing.assert_close(got, ((eps - x0) ** 2).mean(1))


def test_label_dropout_replaces_conditions():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, c_noise, cond):
            seen.append(cond.clone())
            return torch.zeros_like(x)

    edm = paths.EDM()
    objective = Denoising(edm, label_dropout=0.3, null=10)
    objective(Precond(Spy(), edm, "edm"), torch.zeros(4000, 2), torch.full((4000,), 3), generator=torch.Generator().manual_seed(0))
    dropped = (seen[0] == 10).float().mean().item()
    assert set(seen[0].tolist()) == {3, 10} and abs(dropped - 0.3) < 0.03


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        Denoising(paths.EDM(), weighting="snr")
    with pytest.raises(ValueError, match="needs a `null`"):
        Denoising(paths.EDM(), label_dropout=0.1)
