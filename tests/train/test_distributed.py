"""FSDP2 (train.parallel=fsdp) with 2 gloo processes on CPU against one process: the same losses, gradient norms,
weights and EMA, checkpoints in the one format, and resuming across the two."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffkit.train import checkpoint
from diffkit.train.distributed import Parallel

sys.path.insert(0, str(Path(__file__).parent))
from _fsdp import muon_matrix  # noqa: E402
from _run import job  # noqa: E402

SCRIPT = str(Path(__file__).parent / "_fsdp.py")
# float32 sums in another order; Adam divides the near-zero gradients (the attention keys' bias has none in exact
# arithmetic) by their own size, which moves those weights by a few 1e-6. Training moves weights by ~1e-2.
TOL = dict(rtol=1e-5, atol=5e-6)


def torchrun(*args: str, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(port), SCRIPT, *map(str, args)], check=True, env=env, timeout=300)


def assert_ranks_match(state: dict, out: Path, prefix: str) -> None:
    r0, r1 = (load_file(out / f"{prefix}-rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(r0[k], r1[k]), f"ranks drifted apart in {k}"
        torch.testing.assert_close(r0[k], v, **TOL, msg=lambda m, k=k: f"{k}: {m}")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sharded run and the single-process run of the same job (12 steps, checkpoints at 5, 10, 12)."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun("train", root / "fsdp", port=29521)
    single, ema = job(root / "single", steps=12, micro=16, net="dit")
    return root, single, ema


def test_fsdp_two_processes_match_one(runs):
    root, single, ema = runs
    assert_ranks_match(single.state_dict(), root / "fsdp", "final")
    assert_ranks_match(ema.state_dict(), root / "fsdp", "ema")
    sharded, plain = rows(root / "fsdp"), rows(root / "single")
    assert [r["step"] for r in sharded] == [5, 10, 12]
    for a, b in zip(sharded, plain):
        # the global gradient norm over the shards is the single process's (so is the clip: grad_clip 1 bites)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert max(r["grad_norm_max"] for r in plain) > 1.0


def test_an_fsdp_checkpoint_is_the_single_process_checkpoint(runs):
    """Full (gathered) model, EMA and optimizer states: a checkpoint does not tell who wrote it."""
    root, _, _ = runs
    a, b = (checkpoint.load(root / run / "checkpoints" / "step-000000005") for run in ("fsdp", "single"))
    for mine, theirs in ((a.model, b.model), (a.ema, b.ema), *zip(a.optimizers[0]["state"].values(),
                                                                  b.optimizers[0]["state"].values())):
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert a.optimizers[0]["param_groups"] == b.optimizers[0]["param_groups"]


def test_an_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    root, single, _ = runs
    shutil.copytree(root / "fsdp" / "checkpoints" / "step-000000005", tmp_path / "checkpoints" / "step-000000005")
    resumed, _ = job(tmp_path, steps=12, micro=16, net="dit")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, **TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_fsdp_resumes_its_own_and_a_single_process_checkpoint(runs, tmp_path):
    root, single, _ = runs
    torchrun("resume", tmp_path, *(root / run / "checkpoints" / "step-000000005" for run in ("fsdp", "single")),
             port=29522)
    for i in (0, 1):
        assert_ranks_match(single.state_dict(), tmp_path / f"resumed{i}", "final")


@pytest.mark.slow
def test_muon_steps_a_sharded_matrix_as_a_whole(tmp_path):
    """torch's Muon on an FSDP shard orthogonalises the whole matrix: its step equals one process's up to the
    bf16 rounding of Newton-Schulz; orthogonalising each half on its own would be far off."""
    torchrun("muon", tmp_path, port=29523)
    w, g = muon_matrix()

    def step(weight, grad):
        p = nn.Parameter(weight.clone())
        p.grad = grad.clone()
        torch.optim.Muon([p], lr=0.02).step()
        return p.detach() - weight

    whole = step(w, g)
    halves = torch.cat([step(w[:24], g[:24]), step(w[24:], g[24:])])
    sharded = load_file(tmp_path / "muon.safetensors")["weight"] - w
    assert (sharded - whole).abs().max() < 0.1 * whole.abs().max()
    assert (halves - whole).abs().max() > 0.3 * whole.abs().max()


def test_fsdp_refuses_what_it_does_not_shard():
    with pytest.raises(ValueError, match="fsdp trains objectives of one phase.*use train.parallel=ddp"):
        Parallel("fsdp", phases=2, monitor=False)
    with pytest.raises(ValueError, match="monitor .*use train.parallel=ddp"):
        Parallel("fsdp", phases=1, monitor=True)
    with pytest.raises(ValueError, match="unknown train.parallel 'zero3'; choose one of: ddp, fsdp"):
        Parallel("zero3", phases=1, monitor=False)
