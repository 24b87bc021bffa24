"""What the net tests share: nudging zero-initialised weights, and overfitting one fixed batch."""
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
