import itertools
import math

import pytest
import torch

from diffkit import paths
from diffkit.nets.mlp import MLP
from diffkit.nets.unet import UNet
from diffkit.precond import PREDICTIONS, Precond, convert, from_x0_eps, to_x0_eps

from conftest import OracleNet


def batch(path, n=16, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = path.t_min + (path.t_max - path.t_min) * (0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64))
    x_t = path.alpha(t)[:, None] * x0 + path.beta(t)[:, None] * eps
    return x0, eps, t, x_t


@pytest.mark.parametrize("src,dst", list(itertools.permutations(PREDICTIONS, 2)))
def test_every_pair_round_trips(path, src, dst):
    x0, eps, t, x_t = batch(path)
    pred = from_x0_eps(x0, eps, src, t, path)
    back = convert(convert(pred, src, dst, x_t, t, path), dst, src, x_t, t, path)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_recovers_x0_and_eps(path, kind):
    x0, eps, t, x_t = batch(path)
    r0, reps = to_x0_eps(from_x0_eps(x0, eps, kind, t, path), kind, x_t, t, path)
    torch.testing.assert_close(r0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reps, eps, rtol=1e-9, atol=1e-9)


def test_textbook_targets():
    rf, vp = paths.RectifiedFlow(), paths.VPCosine()
    x0, eps, t, _ = batch(rf)
    torch.testing.assert_close(from_x0_eps(x0, eps, "velocity", t, rf), eps - x0)  # flow matching
    x0, eps, t, _ = batch(vp)
    a, b = vp.alpha(t)[:, None], vp.beta(t)[:, None]
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", t, vp), a * eps - b * x0)  # Salimans & Ho
    torch.testing.assert_close(from_x0_eps(x0, eps, "score", t, vp), -eps / b)


def test_edm_scalings_match_paper():
    # EDM Table 1 at sigma = 1, sigma_data = 0.5: c_skip = 0.2, c_out = c_in * 0.5, c_in = 1/sqrt(1.25), c_noise = 0.
    pre = Precond(torch.nn.Identity(), paths.EDM(), "edm", sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = pre.scalings(torch.tensor([1.0, 80.0], dtype=torch.float64))
    torch.testing.assert_close(c_skip, torch.tensor([0.2, 0.25 / (6400 + 0.25)], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.5 / math.sqrt(1.25), 40 / math.sqrt(6400.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(6400.25)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([0.0, math.log(80) / 4], dtype=torch.float64))


def test_vp_eps_scalings_match_edm_vp_precond():
    # EDM Table 1, VP column: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1).
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = Precond(torch.nn.Identity(), paths.VPLinear(), "eps").scalings(sigma)
    torch.testing.assert_close(c_skip, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 1))


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_precond_of_exact_prediction_is_exact_denoiser(path, kind, ring_gmm):
    g = torch.Generator().manual_seed(1)
    sigma = path.sigma(path.t_min + (path.t_max - path.t_min) * (0.05 + 0.9 * torch.rand(32, generator=g, dtype=torch.float64)))
    x = ring_gmm.sample(32, g) + sigma[:, None] * torch.randn(32, 2, generator=g, dtype=torch.float64)
    d = Precond(OracleNet(ring_gmm, path, kind), path, kind)(x, sigma)
    torch.testing.assert_close(d, ring_gmm(x, sigma), rtol=1e-7, atol=1e-7)


def test_precond_edm_trains_on_the_documented_target(ring_gmm):
    # With F = (x0 - c_skip x) / c_out (EDM Eq. 8's effective target), D recovers x0 exactly.
    sigma = torch.tensor([0.05, 0.7, 20.0], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64) * 3
    x0 = ring_gmm(x, sigma)
    c_skip, c_out, c_in, c_noise = Precond(torch.nn.Identity(), paths.EDM(), "edm").scalings(sigma)
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]

    class Fixed(torch.nn.Module):
        def forward(self, x_in, noise, cond):
            torch.testing.assert_close(x_in, c_in[:, None] * x)  # the net sees c_in x and c_noise
            torch.testing.assert_close(noise, c_noise)
            return target

    torch.testing.assert_close(Precond(Fixed(), paths.EDM(), "edm")(x, sigma), x0)


def test_unknown_prediction_is_an_error():
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        Precond(torch.nn.Identity(), paths.EDM(), "noise")
    with pytest.raises(ValueError, match="expected one of"):
        convert(torch.zeros(1, 1), "eps", "sample", torch.zeros(1, 1), torch.ones(1), paths.EDM())


@pytest.mark.parametrize("kind", [*PREDICTIONS, "edm"])
@pytest.mark.parametrize("path", [paths.VPLinear(), paths.EDM(), paths.Shifted(paths.RectifiedFlow(), 3.0)],
                         ids=["vp_linear", "edm", "shifted_rf"])
def test_a_denoiser_call_is_one_graph_that_reads_nothing_back(path, kind, host_reads):
    """D(x, sigma) for any path and prediction compiles without a graph break and reads no value back to the host,
    so a compiled sampler step is one CUDA graph (train.fast.FastDenoiser) with no sync inside."""
    torch._dynamo.reset()
    model = Precond(MLP(2, width=16, depth=1), path, kind).eval()
    x, sigma = torch.randn(3, 2), torch.tensor([0.05, 1.0, 20.0])
    with torch.no_grad():
        with host_reads() as reads:
            eager = model(x, sigma)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, sigma)
    assert reads.calls == []
    torch.testing.assert_close(compiled, eager)


CONDITIONAL_NETS = {
    "mlp": (lambda: MLP(2, width=16, depth=1, num_classes=3), (3, 2)),
    "unet": (lambda: UNet(1, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                          num_groups=4, head_channels=8, dropout=0.0, num_classes=3), (3, 1, 8, 8)),
}


@pytest.mark.parametrize("kind", ["eps", "edm"])
@pytest.mark.parametrize("net", list(CONDITIONAL_NETS))
def test_a_conditional_denoiser_call_is_one_graph_that_reads_nothing_back(net, kind, host_reads):
    """The same with class labels bound, one of them the "no label" index: the net checks the labels' shape
    only, since checking their values would read them back on every call (train.loop checks them once)."""
    torch._dynamo.reset()
    build, shape = CONDITIONAL_NETS[net]
    model = Precond(build(), paths.VPLinear(), kind).eval()
    labels = torch.tensor([0, 2, 3])

    def denoiser(x, sigma):
        return model(x, sigma, labels)

    x, sigma = torch.randn(shape), torch.tensor([0.05, 1.0, 20.0])
    with torch.no_grad():
        with host_reads() as reads:
            eager = denoiser(x, sigma)
        assert reads.calls == []
        compiled = torch.compile(denoiser, fullgraph=True, backend="eager")(x, sigma)
    torch.testing.assert_close(compiled, eager)
