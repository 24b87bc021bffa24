"""Gradient checkpointing (nets.recompute) changes memory, not numbers: the same loss and gradients as the plain
forward, dropout included (the recomputed block redraws the same mask)."""
import pytest
import torch

from diffkit.nets.dit import Block, DiT
from diffkit.nets.unet import UNet

NETS = {
    "dit": lambda ck: DiT(8, 3, patch_size=2, width=32, depth=3, heads=4, num_classes=5, dropout=0.1,
                          grad_checkpoint=ck),
    "unet": lambda ck: UNet(3, channels=16, channel_mult=(1, 2), num_res_blocks=1, image_size=8, num_groups=8,
                            head_channels=8, num_classes=5, dropout=0.1, grad_checkpoint=ck),
}


def loss_and_grads(name: str, checkpointed: bool, dropout_seed: int = 2):
    torch.manual_seed(0)
    net = NETS[name](checkpointed).train()
    for p in net.parameters():  # leave the zero init, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g)
    labels = torch.tensor([0, 1, 2, 5])
    torch.manual_seed(dropout_seed)
    loss = net(x, c, labels).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("name", NETS)
def test_checkpointed_blocks_give_the_plain_gradients(name):
    loss, grads = loss_and_grads(name, False)
    loss_ck, grads_ck = loss_and_grads(name, True)
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys()
    for n, g in grads.items():
        torch.testing.assert_close(grads_ck[n], g, rtol=0, atol=0, msg=n)
    # dropout is on, so a recompute that drew another mask would show: another draw changes the loss
    assert not torch.equal(loss_and_grads(name, True, dropout_seed=3)[0], loss)


def test_checkpointing_recomputes_each_block_in_the_backward_pass(monkeypatch):
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *args: calls.append(1) or forward(self, *args))
    net = NETS["dit"](True).train()
    net(torch.randn(2, 3, 8, 8), torch.rand(2)).sum().backward()
    assert len(calls) == 2 * len(net.blocks)  # forward, then the recompute
    calls.clear()
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert len(calls) == len(net.blocks)
