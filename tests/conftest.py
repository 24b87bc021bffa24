import contextlib
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffkit
from diffkit import analytic, paths
from diffkit.precond import Precond, from_x0_eps

ALL_PATHS = {
    "vp_linear": paths.VPLinear(),
    "vp_cosine": paths.VPCosine(),
    "ve": paths.VE(),
    "edm": paths.EDM(),
    "rectified_flow": paths.RectifiedFlow(),
    "shifted_vp": paths.Shifted(paths.VPCosine(), 2.0),
    "shifted_rf": paths.Shifted(paths.RectifiedFlow(), 3.0),
}


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt during the tests, as in a terminal, also when the suite runs in the
    background (`pytest &`), where the shell starts Python with SIGINT ignored: the Ctrl-C tests press it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


class OracleNet(torch.nn.Module):
    """A 'network' whose output makes Precond(net, path, kind) equal the exact denoiser `exact` (plus `shift`)."""

    def __init__(self, exact, path, kind, shift=0.0):
        super().__init__()
        self.exact, self.path, self.kind, self.shift = exact, path, kind, shift

    def forward(self, x_in, c_noise, cond):
        if self.kind == "edm":
            sigma = torch.exp(4 * c_noise.to(torch.float64))
            c_skip, c_out, c_in, _ = Precond(torch.nn.Identity(), self.path, "edm").scalings(sigma)
            x = x_in / c_in[:, None]
            return (self.exact(x, sigma) + self.shift - c_skip[:, None] * x) / c_out[:, None]
        t = c_noise.to(torch.float64)
        alpha, sigma = self.path.alpha(t)[:, None], self.path.sigma(t)
        x = x_in / alpha
        x0 = self.exact(x, sigma) + self.shift
        return from_x0_eps(x0, (x - x0) / sigma[:, None], self.kind, t, self.path)


PACKAGE = str(Path(diffkit.__file__).parent)


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that reads a tensor's value back to the host (on CUDA, a sync that stalls the queue),
    with the name of the diffkit function that made it: a CPU stand-in for torch.cuda.set_sync_debug_mode.
    Reads of tensors that live on the host anyway are recorded too; tests name the ones they expect."""

    READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy", "cpu",
                       "masked_select"})

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in self.READS or bool_index:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back
            self.calls.append((name, frame.f_code.co_name if frame else "?"))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    return HostReads


@pytest.fixture
def damage():
    """Overwrite the tensor bytes of a safetensors file in place with 0xff, its header intact: the file still
    loads, as NaN (a checkpoint damaged on disk)."""
    def overwrite(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(raw[:8], "little")
        raw[header:] = b"\xff" * (len(raw) - header)
        path.write_bytes(bytes(raw))
        assert all(v.isnan().all() for v in load_file(path).values())
    return overwrite

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
