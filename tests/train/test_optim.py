"""Optimizer choice and parameter split (train.optim), and the sign optimizers' embedding drift."""
import pytest
import torch
from torch import nn

from diffkit import config as configs
from diffkit.nets.mlp import MLP
from diffkit.train import optim

pytest.importorskip("pytorch_optimizer")


def kinds(opts):
    return [type(o).__name__ for o in opts]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    net = MLP(8, width=16, depth=2, num_classes=3)
    adamw, muon = optim.build(net, "muon", muon_adjust_lr="match_rms_adamw")
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    expected = {id(p) for n, p in net.named_parameters() if p.ndim == 2 and n.startswith("blocks.")}
    assert on_muon == expected
    assert len(on_muon) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(net.parameters()))
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_conv_kernels_stay_on_adamw():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 8))
    adamw, muon = optim.build(net, "muon")
    assert [p.ndim for g in muon.param_groups for p in g["params"]] == [2]
    assert 4 in [p.ndim for g in adamw.param_groups for p in g["params"]]


@pytest.mark.parametrize("kind", ["lion", "tiger"])
def test_sign_optimizers_leave_embedding_tables_to_adamw(kind):
    net = MLP(8, width=16, depth=1, num_classes=3)
    adamw, sign = optim.build(net, kind)
    assert kinds([sign]) == [kind.title()]
    assert [p for g in adamw.param_groups for p in g["params"]] == [net.cond.labels.table.weight]
    assert kinds(optim.build(net, kind, sign_embeddings_adamw=False)) == [kind.title()]


def test_bad_names_name_the_nearest_valid_one():
    with pytest.raises(ValueError, match="did you mean 'lion'"):
        configs.load(None, ["train.optimizer=lino"])
    with pytest.raises(ValueError, match="did you mean 'match_rms_adamw'"):
        configs.load(None, ["train.muon_adjust_lr=match_rms"])
    with pytest.raises(ValueError, match="did you mean 'spectral'"):
        configs.load(None, ["train.parametrization=spectra"])


def _unused_row_drift(kind: str, steps: int, lr: float = 1e-2, **kw) -> float:
    """How far row 1 of an embedding table moves over `steps` steps in which only the first uses it."""
    torch.manual_seed(0)
    table = nn.Embedding(2, 4)
    start = table.weight[1].detach().clone()
    (opt,) = optim.build(nn.ModuleDict({"t": table}), kind, lr=lr, **kw)
    for step in range(steps):
        opt.zero_grad()
        table(torch.tensor([0, 1] if step == 0 else [0])).square().sum().backward()
        opt.step()
    return (table.weight[1] - start).abs().max().item()


def test_a_sign_optimizer_moves_an_unused_row_by_lr_every_step_adamw_does_not():
    """The anomaly in closed form: with zero gradient, Lion's momentum keeps its sign, so the row moves by
    exactly lr per step (no weight decay); AdamW's m/sqrt(v) decays like (beta1/sqrt(beta2))^t."""
    lion = _unused_row_drift("lion", 200, sign_embeddings_adamw=False)
    assert lion == pytest.approx(200 * 1e-2, rel=1e-4)
    assert _unused_row_drift("adamw", 200) < 12 * 1e-2


def test_a_missing_pytorch_optimizer_is_a_clear_error(monkeypatch):
    real = optim.importlib.util.find_spec
    monkeypatch.setattr(optim.importlib.util, "find_spec", lambda name: None if name == "pytorch_optimizer" else real(name))
    with pytest.raises(ValueError, match=r"pip install 'diffkit\[train\]'"):
        configs.load(None, ["train.optimizer=tiger"])
