import pytest
import torch

from diffkit import paths
from diffkit.nets.mlp import MLP

from _fit import overfit_losses  # tests/nets/_fit.py

SETUPS = [(paths.VPLinear(), "eps"), (paths.VPCosine(), "v"), (paths.RectifiedFlow(), "velocity"),
          (paths.EDM(), "edm"), (paths.EDM(), "x0")]


@pytest.mark.parametrize("path,kind", SETUPS, ids=[k for _, k in SETUPS])
def test_overfits_a_fixed_batch(path, kind):
    # A fixed batch and fixed noise draws: the loss must fall by a large factor.
    torch.manual_seed(0)
    net = MLP(2, width=128, depth=3, num_classes=3)
    x0, labels = torch.randn(64, 2), torch.randint(0, 3, (64,))
    losses = overfit_losses(net, path, kind, x0, labels, steps=300, lr=3e-3)
    assert losses[-1] < losses[0] / 10, f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_labels_change_the_output_and_are_checked():
    torch.manual_seed(0)
    net = MLP(4, width=32, depth=1, num_classes=5)
    x, c = torch.randn(3, 4), torch.rand(3)
    assert not torch.allclose(net(x, c, torch.tensor([0, 1, 2])), net(x, c, None))
    for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0], [1], [2]])):  # values: checked by train.loop
        with pytest.raises(ValueError, match=r"\(3,\) integers in \[0, 5\]"):
            net(x, c, bad)
