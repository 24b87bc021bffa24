"""No sampler reads a value back from the device inside its loop (on CUDA each read would stall the queue).

rk45 is left out: an adaptive solver must read its error estimate every step to choose the next one.
"""
import pytest
import torch

from diffkit import grids, samplers
from diffkit.samplers.noise import GaussianNoise

LOOPED = sorted(set(samplers.SAMPLERS) - {"rk45"})


def _reads(host_reads, name, steps, **options):
    sigmas = grids.karras(steps, 0.01, 10.0)
    with host_reads() as reads:
        samplers.get(name)(lambda x, s: 0.9 * x, 10 * torch.randn(2, 4), sigmas, **options)
    return reads.calls


@pytest.mark.parametrize("name", LOOPED)
def test_a_sampler_reads_the_same_few_values_whatever_its_step_count(name, host_reads):
    """The grid is checked and turned into Python floats once, before the loop; the loop itself reads nothing."""
    options = {"noise": GaussianNoise(0, 2)} if name in samplers.STOCHASTIC else {}
    few, many = _reads(host_reads, name, 3, **options), _reads(host_reads, name, 8, **options)
    assert few == many
    assert {caller for _, caller in few} == {"check_grid", "prepare"}


def test_the_counter_sees_a_read_inside_a_loop(host_reads):
    """The check above can fail: a denoiser that reads sigma as a float each call is caught once per step."""
    def reading(x, sigma):
        return x * float(sigma[0])
    with host_reads() as reads:
        samplers.euler(reading, torch.randn(2, 4), grids.karras(5, 0.01, 10.0))
    assert [name for name, _ in reads.calls].count("__float__") == 5
