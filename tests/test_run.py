"""The train / sample / eval jobs end to end on a seconds-long checkerboard flow-matching run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit import cli, data, generate, run
from diffkit import config as configs
from diffkit.eval import metrics
from diffkit.train import checkpoint
from diffkit.train.fast import FastDenoiser

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.steps=400", "train.batch=256", "model.args={width: 128, depth: 3}", "train.checkpoint_every=400",
             "train.warmup=20", "train.log_every=100", "sample.steps=16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cb") / "run"
    cfg = configs.load(ROOT / "configs" / "checkerboard-fm.yaml", OVERRIDES)
    run.train_run(cfg, folder, progress=False)
    return cfg, folder


def sw(a, b):
    return metrics.sliced_wasserstein(a.float(), b.float(), generator=torch.Generator().manual_seed(0))


def test_short_training_beats_untrained_model(trained):
    # Calibration (2000 points, 256 projections): two real draws 0.10, this run ~0.24, untrained net ~1.33.
    cfg, folder = trained
    _, model, shape, _ = run.load_run(folder)
    held = data.toy("checkerboard", 2000, torch.Generator().manual_seed(1))
    x, nfe = generate.sample(model, cfg, shape, 2000, progress=False)
    torch.manual_seed(0)
    y, _ = generate.sample(configs.model(cfg, shape, 0), cfg, shape, 2000, progress=False)
    assert nfe == 16
    assert sw(x, held) < 0.4 < 1.0 < sw(y, held)


def test_run_folder_has_everything(trained):
    _, folder = trained
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "checkpoints", "metrics.jsonl", "loss_curve.png", "samples.png", "report.md"} <= names


def test_sample_cli_is_reproducible_across_batch_sizes(trained, tmp_path):
    cfg, folder = trained
    assert cli.main(["sample", str(folder), "--n", "10", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    a = load_file(tmp_path / "a" / "samples.safetensors")["samples"]
    _, model, shape, _ = run.load_run(folder)
    b, _ = generate.sample(model, cfg, shape, 10, seed=3, batch=4, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (tmp_path / "a" / "samples.png").exists()


def test_fast_sampling_gives_the_plain_samples(trained, tmp_path, monkeypatch):
    """--fast (compiled; bf16 and CUDA graphs only on CUDA) changes how the net runs, not what it computes; the
    denoiser is compiled once per batch size (4, 4, 2 here: two), not once per batch."""
    cfg, folder = trained
    made = []
    monkeypatch.setattr(generate, "FastDenoiser", lambda *a, **k: made.append(1) or FastDenoiser(*a, **k))
    torch._dynamo.reset()
    assert cli.main(["sample", str(folder), "--n", "10", "--fast", "--out", str(tmp_path / "fast")]) == 0
    _, model, shape, _ = run.load_run(folder)
    plain, _ = generate.sample(model, cfg, shape, 10, batch=4, progress=False)
    fast, _ = generate.sample(model, cfg, shape, 10, batch=4, fast=True, progress=False)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    from_cli = load_file(tmp_path / "fast" / "samples.safetensors")["samples"]
    torch.testing.assert_close(from_cli, plain, rtol=0, atol=1e-5)
    assert len(made) == 1 + 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_eval_cli_scores_against_held_out(trained, capsys):
    _, folder = trained
    assert cli.main(["eval", str(folder), "--n", "500", "--sampler", "heun", "--steps", "8"]) == 0
    assert '"sliced_wasserstein"' in capsys.readouterr().out
    saved = json.loads((folder / "eval-heun-uniform_t-15nfe-n500-seed0.json").read_text())
    # The floor is real data scored the same way: this short run is farther from the held-out points than it.
    assert 0 < saved["real_data_floor"]["sliced_wasserstein"] < saved["sliced_wasserstein"] and saved["notes"] == []
    small = run.eval_run(folder, sampler="euler", steps=4, n=100, seed=0, progress=False)
    assert small["notes"][0].startswith("only 100 samples")


def test_clear_errors(trained, tmp_path):
    cfg, folder = trained
    with pytest.raises(SystemExit, match="trained without labels"):
        cli.main(["sample", str(folder), "--label", "3", "--n", "2"])
    with pytest.raises(SystemExit, match=r"different config \(train.lr: 0.002 in the run, 0.1 now\); pass a new --out"):
        cli.main(["train", str(ROOT / "configs" / "checkerboard-fm.yaml"), *OVERRIDES, "train.lr=0.1", "--out", str(folder)])
    with pytest.raises(SystemExit, match="has no checkpoints"):
        cli.main(["sample", str(tmp_path)])
    with pytest.raises(SystemExit, match="run folder .*nope not found"):
        cli.main(["sample", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="unknown sampler"):
        cli.main(["sample", str(folder), "--sampler", "eulr", "--n", "2"])
    before = (folder / "report.md").read_text()
    with pytest.raises(SystemExit, match="is a run folder"):
        cli.main(["sample", str(folder), "--n", "2", "--out", str(folder)])
    assert (folder / "report.md").read_text() == before


def test_outputs_are_named_by_what_made_them(trained):
    _, folder = trained
    made = {run.sample_run(folder, sampler="euler", steps=4, n=n, seed=seed, progress=False).name
            for n, seed in ((8, 0), (8, 1), (9, 0))}
    assert made == {"samples-euler-uniform_t-4nfe-n8-seed0", "samples-euler-uniform_t-4nfe-n8-seed1",
                    "samples-euler-uniform_t-4nfe-n9-seed0"}


# --- resuming (run.py's module docstring states the rule) -----------------------------------------------------

TINY = ["data.n=512", "model.args={width: 32, depth: 2}", "train.batch=64", "train.warmup=5", "train.log_every=1",
        "train.checkpoint_every=10", "sample.steps=4"]


def tiny(folder, *overrides):
    run.train_run(configs.load(ROOT / "configs" / "checkerboard-fm.yaml", [*TINY, *overrides]), folder, progress=False)
    return folder


def test_resume_checks_the_checkpoints_config_and_names_what_differs(tmp_path):
    folder = tiny(tmp_path / "run", "train.steps=10")
    (folder / "config.yaml").unlink()  # the checkpoint's config still says what the run is
    with pytest.raises(ValueError, match="different config [(]model.path: rectified_flow in the run, vp_linear now; "
                                         "model.prediction: velocity in the run, eps now[)]; pass a new --out folder"):
        tiny(folder, "train.steps=20", "model.path=vp_linear", "model.prediction=eps")
    assert not (folder / "config.yaml").exists() and checkpoint.load(checkpoint.latest(folder)).step == 10


def test_extending_a_run_follows_the_schedule_of_the_new_total(tmp_path):
    def logged(folder):
        return {r["step"]: r["lr"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}

    extended = tiny(tmp_path / "extended", "train.steps=30")
    tiny(extended, "train.steps=60")
    fresh = tiny(tmp_path / "fresh", "train.steps=60")
    after = {s: lr for s, lr in logged(extended).items() if s > 30}
    assert list(after) == list(range(31, 61)) and after == {s: logged(fresh)[s] for s in after}
    assert ("Run length extended from 30 to 60 steps; the schedule is that of 60 steps from step 30 on."
            in (extended / "report.md").read_text())
    # Fewer steps than the checkpoint holds: refused, and the run's files stay as they were.
    saved = (extended / "config.yaml").read_text()
    with pytest.raises(ValueError, match="checkpoint at step 60, past train.steps=20: use train.steps >= 60 to "
                                         "resume it, or a new run folder"):
        tiny(extended, "train.steps=20")
    assert (extended / "config.yaml").read_text() == saved


def test_load_run_falls_back_from_a_damaged_checkpoint(tmp_path, damage):
    folder = tiny(tmp_path / "run", "train.steps=20")
    damage(folder / "checkpoints" / "step-000000020" / "ema.safetensors")
    with pytest.warns(UserWarning, match="step-000000020 is corrupt.*Using the newest good checkpoint, .*step-000000010"):
        _, model, _, _ = run.load_run(folder)
    good = checkpoint.load(folder / "checkpoints" / "step-000000010").ema
    assert all(torch.equal(v.cpu(), good[k]) for k, v in model.state_dict().items())
