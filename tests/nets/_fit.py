"""What the net tests share: nudging zero-initialised weights, the label checks, and overfitting one fixed batch."""
import pytest
import torch

from diffkit import paths
from diffkit.objectives import Denoising
from diffkit.precond import Precond


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    # Zero-initialised output layers make F = 0 at init; nudge every weight so inputs matter.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def check_labels(make) -> None:
    """make(**kw) builds an image net on (1, 8, 8) (num_classes in kw): labels change its output, label
    num_classes means no label, labels of the wrong shape or dtype and labels on an unconditional net are errors."""
    net = perturbed(make(num_classes=10))
    x, c = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert not torch.allclose(net(x, c, torch.tensor([0, 1, 2])), net(x, c, None))
    assert torch.equal(net(x, c, torch.full((3,), 10)), net(x, c, None))  # index num_classes = no label
    for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0], [1], [2]])):  # values: checked by train.loop
        with pytest.raises(ValueError, match=r"\(3,\) integers in \[0, 10\]"):
            net(x, c, bad)
    with pytest.raises(ValueError, match="unconditional"):
        make()(x, c, torch.tensor([0, 1, 2]))


def overfit_losses(net: torch.nn.Module, path: paths.Path, kind: str, x0: torch.Tensor, labels: torch.Tensor, *,
                   steps: int, lr: float) -> list[float]:
    """Adam on one fixed batch with fixed noise draws; the loss after each step."""
    model = Precond(net, path, kind)
    objective = Denoising(path, density=paths.LogNormal() if kind in ("edm", "x0") else paths.Uniform())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = objective(model, x0, labels, generator=torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
