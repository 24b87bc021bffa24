"""The few-step rule warns exactly where the cheaper sampler is measured to be more accurate (exact ring)."""
import warnings

import pytest
import torch

from diffkit import analytic, generate, grids, samplers
from diffkit import config as configs
from diffkit.samplers.advice import FewStepWarning, few_step_warning

SIGMA_MAX = 157.40723


@pytest.fixture(scope="module")
def ring():
    gmm = analytic.ring()
    g = torch.Generator().manual_seed(0)
    x = gmm.sample(500, g) + SIGMA_MAX * torch.randn(500, 2, generator=g, dtype=torch.float64)
    return gmm, x, gmm.flow(x, SIGMA_MAX)


def error(ring, sampler, sigmas):
    gmm, x, exact = ring
    return (samplers.get(sampler)(gmm, x, sigmas) - exact).norm(dim=1).median().item()


# (sampler, its cheaper alternative, grid steps of the sampler, NFE-matched steps of the alternative)
CASES = [("heun", "euler", 3, 5), ("heun", "euler", 5, 9), ("heun", "euler", 10, 19), ("heun", "euler", 18, 35),
         ("dpmpp_3m", "dpmpp_2m", 4, 4), ("dpmpp_3m", "dpmpp_2m", 10, 10), ("dpmpp_3m", "dpmpp_2m", 35, 35)]


@pytest.mark.parametrize("sampler, cheaper, steps, cheaper_steps", CASES)
def test_warns_where_the_cheaper_sampler_wins(ring, sampler, cheaper, steps, cheaper_steps):
    grid = grids.karras(steps, 0.002, SIGMA_MAX)
    worse = error(ring, sampler, grid) > error(ring, cheaper, grids.karras(cheaper_steps, 0.002, SIGMA_MAX))
    assert (few_step_warning(sampler, grid) is not None) == worse


def test_sample_warns_with_the_better_choice(tmp_path):
    cfg = configs.load(None, ["model.args={width: 8, depth: 1}"])
    model = configs.model(cfg, (1, 8, 8), 0)
    with pytest.warns(FewStepWarning, match="Use dpmpp_2m"):
        generate.sample(model, cfg, (1, 8, 8), 2, sampler="heun", steps=5, progress=False)
    with pytest.warns(FewStepWarning, match="diffkit calibrate"):
        generate.sample(model, cfg, (1, 8, 8), 2, sampler="dpmpp_3m", steps=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStepWarning)
        generate.sample(model, cfg, (1, 8, 8), 2, sampler="heun", steps=18, progress=False)
        generate.sample(model, cfg, (1, 8, 8), 2, sampler="dpmpp_2m", steps=3, progress=False)
