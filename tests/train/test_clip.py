"""Global-norm clipping (train.clip): the fixed and the running-quantile threshold, and the per-step log."""
import json
from collections import Counter

import pytest
import torch
from torch import nn

from diffkit import config as configs
from diffkit import data, paths
from diffkit.nets.mlp import MLP
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train import clip
from diffkit.train.loop import TrainSettings, train


def _step(clipper, p, grad):
    p.grad = grad.clone()
    return clipper([p])


def test_fixed_clip_scales_to_the_threshold_and_returns_the_norm_before():
    p, clipper = nn.Parameter(torch.zeros(2)), clip.Clipper(1.0, torch.device("cpu"))
    assert _step(clipper, p, torch.tensor([3.0, 4.0])).item() == pytest.approx(5.0)
    assert p.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert _step(clipper, p, torch.tensor([0.3, 0.4])).item() == pytest.approx(0.5)
    assert p.grad.tolist() == pytest.approx([0.3, 0.4])
    log = clipper.drain()
    assert log["grad_norms"] == pytest.approx([5.0, 0.5]) and log["clipped_fraction"] == 0.5
    assert clipper.norms == []


def test_auto_clips_to_the_running_quantile_of_the_last_window():
    p, clipper = nn.Parameter(torch.zeros(1)), clip.Clipper("auto", torch.device("cpu"))
    norms = torch.arange(1.0, clip.AUTO_WINDOW + 31)  # 1, 2, ..., W + 30
    for i, n in enumerate(norms):
        _step(clipper, p, n.reshape(1))
        if i < clip.AUTO_MIN_SEEN:
            assert p.grad.item() == n.item()  # nothing seen yet: no clipping
    window = norms[-clip.AUTO_WINDOW - 1:-1]  # the W norms before the last step
    assert p.grad.item() == pytest.approx(torch.quantile(window, clip.AUTO_QUANTILE).item(), rel=1e-5)
    assert clipper.drain()["clipped_fraction"] > 0.05


@pytest.mark.parametrize("value", ["often", 0, -1])
def test_bad_clip_values_say_what_is_allowed(value):
    with pytest.raises(ValueError, match="train.grad_clip must be"):
        configs.load(None, [f"train.grad_clip={value}"])
    assert configs.load(None, ["train.grad_clip=auto"]).train.grad_clip == "auto"
    assert configs.load(None, ["train.grad_clip='3e-1'"]).train.grad_clip == 0.3


def test_every_steps_norm_is_logged_and_auto_resumes_exactly(tmp_path):
    def run(steps, folder):
        torch.manual_seed(0)
        model = Precond(MLP(2, width=16, depth=1), paths.EDM(), "edm")
        x = data.toy("checkerboard", 256, torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=steps, batch=32, warmup=2, cosine=False, grad_clip="auto", log_every=4,
                                 checkpoint_every=4)
        train(model, Denoising(paths.EDM()), x, None, settings, folder, progress=False)
        return model

    whole = run(24, tmp_path / "whole")
    run(12, tmp_path / "split")
    resumed = run(24, tmp_path / "split")
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["grad_norms"]) for r in rows] == [4] * 6
    assert rows[-1]["grad_norms"][-1] == pytest.approx(rows[-1]["grad_norm"])
    assert rows[0]["clip_threshold"] == float("inf") and rows[-1]["clip_threshold"] < float("inf")


def test_auto_clipping_and_the_norm_log_read_nothing_back_per_step(tmp_path, host_reads):
    """Counted as 8 steps' reads minus 4's (both log once, at the end): auto clipping adds no read per step."""
    def reads(steps, setting):
        torch.manual_seed(0)
        model = Precond(MLP(2, width=16, depth=1), paths.EDM(), "edm")
        x = data.toy("checkerboard", 256, torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=steps, batch=32, warmup=2, grad_clip=setting, checkpoint_every=100,
                                 log_every=100)
        with host_reads() as r:
            train(model, Denoising(paths.EDM()), x, None, settings, tmp_path / f"{setting}-{steps}", progress=False)
        return Counter(r.calls)

    per_4 = {s: reads(8, s) - reads(4, s) for s in (1.0, "auto")}
    assert per_4[1.0] == per_4["auto"] and per_4["auto"][("__bool__", "train")] == 4
