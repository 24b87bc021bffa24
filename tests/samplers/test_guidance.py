"""Guidance wrappers against closed-form guided denoisers."""
import pytest
import torch

from diffkit import analytic, paths
from diffkit.nets.mlp import MLP
from diffkit.precond import Precond
from diffkit.samplers.guidance import ClassifierFree, ClassifierGuided


def gaussian(mean, cov):
    return analytic.GaussianMixture(torch.tensor([mean], dtype=torch.float64), torch.tensor([cov], dtype=torch.float64))


COND = gaussian([1.0, -0.5], [[0.3, 0.1], [0.1, 0.2]])
UNCOND = gaussian([0.0, 0.5], [[1.0, -0.2], [-0.2, 0.8]])


def by_label(x, sigma, cond):
    """A conditional denoiser: label 1 -> COND, label 0 -> UNCOND (the 'null' label)."""
    return torch.where((cond == 1)[:, None], COND(x, sigma), UNCOND(x, sigma))


def guided_closed_form(x, sigma, w):
    # p_u^(1-w) p_c^w at noise level sigma is Gaussian with precision P = (1-w) P_u + w P_c (natural parameters).
    eye = torch.eye(2, dtype=torch.float64)
    p_c = torch.linalg.inv(COND.covs[0] + sigma**2 * eye)
    p_u = torch.linalg.inv(UNCOND.covs[0] + sigma**2 * eye)
    prec = (1 - w) * p_u + w * p_c
    mean = torch.linalg.solve(prec, (1 - w) * p_u @ UNCOND.means[0] + w * p_c @ COND.means[0])
    score = -(x - mean) @ prec.T
    return x + sigma**2 * score


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.5])
@pytest.mark.parametrize("sigma", [0.1, 1.0, 10.0])
def test_cfg_equals_closed_form_guided_denoiser(w, sigma):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (1 + sigma)
    cfg = ClassifierFree(by_label, cond=torch.ones(16, dtype=torch.long), null=torch.zeros(16, dtype=torch.long), w=w)
    torch.testing.assert_close(cfg(x, torch.full((16,), sigma, dtype=torch.float64)), guided_closed_form(x, sigma, w),
                               rtol=1e-10, atol=1e-10)


def test_cfg_w1_is_the_conditional_model():
    x, s = torch.randn(8, 2, dtype=torch.float64), torch.full((8,), 0.7, dtype=torch.float64)
    cfg = ClassifierFree(by_label, torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), w=1.0)
    torch.testing.assert_close(cfg(x, s), COND(x, s))


@pytest.mark.parametrize("sigma", [0.2, 2.0])
def test_classifier_guidance_with_exact_classifier_is_bayes(ring_gmm, sigma):
    # Classes = halves of the ring. grad log p(x) + grad log p(c | x) = grad log p(x | c), so scale 1 gives the
    # class-conditional mixture's exact denoiser, and scale 0 the unconditional one.
    cls = [0, 1, 2, 3]

    def log_p_class(x, s):
        joint = ring_gmm.component_log_prob(x, s)
        return torch.logsumexp(joint[:, cls], 1) - torch.logsumexp(joint, 1)

    x = ring_gmm.sample(32, torch.Generator().manual_seed(1)) + sigma * torch.randn(32, 2, dtype=torch.float64)
    s = torch.full((32,), sigma, dtype=torch.float64)
    torch.testing.assert_close(ClassifierGuided(ring_gmm, log_p_class, 1.0)(x, s), ring_gmm.subset(cls)(x, s), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ClassifierGuided(ring_gmm, log_p_class, 0.0)(x, s), ring_gmm(x, s))


def test_bad_conditions():
    with pytest.raises(ValueError, match="same shape"):
        ClassifierFree(by_label, torch.ones(4), torch.zeros(3), w=2.0)
    cfg = ClassifierFree(by_label, torch.ones(4), torch.zeros(4), w=2.0)
    with pytest.raises(ValueError, match="does not match 4 conditions"):
        cfg(torch.zeros(5, 2), torch.ones(5))


def test_guided_conditional_model_is_one_graph_that_reads_nothing_back(host_reads):
    """Guidance keeps a denoiser call free of reads back to the host: classifier-free guidance over a conditional
    Precond compiles as one graph, and classifier guidance (its gradient taken eagerly) reads nothing either."""
    torch._dynamo.reset()
    model = Precond(MLP(2, width=16, depth=1, num_classes=3), paths.VPLinear(), "eps").eval()
    labels = torch.tensor([0, 1, 2])
    cfg = ClassifierFree(model, cond=labels, null=torch.full((3,), 3), w=2.5)
    guided = ClassifierGuided(lambda x, s: model(x, s, labels), lambda x, s: -(x**2).sum(1) / (1 + s**2), 2.0)
    x, sigma = torch.randn(3, 2), torch.tensor([0.05, 1.0, 20.0])
    with torch.no_grad():
        with host_reads() as reads:
            eager = cfg(x, sigma)
            guided(x, sigma)
        assert reads.calls == []
        compiled = torch.compile(cfg.__call__, fullgraph=True, backend="eager")(x, sigma)
    torch.testing.assert_close(compiled, eager)
