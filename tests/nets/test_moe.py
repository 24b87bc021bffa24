import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit import paths
from diffkit.nets.dit import DiT
from diffkit.nets.moe import MoE, max_violation, mlp
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train import checkpoint
from diffkit.train.loop import TrainSettings, train


def test_the_bias_chooses_the_experts_and_the_unbiased_scores_weigh_them():
    torch.manual_seed(0)
    moe = MoE(6, 4, experts=4, top_k=2, score="sigmoid")
    u = torch.randn(32, 6)
    s = moe.router(u).sigmoid()
    moe.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 wins every selection
    chosen, gates, scores = moe.route(u)
    assert (chosen == 3).any(1).all()
    # The other chosen expert is each token's best by unbiased score among 0..2.
    other = torch.where(chosen[:, 0] == 3, chosen[:, 1], chosen[:, 0])
    assert torch.equal(other, s[:, :3].argmax(1))
    expected = s.gather(1, chosen)
    torch.testing.assert_close(gates, expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(scores, s)


def test_top_1_keeps_the_raw_score_so_the_router_learns():
    torch.manual_seed(0)
    moe = MoE(6, 4, experts=4, top_k=1, score="softmax")
    u = torch.randn(16, 6)
    chosen, gates, _ = moe.route(u)
    p = moe.router(u).softmax(-1)
    torch.testing.assert_close(gates[:, 0], p.max(1).values)
    moe(u).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_every_expert_chosen_with_identical_experts_is_the_dense_mlp(score):
    torch.manual_seed(0)
    dense = mlp(8, 16)
    moe = MoE(8, 16, experts=4, top_k=4, score=score)
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)


def test_shared_experts_are_added_to_every_token():
    torch.manual_seed(0)
    moe = MoE(8, 16, experts=4, top_k=2, shared=1)
    x = torch.randn(10, 8)
    routed = MoE(8, 16, experts=4, top_k=2)
    routed.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    torch.testing.assert_close(moe(x), routed(x) + moe.shared[0](x))


def test_the_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(4, 8, experts=4, top_k=1, balance="aux_free", bias_rate=1e-2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.1, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 0.1, 0]]))
    u = torch.randn(512, 4) + torch.tensor([2.0, 0, 0, 0])  # expert 0 takes nearly every token
    vio = []
    for _ in range(300):
        moe(u)
        vio.append(max_violation(moe.load).item())
        moe.after_step(True)
    assert vio[0] > 2.5 and max(vio[-20:]) < 0.4  # from 2.9; sign steps of a fixed size leave a small wobble
    # Experts above the mean load were pushed down, those below pulled up.
    assert moe.bias[0] < 0 < moe.bias[1:].max()


def test_a_skipped_step_drops_its_counts_and_moves_nothing():
    moe = MoE(4, 8, experts=4, top_k=1)
    moe(torch.randn(64, 4))
    moe.after_step(False)
    assert moe.bias.abs().sum() == 0 and moe.load.sum() == 0 and moe.drain() == {}


def test_no_balancing_leaves_the_bias_at_zero_and_aux_loss_is_the_switch_formula():
    torch.manual_seed(0)
    moe = MoE(6, 4, experts=4, top_k=2, score="softmax", balance="aux_loss", aux_weight=0.1)
    u = torch.randn(40, 6)
    moe(u)
    aux = moe.aux_loss()
    chosen, _, s = moe.route(u)
    f = torch.stack([(chosen == e).sum() for e in range(4)]).float() / chosen.numel()
    torch.testing.assert_close(aux, 0.1 * 4 * (f * s.mean(0)).sum())
    assert moe.aux_loss() is None  # handed over once
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    moe.after_step(True)
    assert moe.bias.abs().sum() == 0


def test_eval_and_no_grad_forwards_count_nothing():
    moe = MoE(4, 8, experts=4, top_k=2, balance="aux_loss")
    with torch.no_grad():
        moe(torch.randn(8, 4))
    moe.eval()
    moe(torch.randn(8, 4))
    assert moe.load.sum() == 0 and moe.aux_loss() is None


def test_bad_moe_settings_are_refused():
    with pytest.raises(ValueError, match="top_k must be in"):
        MoE(4, 8, experts=4, top_k=5)
    with pytest.raises(ValueError, match="unknown MoE balance"):
        MoE(4, 8, balance="aux-free")
    with pytest.raises(ValueError, match=r"unknown model.args.moe keys \['expert'\]"):
        DiT(8, 1, width=16, depth=1, heads=2, moe={"expert": 4})


def moe_dit(balance):
    torch.manual_seed(0)
    net = DiT(8, 1, patch_size=2, width=16, depth=2, heads=2,
              moe={"experts": 4, "top_k": 2, "balance": balance, "bias_rate": 0.01})
    return Precond(net, paths.RectifiedFlow(), "velocity")


def run(folder, steps, balance="aux_free"):
    model = moe_dit(balance)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=steps, batch=16, micro_batch=8, warmup=1, cosine=False, log_every=2,
                             checkpoint_every=2, ema_decay=0.9)
    ema = train(model, Denoising(paths.RectifiedFlow()), x, None, settings, folder, progress=False)
    return model, ema


def test_the_loop_updates_logs_and_resumes_the_expert_bias_exactly(tmp_path):
    whole, ema = run(tmp_path / "whole", 6)
    run(tmp_path / "split", 4)
    split, _ = run(tmp_path / "split", 6)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name
    bias = whole.net.blocks[0].mlp.bias
    assert bias.abs().sum() > 0 and torch.equal(ema.model.net.blocks[0].mlp.bias, bias)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    maxvio = rows[-1]["net.blocks.1.mlp.maxvio"]
    assert len(maxvio) == 2 and all(v >= 0 for v in maxvio)
    assert sum(rows[-1]["net.blocks.1.mlp.load"]) == pytest.approx(1.0)
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path / "whole")).model["net.blocks.0.mlp.bias"], bias)


def test_the_loop_adds_the_aux_loss_to_the_gradient(tmp_path):
    with_aux, _ = run(tmp_path / "aux", 2, balance="aux_loss")
    without, _ = run(tmp_path / "none", 2, balance="none")
    router = lambda m: m.net.blocks[0].mlp.router.weight  # noqa: E731
    assert not torch.equal(router(with_aux), router(without))


def test_two_processes_count_every_token_and_match_one(tmp_path):
    """Under torchrun each process routes half the batch; the bias update needs the loads of both halves."""
    script = Path(__file__).with_name("_moe_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(script), str(tmp_path / "ddp"), "4", "8"], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4", "8"], check=True, env=env, timeout=300)
    r0, r1, one = (load_file(tmp_path / d / f"final-rank{r}.safetensors") for d, r in (("ddp", 0), ("ddp", 1),
                                                                                           ("one", 0)))
    assert one["net.blocks.0.mlp.bias"].abs().sum() > 0
    for k, v in one.items():
        assert torch.equal(r0[k], r1[k]), f"ranks drifted apart in {k}"
        torch.testing.assert_close(r0[k], v, rtol=0, atol=1e-5)


def test_gradient_checkpointing_counts_each_token_once_and_keeps_the_gradients():
    x, c = torch.randn(4, 1, 8, 8), torch.rand(4)
    grads, loads = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net = DiT(8, 1, patch_size=2, width=16, depth=2, heads=2, grad_checkpoint=checkpointed,
                  moe={"experts": 4, "top_k": 2, "balance": "aux_loss"})
        out = net(x, c).square().mean()
        aux = sum(block.mlp.aux_loss() for block in net.blocks)
        (out + aux).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        loads.append(torch.stack([block.mlp.load for block in net.blocks]))
        assert all(block.mlp.aux_loss() is None for block in net.blocks)  # the recomputation stored none
    assert torch.equal(loads[0], loads[1]) and loads[0].sum() == 2 * 2 * 4 * 16  # blocks x top_k x tokens
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
