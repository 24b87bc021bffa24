import importlib.util
import math
from pathlib import Path

import pytest
import torch

from diffkit import data

_spec = importlib.util.spec_from_file_location(
    "flow_peers", Path(__file__).resolve().parents[1] / "benchmarks" / "flow_peers.py")
fp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp)


@pytest.fixture
def one_thread():
    # Flows this small train several times faster on one thread than split over two busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_levels_match_the_loader():
    # All 17 levels of the digits occur, at k / 8 - 1: one level is 1/8 wide in the loader's units.
    assert torch.equal(data.digits("all")[0].unique(), torch.arange(fp.DIGITS_LEVELS) / 8 - 1)


def test_dequantize_fills_each_level_cell_and_rejects_off_grid_data():
    levels, delta = 5, 0.5  # x = k / 2 - 1, k = 0..4
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).repeat(4000)
    w = (data.dequantize(x, levels=levels, generator=torch.Generator().manual_seed(0)) - x) / delta
    assert w.min() >= -0.5 and w.max() < 0.5
    assert w.mean().item() == pytest.approx(0, abs=0.01) and w.var().item() == pytest.approx(1 / 12, abs=0.003)
    with pytest.raises(ValueError, match="not on the grid"):
        data.dequantize(torch.tensor([0.25]), levels=levels)
    with pytest.raises(ValueError, match="levels"):
        data.dequantize(x, levels=1)


def test_gaussian_baseline_bpd_is_the_closed_form():
    # levels 5: k = 0..4 -> x = k / 2 - 1, delta = 1/2. Train k = 0, 2, 4, 4 -> x = -1, 0, 1, 1, one dimension:
    # m = 1/4, var = (25/16 + 1/16 + 9/16 + 9/16) / 4 = 11/16, plus delta^2 / 12 = 1/48 from the dequantization.
    train = torch.tensor([[-1.0], [0.0], [1.0], [1.0]])
    m, s2 = 0.25, 11 / 16 + 1 / 48
    mean, scale = fp.gaussian_fit(train, levels=5)
    assert mean.item() == pytest.approx(m) and scale.pow(2).item() == pytest.approx(s2)
    # Held out x = 0 and 1, each repeated so the average over dequantization draws is the expectation:
    # E_w log N(x + w / 2; m, s2) = -log(2 pi s2) / 2 - ((x - m)^2 + 1/48) / (2 s2); bits/dim adds -log(1/2).
    test = torch.tensor([[0.0], [1.0]]).repeat(10000, 1)
    e_log_p = -0.5 * math.log(2 * math.pi * s2) - ((1 / 16 + 1 / 48) + (9 / 16 + 1 / 48)) / 2 / (2 * s2)
    expected = -(e_log_p + math.log(0.5)) / math.log(2)
    row = fp.fit_and_score("gaussian", train, test, steps=1, batch=1, seed=0, levels=5, draws=1)
    assert row["bpd"] == pytest.approx(expected, abs=5e-3)  # Monte Carlo error ~1e-3 bits
    assert row["params"] == 2 and row["steps"] == 0


def test_dequantized_bpd_of_a_known_density_bounds_the_discrete_mass():
    # A standard normal on the digits' 17 levels (delta = 1/8) at x = k / 8 - 1 for k = 0, 3, 8, 13, 16.
    x = torch.tensor([[-1.0, -0.625, 0.0, 0.625, 1.0]]).repeat(4000, 1)
    delta, d = 1 / 8, 5
    bpd = fp.score(fp.standard_normal, x, levels=17, draws=1, generator=torch.Generator().manual_seed(1))
    # E_w log N(x + delta w) = -log(2 pi) / 2 - (x^2 + delta^2 / 12) / 2 per dimension.
    e_log_p = sum(-0.5 * math.log(2 * math.pi) - (v * v + delta**2 / 12) / 2 for v in x[0].tolist())
    assert bpd == pytest.approx(-(e_log_p + d * math.log(delta)) / (d * math.log(2)), abs=1e-3)
    # The discrete mass of each level's cell, P(k) = Phi(x + delta / 2) - Phi(x - delta / 2), bounds it from below
    # (Jensen), with a gap far below the 0.09 bits a level width of 2 / 17 would shift it by.
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    exact = -sum(math.log2(phi(v + delta / 2) - phi(v - delta / 2)) for v in x[0].tolist()) / d
    assert exact - 1e-3 < bpd < exact + 3e-3


def test_unknown_peer_model():
    with pytest.raises(ValueError, match="unknown model"):
        fp.fit_and_score("realnvp", torch.zeros(2, 1), torch.zeros(2, 1), steps=1, batch=1, seed=0)


def test_maf_learns_digits_past_the_gaussian_baseline(one_thread):
    pytest.importorskip("zuko")
    train, test = data.digits("train")[0], data.digits("test")[0]
    gaussian = fp.fit_and_score("gaussian", train, test, steps=1, batch=1, seed=0)
    maf = fp.fit_and_score("maf", train, test, steps=100, batch=128, seed=0)
    assert maf["params"] == 666528 and maf["steps"] == 100
    assert 2.5 < maf["bpd"] < gaussian["bpd"] - 0.2, (maf, gaussian)
