import json
import os
import signal
import subprocess
import sys

import pytest

from diffkit import cli, demo, run
from diffkit.train import checkpoint, loop


def test_demo_fast_writes_every_promised_file(tmp_path):
    assert cli.main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = {p.name for p in run.iterdir()}
    assert {"samples.png", "loss_curve.png", "metrics.json", "report.md", "config.yaml", "checkpoints"} <= names
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(r["sampler"], r["grid"], r["nfe"]) for r in metrics["samples"]] == [
        (s, g, n) for s, g, n in demo.ROWS]
    assert 0 < metrics["real_data_floor"]["digits_fd"] < 2
    assert "| dpmpp_2m | calibrated | 5 |" in (run / "report.md").read_text()
    assert "A smoke run" in (run / "report.md").read_text()
    assert {p.name for p in (run / "grids").iterdir()} == {"dpmpp_2m-5steps.json", "dpmpp_2m-10steps.json"}


def test_bench_unknown_name_is_an_error():
    with pytest.raises(SystemExit, match="unknown benchmark 'sampler'"):
        cli.main(["bench", "sampler"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="config file .* not found"):
        cli.main(["train", str(tmp_path / "nope.yaml")])


def test_train_with_only_overrides_uses_the_default_config(tmp_path):
    out = tmp_path / "run"
    args = ["train", "train.steps=2", "train.checkpoint_every=2", "model.args={width: 16, depth: 1}", "--out", str(out)]
    assert cli.main(args) == 0
    saved = (out / "config.yaml").read_text()
    assert "steps: 2" in saved and "width: 16" in saved and "name: digits" in saved


def test_ctrl_c_during_training_saves_the_step_and_exits_130(tmp_path, monkeypatch, capsys):
    def train_with_ctrl_c_in_step_3(model, objective, *args, **kwargs):
        calls = []

        def pressing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)
            return objective(*a, **k)
        return loop.train(model, pressing, *args, **kwargs)

    monkeypatch.setattr(run, "train", train_with_ctrl_c_in_step_3)
    out = tmp_path / "run"
    args = ["train", "train.steps=6", "train.checkpoint_every=100", "model.args={width: 16, depth: 1}", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == \
        "diffkit train: interrupted at step 3: checkpoint saved; run the same command to resume"
    assert checkpoint.load(checkpoint.latest(out)).step == 3
    monkeypatch.undo()
    assert cli.main(args) == 0 and checkpoint.load(checkpoint.latest(out)).step == 6


def test_ctrl_c_elsewhere_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run, "sample_run", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["sample", str(tmp_path)])
    assert stop.value.code == 130 and capsys.readouterr().err == "diffkit sample: interrupted\n"


def test_progress_bars_update_rarely_when_stderr_is_a_file(tmp_path):
    """A fresh `diffkit` process logging to a file: its progress bars (tqdm reads its environment when it is first
    imported) update every 30 s."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    code = "import diffkit.cli, tqdm; print(tqdm.tqdm(total=1).mininterval)"
    with open(tmp_path / "log", "w") as log:  # not a terminal
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                             check=True).stdout
    assert float(out) == 30
