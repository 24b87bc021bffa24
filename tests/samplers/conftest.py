"""Fixtures shared by the sampler tests."""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For modules whose tensors have a few hundred rows: splitting them over threads only adds overhead
    (measured 5x to 20x slower on a busy 2-core box). Use with pytest.mark.usefixtures("one_thread")."""
    with _single_thread():
        yield


@pytest.fixture(scope="session")
def problem(ring_gmm):
    """200 ring points noised to sigma = 80 and their exact PF-ODE endpoints, for fitting convergence orders.

    The reference takes the same final jump x = D(x, sigma_min = 0.002) as the samplers, so a fitted slope
    measures discretization error alone (that jump's own O(sigma_min^2) error would set a floor). One solve
    per session serves every sampler's order test.
    """
    g = torch.Generator().manual_seed(0)
    x_T = ring_gmm.sample(200, g) + 80.0 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    with _single_thread():
        return ring_gmm, x_T, ring_gmm.flow(x_T, 80.0, sigma_end=0.002)
