import pytest
import torch

from diffkit import grids, paths


def test_karras_matches_eq5():
    s = grids.karras(18, 0.002, 80.0, rho=7.0)
    assert s.shape == (19,) and s.dtype == torch.float64 and s[-1] == 0
    torch.testing.assert_close(s[[0, 17]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    # sigma^(1/rho) is linear in the step index.
    root = s[:-1] ** (1 / 7)
    torch.testing.assert_close(root.diff(), torch.full((17,), (root[-1] - root[0]).item() / 17, dtype=torch.float64))
    grids.check_grid(s)


def test_uniform_t_is_uniform_in_time(path):
    s = grids.uniform_t(path, 12)
    grids.check_grid(s)
    t = path.t(s[:-1])
    torch.testing.assert_close(t.diff(), torch.full((11,), (path.t_min - path.t_max) / 11, dtype=torch.float64))


def test_log_snr_uniform(path):
    s = grids.log_snr_uniform(path, 9)
    grids.check_grid(s)
    lam = -2 * torch.log(s[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((8,), (lam[-1] - lam[0]).item() / 8, dtype=torch.float64))
    torch.testing.assert_close(s[[0, 8]], torch.tensor([path.sigma_max, path.sigma_min], dtype=torch.float64))


@pytest.mark.parametrize("spacing", grids.SPACINGS)
def test_discrete_grid(spacing):
    table = paths.VPLinear().alphas_cumprod()
    s = grids.discrete(table, 10, spacing)
    grids.check_grid(s)
    ts = grids.discrete_timesteps(10, spacing)
    assert ts.shape == (10,) and (ts.diff() < 0).all() and ts.min() >= 0 and ts.max() <= 999
    torch.testing.assert_close(s[:-1], torch.sqrt((1 - table[ts]) / table[ts]))


def test_single_step_grids():
    for s in (grids.karras(1, 0.1, 10.0), grids.uniform_t(paths.EDM(), 1), grids.log_snr_uniform(paths.EDM(), 1)):
        grids.check_grid(s)
        assert s.shape == (2,)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
        (torch.tensor([2.0, -1.0, 0.0]), "negative"),
        (torch.tensor([2.0, 1.0]), "end with 0"),
        (torch.tensor([[2.0, 0.0]]), "1-D"),
        (torch.tensor([float("nan"), 0.0]), "non-finite"),
    ],
)
def test_check_grid_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        grids.check_grid(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        grids.karras(10, 5.0, 1.0)
    with pytest.raises(ValueError, match="unknown spacing"):
        grids.discrete_timesteps(10, "middle")
