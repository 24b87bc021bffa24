"""The throughput benchmark's arithmetic and fast paths, on CPU: FLOP counts, compiled == eager, the CLI run."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from diffkit import cli, grids, samplers
from diffkit.nets.mlp import MLP
from diffkit.paths import EDM, VPLinear
from diffkit.precond import Precond
from diffkit.samplers.guidance import ClassifierFree
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
                                                               for c in ("eager", "compiled")} | {("ours", "train.loop")}
    assert {r["nfe"] for r in res["sample"]} == set(tp.QUICK["nfes"])
    for r in res["train"]:
        achieved = r["gflop_per_image"] * 1e9 * r["images_per_s"]
        assert math.isclose(r["tflop_per_s"] * 1e12, achieved, rel_tol=1e-9)
        assert math.isclose(r["mfu_vs_gemm"], achieved / res["gemm"]["flops"], rel_tol=1e-9)
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    table = (tmp_path / "throughput.md").read_text()
    assert "| model | mode | batch | images_per_s |" in table and "| model | mode | nfe |" in table
    assert table.strip() in capsys.readouterr().out


@pytest.fixture
def fake_bench(monkeypatch):
    """The benchmark's bookkeeping with made-up measurements: each row's images/s is 100 (ours) or 50 (diffusers)
    times a per-call factor the test sets, so merged rows show which run wrote them."""
    state = {"factor": 1.0, "fail_after": None, "rows": 0}

    def row(model, **fields):
        state["rows"] += 1
        if state["fail_after"] is not None and state["rows"] > state["fail_after"]:
            raise RuntimeError("out of time")
        return {"model": model, "images_per_s": (100 if model == "ours" else 50) * state["factor"], **fields}

    monkeypatch.setattr(tp, "gemm_flops", lambda device, n, reps: {"n": n, "dtype": "float32", "flops": 1e9})
    monkeypatch.setattr(tp, "train_flops_per_image", lambda name, cfg, device: 1e6)
    monkeypatch.setattr(tp, "bench_train", lambda name, compile, batch, s, device, flops, peaks: row(
        name, mode="compiled" if compile else "eager", batch=batch))
    monkeypatch.setattr(tp, "bench_loop", lambda batch, s, device, flops, peaks: row(
        "ours", mode="train.loop", batch=batch))
    monkeypatch.setattr(tp, "bench_sample", lambda name, compile, batch, s, device: (
        row(name, mode="compiled" if compile else "eager", nfe=nfe, batch=batch) for nfe in s["nfes"]))
    return state


def _json(out):
    return json.loads((out / "throughput.json").read_text())


def test_runs_in_parts_add_up_and_a_rerun_replaces_its_rows(tmp_path, fake_bench):
    quick = ["--quick", "--out", str(tmp_path)]
    tp.main([*quick, "--part", "train", "--batches", "512"])
    fake_bench["factor"] = 3.0  # diffusers' compiled row measured again below; ours keeps its first figure
    tp.main([*quick, "--part", "sample", "--sample-batches", "128,1024", "--nfes", "10"])
    r = _json(tmp_path)
    assert len(r["train"]) == 4 and len(r["sample"]) == 8 and len(r["commands"]) == 2
    assert r["train_speedup_vs_diffusers_compiled_bs512"] == 2.0
    assert r["sampling_speedup_nfe10"] == 2.0 and r["sampling_speedup_nfe10_batch"] == 1024
    fake_bench["factor"] = 0.5
    tp.main([*quick, "--part", "train", "--batches", "512"])  # the same four rows again, now at half the rate
    r = _json(tmp_path)
    assert len(r["train"]) == 4 and {row["images_per_s"] for row in r["train"]} == {50.0, 25.0}
    assert len(r["sample"]) == 8 and "batch 1024: 2x" in (tmp_path / "throughput.md").read_text()


def test_the_sampling_headline_uses_the_largest_batch_measured_for_both(tmp_path, fake_bench):
    tp.main(["--quick", "--out", str(tmp_path), "--part", "sample", "--sample-batches", "128", "--nfes", "10"])
    r = _json(tmp_path)
    r["sample"] = [row for row in r["sample"] if not (row["batch"] == 128 and row["model"] == "diffusers")]
    r["sample"].append({"model": "ours", "mode": "compiled", "nfe": 10, "batch": 1024, "images_per_s": 7.0})
    assert tp.headlines(r)["sampling_speedup_nfe10"] is None  # no batch has both nets at NFE 10
    r["sample"].append({"model": "diffusers", "mode": "compiled", "nfe": 10, "batch": 1024, "images_per_s": 2.0})
    assert tp.headlines(r) == {"train_speedup_vs_diffusers_compiled_bs512": None,
                              "sampling_speedup_nfe10": 3.5, "sampling_speedup_nfe10_batch": 1024}


def test_results_measured_another_way_or_fresh_start_a_new_file(tmp_path, fake_bench, capsys):
    quick = ["--quick", "--out", str(tmp_path), "--part", "train"]
    tp.main(quick)
    tp.main([*quick, "--compile-mode", "max-autotune"])  # another compile mode: rows are not comparable
    assert "starting a new file" in capsys.readouterr().err
    r = _json(tmp_path)
    assert len(r["commands"]) == 1 and r["settings"]["compile_mode"] == "max-autotune"
    tp.main([*quick, "--compile-mode", "max-autotune", "--fresh"])
    assert len(_json(tmp_path)["commands"]) == 1
    (tmp_path / "throughput.json").write_text("{not json")
    tp.main(quick)
    assert len(_json(tmp_path)["train"]) == 4


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, fake_bench):
    fake_bench["fail_after"] = 6  # four training rows, a train.loop row and one sampling row, then the run dies
    with pytest.raises(RuntimeError, match="out of time"):
        tp.main(["--quick", "--out", str(tmp_path)])
    r = _json(tmp_path)
    assert len(r["train"]) == 5 and len(r["sample"]) == 1
    assert "| ours | eager | 1 | 4 |" in (tmp_path / "throughput.md").read_text()


@pytest.mark.parametrize("bad", [["--batches", "x"], ["--nfes", "0"], ["--part", "both"]])
def test_bad_arguments_are_clear_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        tp.main(["--quick", *bad])
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_the_full_benchmark_refuses_a_cpu():
    with pytest.raises(SystemExit, match="needs a GPU"):
        tp.main(["--device", "cpu"])


@pytest.mark.parametrize("name", ["ours", "diffusers"])
def test_a_training_step_reads_nothing_back(name, host_reads):
    """The benchmark's step (forward, backward, fused AdamW) leaves the host free to queue the next one.
    diffusers' step counts too: its rows would otherwise pay for syncs ours avoids."""
    loss, opt = tp.train_setup(name, TINY, CPU, compile=False)
    x0, gen = torch.randn(2, 3, 16, 16), torch.Generator().manual_seed(0)
    tp.train_step(lambda: loss(x0, gen), opt, CPU)  # the optimizer's state is made on the first step
    with host_reads() as reads:
        tp.train_step(lambda: loss(x0, gen), opt, CPU)
    assert reads.calls == []


def test_fast_denoiser_compiles_guidance_and_label_closures():
    """generate.sample(fast=True) wraps what it binds: a ClassifierFree object or a closure over the labels."""
    torch.manual_seed(0)
    model = Precond(MLP(2, width=16, depth=1, num_classes=3), EDM(), "edm").eval()
    _perturb(model.parameters())
    cond = torch.tensor([0, 1, 2])
    x, sigma = torch.randn(3, 2), torch.tensor([0.5, 1.0, 2.0])
    plain = []
    for denoiser in (ClassifierFree(model, cond, torch.full_like(cond, 3), 2.0), lambda x, s: model(x, s, cond)):
        with torch.no_grad():
            plain.append(denoiser(x, sigma))
        torch.testing.assert_close(fast.FastDenoiser(denoiser, CPU)(x, sigma), plain[-1])
    assert not torch.allclose(*plain)  # guidance did something


@pytest.mark.parametrize("name", ["ours", "diffusers"])
def test_sampling_runs_the_nets_without_dropout(name, monkeypatch):
    """Two runs of a sampling loop from the same noise agree exactly: the nets sample in eval mode."""
    make = tp.ours_net if name == "ours" else tp.diffusers_net

    def perturbed(cfg):  # off the zero init, so dropout inside the net would reach the output
        net = make({**cfg, "dropout": 0.5})
        _perturb(net.parameters())
        return net
    monkeypatch.setattr(tp, f"{name}_net", perturbed)
    run = (tp.ours_sampler if name == "ours" else tp.diffusers_sampler)(TINY, CPU, False, 2)(2)
    first, second = run(), run()
    assert first.abs().max() > 0 and torch.equal(first, second)


def test_profile_splits_the_time_between_matmuls_and_the_rest():
    a = torch.randn(384, 384)
    heavy = tp.profile(lambda: a @ a @ a, CPU)
    light = tp.profile(lambda: (a * 2).relu_().add_(1), CPU)
    assert heavy["matmul_share"] > 0.5 and light["matmul_share"] == 0
    for p in (heavy, light):
        shares = [row["share"] for row in p["top"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
        assert math.isclose(sum(r["ms_per_call"] for r in p["top"]) / p["total_ms_per_call"], sum(shares),
                            rel_tol=1e-9)
    assert {"aten::mm", "aten::mul"} <= {r["op"] for r in heavy["top"] + light["top"]}


def test_profile_flag_reaches_every_row_and_the_report(tmp_path, fake_bench, monkeypatch):
    seen = []
    monkeypatch.setattr(tp, "bench_train", lambda name, compile, batch, s, device, flops, peaks: seen.append(
        s["profile"]) or {"model": name, "mode": "compiled" if compile else "eager", "batch": batch,
                          "images_per_s": 1.0, "profile": {"total_ms_per_call": 2.0, "matmul_share": 0.25,
                                                           "top": [{"op": "k", "ms_per_call": 2.0, "share": 1.0,
                                                                    "launches_per_call": 1.0}]}})
    tp.main(["--quick", "--profile", "--part", "train", "--out", str(tmp_path)])
    assert seen == [True] * 4
    md = (tmp_path / "throughput.md").read_text()
    assert md.count("### Profile: train") == 4 and "25.0% in GEMM/conv/attention kernels" in md


def test_loop_seconds_reads_the_step_time_from_the_loops_own_log():
    """samples_per_s in metrics.jsonl is batch x steps so far over the time since the start: 3 s of warm-up over
    2 steps, then 0.5 s per step."""
    elapsed = {2: 3.0, 4: 4.0, 6: 5.0}
    log = [{"step": k, "samples_per_s": 8 * k / t} for k, t in elapsed.items()]
    assert tp.loop_seconds(log, batch=8, warmup=2, steps=4) == pytest.approx((0.5, 3.0))


def test_the_loop_rows_train_through_diffkit_train_loop(tmp_path):
    assert tp.main(["--quick", "--part", "loop", "--out", str(tmp_path)]) == 0
    r = _json(tmp_path)
    (row,) = r["train"]
    assert (row["model"], row["mode"], row["batch"]) == ("ours", "train.loop", 4)
    assert row["images_per_s"] > 0 and math.isfinite(row["loss"])
    assert r["train_speedup_vs_diffusers_compiled_bs512"] is None  # loop rows have no peer: never in the ratio
    assert "| ours | train.loop | 4 |" in (tmp_path / "throughput.md").read_text()
