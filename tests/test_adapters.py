"""Adapters against their definitions: LoRA and LoRA-GA leave the network's output unchanged at init, PiSSA's
residual is W minus its top-r SVD part, LoRA-GA's first step lies in the gradient's top singular subspace, merging
adds exactly s B A, convolutions are refused where peft would silently fall back, a missing peft says how to
install it."""
import sys

import pytest
import torch
from torch import nn

from diffkit import adapters
from diffkit.adapters import AdapterSettings
from diffkit.nets.mlp import MLP


def _mlp():
    torch.manual_seed(0)
    net = MLP(16, width=12, depth=1, emb=8)
    return net, torch.randn(6, 16), torch.rand(6)


def test_lora_at_init_leaves_the_output_unchanged_and_trains_only_a_and_b():
    net, x, c = _mlp()
    before = net(x, c)
    names = adapters.attach(net, AdapterSettings("lora", rank=2))
    assert names == [n for n, m in MLP(16, width=12, depth=1, emb=8).named_modules() if isinstance(m, nn.Linear)]
    assert torch.equal(net(x, c), before)  # B = 0: s B A x adds exact zeros
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}


def test_pissa_residual_is_w_minus_its_top_r_svd_part():
    net, x, c = _mlp()
    before, r = net(x, c), 3
    weights = {n: m.weight.detach().double().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    adapters.attach(net, AdapterSettings("pissa", rank=r, alpha=6.0))  # s = 2
    for name, layer in adapters.layers(net).items():
        u, s, vh = torch.linalg.svd(weights[name])
        top = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        residual = layer.get_base_layer().weight.double()
        torch.testing.assert_close(residual, weights[name] - top, atol=1e-5, rtol=0)
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        torch.testing.assert_close(2.0 * b @ a, top, atol=1e-5, rtol=0)
    torch.testing.assert_close(net(x, c), before, atol=1e-5, rtol=0)


def test_lora_ga_starts_unchanged_and_its_first_step_lies_in_the_gradients_top_subspace():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10))
    x, target, r, lr = torch.randn(6, 16), torch.randn(6, 10), 2, 1e-4
    loss = lambda: (net(x) - target).pow(2).mean()  # noqa: E731
    before = net(x).detach()
    loss().backward()
    g = net[0].weight.grad.double().clone()  # the full fine-tuning gradient of the first layer (rank <= 6)
    net.zero_grad()
    adapters.attach(net, AdapterSettings("lora_ga", rank=r), train_step=lambda: loss().backward())
    torch.testing.assert_close(net(x), before, atol=1e-6, rtol=0)
    layer = adapters.layers(net)["0"]
    a0, b0 = (layer.lora_A["default"].weight.detach().double().clone(),
              layer.lora_B["default"].weight.detach().double().clone())
    u, _, vh = torch.linalg.svd(g)
    # A0 spans the top-r right singular vectors of G, B0 the next r left ones (peft's ArB2r)
    torch.testing.assert_close((a0 @ vh[:r].T).abs(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_norm(b0 - u[:, r:2 * r] @ (u[:, r:2 * r].T @ b0)) < 1e-5 * torch.linalg.matrix_norm(b0)
    # One SGD step of A and B: the change of B A lies in G's top-2r singular subspace and descends
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    loss().backward()
    opt.step()
    delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() - b0 @ a0
    p_u, p_v = u[:, :2 * r] @ u[:, :2 * r].T, vh[:2 * r].T @ vh[:2 * r]
    assert torch.linalg.matrix_norm(delta - p_u @ delta @ p_v) < 1e-4 * torch.linalg.matrix_norm(delta)
    assert (delta * g).sum() < 0
    # to first order in lr: -lr (B0 B0^T G + G A0^T A0) (s = 1)
    first = -lr * (b0 @ b0.T @ g + g @ a0.T @ a0)
    assert torch.linalg.matrix_norm(delta - first) < 1e-2 * torch.linalg.matrix_norm(first)


def test_merging_adds_exactly_s_b_a():
    net, x, c = _mlp()
    adapters.attach(net, AdapterSettings("lora", rank=2, alpha=3.0))  # s = 1.5
    torch.manual_seed(1)
    for layer in adapters.layers(net).values():  # B = 0 at init: give it weights so the merge adds something
        nn.init.normal_(layer.lora_B["default"].weight)
    expected = {n: layer.get_base_layer().weight.detach()
                + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 1.5
                for n, layer in adapters.layers(net).items()}
    unmerged = net(x, c).detach()
    assert adapters.merge(net) == len(expected)
    for name, layer in adapters.layers(net).items():
        assert torch.equal(layer.get_base_layer().weight, expected[name])
    torch.testing.assert_close(net(x, c), unmerged, atol=1e-5, rtol=1e-5)


def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 8))


@pytest.mark.parametrize("kind", ["lora_ga", "pissa"])
def test_svd_adapters_on_convolutions_are_refused_or_kept_to_linear_layers(kind):
    with pytest.raises(ValueError, match="Conv2d layers .*'0'.*targets=linear"):
        adapters.attach(_conv_net(), AdapterSettings(kind, rank=2), train_step=lambda: None)
    net = _conv_net()
    x = torch.randn(3, 1, 8, 8)
    step = lambda: net(x).pow(2).mean().backward()  # noqa: E731
    assert adapters.attach(net, AdapterSettings(kind, rank=2, targets="linear"), train_step=step) == ["2"]
    assert not net[0].weight.requires_grad  # the convolution stays frozen
    assert adapters.attach(_conv_net(), AdapterSettings("lora", rank=2)) == ["0", "2"]  # plain LoRA adapts convs


def test_a_rank_above_a_layers_size_is_an_error():
    with pytest.raises(ValueError, match=r"rank 9 exceeds layer 'cond.mlp.0' \(8 -> 8\): use a rank <= 8"):
        adapters.attach(_mlp()[0], AdapterSettings("lora", rank=9))


def test_missing_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(adapters.MissingPeft, match=r"pip install 'diffkit\[lora\]'"):
        adapters.attach(_mlp()[0], AdapterSettings("lora", rank=2))
