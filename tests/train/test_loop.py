import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit import data, paths
from diffkit.nets.mlp import MLP
from diffkit.objectives import Denoising
from diffkit.precond import Precond
from diffkit.train import checkpoint, optim
from diffkit.train.loop import Interrupted, NonFiniteLoss, TrainSettings, train

sys.path.insert(0, str(Path(__file__).parent))
from _run import job  # noqa: E402

SCRIPT = str(Path(__file__).parent / "_run.py")


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_sigkill_is_exact(tmp_path):
    ref_model, ref_ema = job(tmp_path / "ref", steps=30, micro=64)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(run), "30", "64", "0.05"])
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = checkpoint.latest(run)
        if ck is not None and checkpoint.load(ck).step >= 10:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped = checkpoint.load(checkpoint.latest(run)).step
    assert 10 <= stopped < 30, f"the kill came too late (step {stopped})"
    model, ema = job(run, steps=30, micro=64)  # resumes from the latest checkpoint
    for k, v in weights(ref_model).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in ref_ema.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], v, rtol=0, atol=1e-6)
    assert logged(run, "step") == list(range(5, 31, 5))  # no row twice


def logged(run, key):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_ctrl_c_saves_the_step_it_stopped_after_and_resumes_exactly(tmp_path):
    ref_model, ref_ema = job(tmp_path / "ref", steps=12, micro=64)
    run = tmp_path / "stopped"
    # Ctrl-C during step 7 (checkpoints every 5): the step finishes, is saved, and the loop stops.
    with pytest.raises(Interrupted, match="^interrupted at step 7: checkpoint saved; run the same command to resume$"):
        job(run, steps=12, micro=64, ctrl_c_at=7)
    assert checkpoint.load(checkpoint.latest(run)).step == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    model, ema = job(run, steps=12, micro=64)
    assert_same_weights(ref_model, model)
    assert_same_weights(ref_ema, ema)


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path):
    calls = []

    def pressed_twice_in_step_7(model, x0, cond=None, *, generator=None):
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return ((model(x0, torch.ones(len(x0))) - x0) ** 2).mean(1)

    settings = TrainSettings(steps=12, batch=8, warmup=1, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt) as err:
        train(tiny_model(), pressed_twice_in_step_7, torch.randn(32, 2), None, settings, tmp_path, progress=False)
    assert type(err.value) is KeyboardInterrupt
    assert checkpoint.load(checkpoint.latest(tmp_path)).step == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resuming_drops_the_log_rows_after_the_checkpoint(tmp_path):
    """A kill after step 15 was logged but before it was saved, mid-way through writing a row: the resumed run
    logs step 15 again, once, and the torn row goes."""
    job(tmp_path / "ref", steps=20, micro=64)
    run = tmp_path / "killed"
    with pytest.raises(Interrupted):
        job(run, steps=20, micro=64, ctrl_c_at=10)
    rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    with (run / "metrics.jsonl").open("a") as log:
        log.write(rows[2] + "\n" + rows[3][:20])
    job(run, steps=20, micro=64)
    assert logged(run, "step") == [5, 10, 15, 20]
    assert logged(run, "loss") == logged(tmp_path / "ref", "loss")


def test_a_checkpoint_damaged_in_place_is_skipped_and_resume_is_exact(tmp_path, damage):
    ref_model, _ = job(tmp_path / "ref", steps=15, micro=64)
    run = tmp_path / "damaged"
    job(run, steps=10, micro=64)
    newest = checkpoint.latest(run)
    damage(newest / "model.safetensors")
    with pytest.warns(UserWarning, match="step-000000010 is corrupt.*Using the newest good checkpoint, .*step-000000005"):
        model, _ = job(run, steps=15, micro=64)
    assert_same_weights(ref_model, model)
    assert checkpoint.load(newest).step == 10  # saved again, intact


def test_train_steps_below_the_checkpoint_is_an_error(tmp_path):
    job(tmp_path, steps=10, micro=64)
    with pytest.raises(ValueError, match="checkpoint at step 10, past train.steps=5: use train.steps >= 10"):
        job(tmp_path, steps=5, micro=64)


def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    SCRIPT, str(tmp_path / "ddp"), "12", "32", "0"], check=True, env=env, timeout=300)
    r0, r1 = (load_file(tmp_path / "ddp" / f"final-rank{r}.safetensors") for r in (0, 1))
    single, _ = job(tmp_path / "single", steps=12, micro=32)  # same global batch, 2 micro-batches accumulated
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), f"ranks drifted apart in {k}"
        torch.testing.assert_close(r0[k], v, rtol=0, atol=1e-6)


class Flaky:
    """An objective that returns NaN on chosen steps (counted by calls)."""

    def __init__(self, bad):
        self.calls, self.bad = 0, bad

    def __call__(self, model, x0, cond=None, *, generator=None):
        self.calls += 1
        out = model(x0, torch.ones(len(x0)))
        loss = ((out - x0) ** 2).mean(1)
        return loss * float("nan") if self.bad(self.calls) else loss


def tiny_model():
    torch.manual_seed(0)
    return Precond(MLP(2, width=16, depth=1), paths.EDM(), "edm")


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    settings = TrainSettings(steps=12, batch=8, warmup=1, log_every=12, checkpoint_every=12)
    train(tiny_model(), Flaky(lambda c: c % 3 == 0), torch.randn(32, 2), None, settings, tmp_path, progress=False)
    ck = checkpoint.load(checkpoint.latest(tmp_path))
    assert ck.step == 12 and ck.extra["skipped_steps"] == 4


class NaNGradient(Flaky):
    """An objective whose loss stays finite but whose gradient is NaN on chosen steps: sqrt's slope at 0."""

    def __call__(self, model, x0, cond=None, *, generator=None):
        self.calls += 1
        out = model(x0, torch.ones(len(x0)))
        loss = ((out - x0) ** 2).mean(1)
        return loss + torch.sqrt(0 * out.sum()) if self.bad(self.calls) else loss


def test_finite_loss_with_nonfinite_gradient_is_skipped(tmp_path):
    settings = TrainSettings(steps=12, batch=8, warmup=1, log_every=12, checkpoint_every=12)
    model = tiny_model()
    train(model, NaNGradient(lambda c: c % 3 == 0), torch.randn(32, 2), None, settings, tmp_path, progress=False)
    assert checkpoint.load(checkpoint.latest(tmp_path)).extra["skipped_steps"] == 4
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_too_many_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path):
    settings = TrainSettings(steps=20, batch=8, warmup=1, checkpoint_every=5, max_nonfinite=3)
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row.*step-000000005"):
        train(tiny_model(), Flaky(lambda c: c > 6), torch.randn(32, 2), None, settings, tmp_path, progress=False)
    assert checkpoint.load(checkpoint.latest(tmp_path)).step == 5


def test_muon_option_trains(tmp_path):
    model, _ = job(tmp_path, steps=20, micro=64, optimizer="muon")
    ck = checkpoint.load(checkpoint.latest(tmp_path))
    assert len(ck.optimizers) == 2  # Muon for hidden matrices, AdamW for the rest
    opts = optim.build(model, "muon")
    muon_ids = {id(p) for g in opts[1].param_groups for p in g["params"]}
    assert id(model.net.blocks[0].ff[0].weight) in muon_ids and id(model.net.inp.weight) not in muon_ids


def test_lr_schedule():
    assert optim.lr_factor(0, warmup=10, total=100) == 0.1
    assert optim.lr_factor(9, warmup=10, total=100) == 1.0
    assert abs(optim.lr_factor(55, warmup=10, total=100) - 0.5) < 1e-12
    assert optim.lr_factor(100, warmup=10, total=100) == 0.0


def test_bad_batch_split(tmp_path):
    with pytest.raises(ValueError, match="multiple of world size"):
        train(tiny_model(), Flaky(lambda c: False), torch.randn(32, 2), None, TrainSettings(batch=10, micro_batch=4), tmp_path)


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 1, 2, 3]), r"in \[0, 3\) for a net built with num_classes=3; got labels in \[0, 3\]"),
    (torch.tensor([-1, 0, 1, 2]), r"in \[0, 3\) .* got labels in \[-1, 2\]"),
    (torch.tensor([0.0, 1.0, 2.0, 2.0]), r"\(4,\) integer tensor"),
    (torch.tensor([[0], [1], [2], [2]]), r"\(4,\) integer tensor"),
    (torch.tensor([0, 1, 2]), r"\(4,\) integer tensor, one class per sample"),
])
def test_labels_are_checked_once_before_training(tmp_path, labels, message):
    model = Precond(MLP(2, width=16, depth=1, num_classes=3), paths.EDM(), "edm")
    with pytest.raises(ValueError, match=message):
        train(model, Denoising(paths.EDM()), torch.randn(4, 2), labels, TrainSettings(batch=4), tmp_path, progress=False)
    assert not tmp_path.joinpath("metrics.jsonl").exists()  # refused before the first step


def test_labels_for_a_net_without_a_label_table_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="non-negative class indices; got a minimum of -2"):
        train(tiny_model(), Flaky(lambda c: False), torch.randn(4, 2), torch.tensor([0, -2, 1, 1]),
              TrainSettings(batch=4), tmp_path, progress=False)


def test_conditional_training_accepts_every_class(tmp_path):
    model = Precond(MLP(2, width=16, depth=1, num_classes=3), paths.EDM(), "edm")
    settings = TrainSettings(steps=2, batch=4, warmup=1, checkpoint_every=2, log_every=2)
    train(model, Denoising(paths.EDM()), torch.randn(4, 2), torch.tensor([0, 1, 2, 2]), settings, tmp_path, progress=False)
    assert checkpoint.load(checkpoint.latest(tmp_path)).step == 2


class Recording:
    """A plain regression objective that records the weights each training step starts from."""

    def __init__(self):
        self.seen = []

    def __call__(self, model, x0, cond=None, *, generator=None):
        self.seen.append([p.detach().clone() for p in model.parameters()])
        return ((model(x0, torch.ones(len(x0))) - x0) ** 2).mean(1)


def test_loop_ema_takes_the_ramped_decay_of_each_step(tmp_path):
    # EMA_n = beta_n EMA_{n-1} + (1 - beta_n) w_n, beta_n = 0.5 ** (1 / min(H, r n)): with r = 0.5 the early
    # decays are 0.25, 0.5, ...; a loop that ignored the ramp-up (0.999) or counted from 0 would differ.
    settings = TrainSettings(steps=6, batch=8, warmup=1, lr=1e-2, ema_decay=0.999, ema_rampup=0.5, log_every=6,
                             checkpoint_every=6)
    model, objective = tiny_model(), Recording()
    ema = train(model, objective, torch.randn(32, 2), None, settings, tmp_path, progress=False)
    after_each_step = objective.seen[1:] + [[p.detach() for p in model.parameters()]]
    want, half_life = objective.seen[0], math.log(0.5) / math.log(0.999)
    for n, weights in enumerate(after_each_step, 1):
        beta = 0.5 ** (1 / min(half_life, 0.5 * n))
        want = [beta * a + (1 - beta) * w for a, w in zip(want, weights)]
    for got, expected in zip(ema.model.parameters(), want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (want[0] - objective.seen[0][0]).abs().max() > 1e-3  # the weights moved, so the check has teeth


class _TwoPhases:
    """A stand-in for an alternating objective (SiD): the same loss, taken twice per step in two phases."""
    phases = ("first", "second")

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, model, x0, cond, *, generator, phase):
        return self.objective(model, x0, cond, generator=generator)


@pytest.mark.parametrize("two_phases", [False, True])
def test_a_step_reads_back_one_flag_per_phase(tmp_path, host_reads, two_phases):
    """A step's only read from the device is the finite-step flag of each phase (on CUDA: one sync per phase);
    the data order is drawn on the host (its reads are of host tensors). Counted as 8 steps' reads minus 4's."""
    def reads(steps):
        model, objective = tiny_model(), Denoising(paths.EDM())
        objective = _TwoPhases(objective) if two_phases else objective
        x = data.toy("checkerboard", 256, torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=steps, batch=32, micro_batch=16, warmup=2, checkpoint_every=100, log_every=100)
        with host_reads() as r:
            train(model, objective, x, None, settings, tmp_path / str(steps), progress=False)
        return Counter(r.calls)

    per_4_steps = reads(8) - reads(4)
    on_host = {("tolist", "_batch_indices"): 4, ("__getitem__", "_batch_indices"): 4}
    assert per_4_steps == Counter({("__bool__", "train"): 4 * (2 if two_phases else 1), **on_host})


def test_compile_off_cuda_says_it_runs_eagerly(tmp_path):
    model = tiny_model()
    x = data.toy("checkerboard", 64, torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=2, batch=32, warmup=1, compile=True)
    with pytest.warns(UserWarning, match="train.compile is for CUDA"):
        train(model, Denoising(paths.EDM()), x, None, settings, tmp_path, progress=False)
    assert not isinstance(model.net, torch._dynamo.eval_frame.OptimizedModule)
