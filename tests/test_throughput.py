"""The throughput benchmark's arithmetic and fast paths, on CPU: FLOP counts, compiled == eager, the CLI run."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from diffkit import cli, grids, samplers
from diffkit.paths import VPLinear
from diffkit.precond import Precond
from diffkit.train import fast

pytest.importorskip("diffusers")
_spec = importlib.util.spec_from_file_location(
    "throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py")
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)
CPU = torch.device("cpu")
TINY = tp.QUICK["net"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def _perturb(params, seed: int = 0) -> None:
    """Move every weight off its init (the UNet zero-inits its last layers, which would zero most gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_flop_counter_matches_the_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    x = torch.randn(2, 3, 5, 5)  # no grad: the conv's backward computes only its weight gradient
    conv = 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3)  # 2 x outputs x multiply-adds per output
    linear = 2 * 2 * 100 * 6
    # forward conv + linear; backward: conv weight grad, linear input and weight grads
    assert tp.count_flops(lambda: net(x).sum().backward()) == 2 * conv + 3 * linear


def test_attention_is_counted():
    """UNet FLOPs grow by exactly the attention matmuls when attention is added (counted on any device)."""
    def fwd_flops(attn):
        net, x = tp.ours_net({**TINY, "attn_resolutions": attn}), torch.randn(1, 3, 16, 16)
        return tp.count_flops(lambda: net(x, torch.zeros(1))), net
    plain, _ = fwd_flops(())
    with_attn, net = fwd_flops((8,))
    c, tokens = 64, 8 * 8  # three blocks at the 8x8 level (one down, two up), width 64; the mid one is in both
    qkv_proj = 2 * tokens * c * 4 * c
    scores_values = 2 * 2 * tokens * tokens * c
    assert with_attn - plain == 3 * (qkv_proj + scores_values)


def test_compiled_train_step_gives_the_eager_loss_and_gradients():
    size = TINY["image_size"]
    x0 = torch.randn(3, 3, size, size)
    results = []
    for compile in (False, True):
        loss_fn, opt = tp.train_setup("ours", TINY, CPU, compile)
        params = opt.param_groups[0]["params"]
        _perturb(params)
        torch.manual_seed(1)  # dropout
        loss = loss_fn(x0, torch.Generator().manual_seed(2))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert sum(g.abs().sum() for g in grads_e) > 0
    for ge, gc in zip(grads_e, grads_c):
        assert torch.allclose(gc, ge, rtol=1e-4, atol=1e-6)


def test_unet_parameter_counts_at_the_cifar_config_are_within_5_percent():
    n_ours, n_ref = (sum(p.numel() for p in make(tp.CIFAR).parameters()) for make in (tp.ours_net, tp.diffusers_net))
    assert 35e6 < n_ours < 36e6
    assert abs(n_ours - n_ref) <= 0.05 * n_ref, f"ours {n_ours:,} vs diffusers {n_ref:,}"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_fast_denoiser_samples_like_the_plain_loop(sampler):
    torch.manual_seed(0)
    net = tp.ours_net({**TINY, "dropout": 0.0})
    _perturb(net.parameters())
    denoiser = Precond(fast.prepare(net, CPU), VPLinear(), "eps")
    sigmas = grids.discrete(VPLinear().alphas_cumprod(), 4, "trailing")
    x = torch.randn(2, 3, 16, 16) * float(sigmas[0])
    with torch.no_grad():
        plain = samplers.get(sampler)(denoiser, x, sigmas)
    compiled = samplers.get(sampler)(fast.FastDenoiser(denoiser, CPU), x, sigmas)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    assert plain.abs().max() > 0 and not compiled.requires_grad
    assert torch.allclose(compiled, plain, rtol=1e-5, atol=1e-5)


def test_bench_throughput_quick_writes_json_and_table(tmp_path, capsys):
    assert cli.main(["bench", "throughput", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "throughput.json").read_text())
    for key in ("device", "torch", "settings", "train_speedup_vs_diffusers_compiled_bs512", "sampling_speedup_nfe10"):
        assert key in res
    assert res["device"] == "cpu" and res["train_speedup_vs_diffusers_compiled_bs512"] is None
    assert res["sampling_speedup_nfe10"] is None  # NFE 10 is not run by --quick
    assert {(r["model"], r["mode"]) for r in res["train"]} == {(m, c) for m in ("ours", "diffusers")
                                                               for c in ("eager", "compiled")}
    assert {r["nfe"] for r in res["sample"]} == set(tp.QUICK["nfes"])
    for r in res["train"]:
        achieved = r["gflop_per_image"] * 1e9 * r["images_per_s"]
        assert math.isclose(r["tflop_per_s"] * 1e12, achieved, rel_tol=1e-9)
        assert math.isclose(r["mfu_vs_gemm"], achieved / res["gemm"]["flops"], rel_tol=1e-9)
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    table = (tmp_path / "throughput.md").read_text()
    assert "| model | mode | batch | images_per_s |" in table and "| model | mode | nfe |" in table
    assert table.strip() in capsys.readouterr().out
