"""The one-step jobs end to end on tiny checkerboard runs: shortcut training and sampling, `diffkit reflow`,
`diffkit distill` (SiD / FGM), and the config errors around them.

Each test checks what a job must have done (the sampler it dispatched to, the weights it started from, the
couples it drew, what it resumed), not only that it ran.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffkit import cli, generate, run
from diffkit import config as configs
from diffkit.onestep import reflow, shortcut
from diffkit.samplers.noise import GaussianNoise
from diffkit.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.n=512", "model.args={width: 32, depth: 2}", "train.batch=64", "train.warmup=2", "train.log_every=10",
        "train.checkpoint_every=1000"]
LEVELS = 3  # the shortcut run's K: steps 1, 2, 4, 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A flow-matching (rectified flow, velocity) run: the teacher of reflow and distill."""
    folder = tmp_path_factory.mktemp("onestep") / "fm"
    assert cli.main(["train", str(ROOT / "configs" / "checkerboard-fm.yaml"), *TINY, "train.steps=60",
                     "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onestep") / "shortcut"
    assert cli.main(["train", str(ROOT / "configs" / "checkerboard-shortcut.yaml"), *TINY, "train.steps=30",
                     f"objective.args={{levels: {LEVELS}, bootstrap_fraction: 0.25}}", "--out", str(folder)]) == 0
    return folder


def latest(folder: Path) -> checkpoint.Checkpoint:
    return checkpoint.load(checkpoint.latest(folder))


def saved_config(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())["config"]


def noise(seed: int, n: int, shape) -> torch.Tensor:
    """The per-sample seeded noise every diffkit sampler and the couples start from."""
    return GaussianNoise(seed, indices=range(n)).sample(tuple(shape))


# --- shortcut models ------------------------------------------------------------------------------------------

def test_shortcut_run_records_its_method_and_builds_a_d_conditioned_net(shortcut_run):
    cfg, model, shape, _ = run.load_run(shortcut_run)
    assert saved_config(shortcut_run)["objective"]["name"] == "shortcut"
    assert cfg.objective.name == "shortcut" and cfg.objective.args["levels"] == LEVELS
    assert model.net.cond.extra_scalars == 1 and shape == (2,)
    assert "shortcut, 1 NFE" in (shortcut_run / "report.md").read_text()  # sample.steps: 1 of the config


def test_shortcut_sample_cli_is_the_shortcut_sampler(shortcut_run, tmp_path):
    assert cli.main(["sample", str(shortcut_run), "--steps", "4", "--n", "12", "--seed", "5",
                     "--out", str(tmp_path / "s")]) == 0
    assert "shortcut, 4 NFE, seed 5" in (tmp_path / "s" / "report.md").read_text()
    got = load_file(tmp_path / "s" / "samples.safetensors")["samples"]
    _, model, shape, _ = run.load_run(shortcut_run)
    z = noise(5, 12, shape)
    want = shortcut.shortcut_sample(model, z, 4, levels=LEVELS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The run's levels reach the sampler: with the default K = 7 the step size is encoded differently.
    assert (shortcut.shortcut_sample(model, z, 4) - got).abs().max() > 1e-3
    # Sample i depends only on (seed, i): a different batch split gives the same samples.
    cfg = run.load_run(shortcut_run)[0]
    again, nfe = generate.sample(model, cfg, shape, 12, steps=4, seed=5, batch=5, progress=False)
    assert nfe == 4
    torch.testing.assert_close(again, got, rtol=0, atol=1e-5)


def test_shortcut_eval_counts_its_steps(shortcut_run, capsys):
    assert cli.main(["eval", str(shortcut_run), "--steps", "2", "--n", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["sampler"], result["nfe"]) == ("shortcut", 2)
    assert json.loads((shortcut_run / "eval-shortcut-2nfe-n200-seed0.json").read_text())["nfe"] == 2


def test_shortcut_clear_errors(shortcut_run, tmp_path):
    with pytest.raises(SystemExit, match=r"power of two .*\(1, 2, 4, 8\), got 3"):
        cli.main(["sample", str(shortcut_run), "--steps", "3", "--n", "2"])
    with pytest.raises(SystemExit, match=r"power of two .*\(1, 2, 4, 8\), got 16"):  # K = 3 stops at 8
        cli.main(["sample", str(shortcut_run), "--steps", "16", "--n", "2"])
    with pytest.raises(SystemExit, match="own sampler.*not 'heun'"):
        cli.main(["sample", str(shortcut_run), "--sampler", "heun", "--n", "2"])
    with pytest.raises(SystemExit, match="distill needs a denoising teacher.*shortcut run"):
        cli.main(["distill", str(shortcut_run), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="reflow needs a rectified-flow teacher.*shortcut run"):
        cli.main(["reflow", str(shortcut_run), "--out", str(tmp_path / "r"), "--n", "8"])
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


# --- reflow ---------------------------------------------------------------------------------------------------

def test_reflow_couples_init_grid_and_resume(teacher, tmp_path):
    out = tmp_path / "rf"
    argv = ["reflow", str(teacher), "--out", str(out), "--n", "40", "--sampler", "euler", "--steps", "4",
            "--seed", "7", "--distill", "1", "train.steps=3", "train.lr=0"]
    assert cli.main(argv) == 0
    tcfg, tmodel, shape, _ = run.load_run(teacher)

    # The couples: couple i is (z_i, the teacher's 4-step Euler sample from z_i on the default karras grid),
    # z_i seeded by (seed, i).
    z, x1, labels = reflow.load_couples(out / "couples")
    assert labels is None
    torch.testing.assert_close(z, noise(7, 40, shape), rtol=0, atol=0)
    karras = configs.derive(tcfg, ["sample.grid=karras"])
    want, nfe = generate.sample(tmodel, karras, shape, 40, sampler="euler", steps=4, seed=7, progress=False)
    assert nfe == 4
    torch.testing.assert_close(x1, want, rtol=0, atol=1e-5)

    # The new run: a reflow run on those couples, started from the teacher's EMA weights (lr = 0 keeps them).
    cfg = run.load_run(out)[0]
    assert cfg.objective.name == "reflow" and cfg.objective.args == {"distill": 1}
    assert (cfg.model.init, cfg.data.couples) == (str(teacher), str(out / "couples"))
    assert (cfg.sample.sampler, cfg.sample.grid, cfg.sample.steps) == ("euler", "distill", 1)
    ck, teacher_ema = latest(out), run.ema_weights(teacher)
    assert ck.step == 3 and ck.ema.keys() == teacher_ema.keys()
    for key, value in teacher_ema.items():
        torch.testing.assert_close(ck.ema[key], value, rtol=0, atol=0, msg=key)

    # Its grid is the distilled model's own: one Euler step from the path's start, 1 NFE.
    sigmas = generate.grid(cfg)
    torch.testing.assert_close(sigmas, reflow.distill_grid(1, path=configs.path(cfg)))
    assert len(sigmas) == 2 and sigmas[-1] == 0
    result = run.eval_run(out, sampler=None, steps=1, n=100, seed=0, progress=False)
    assert (result["sampler"], result["nfe"]) == ("euler", 1) and (out / "eval-euler-distill-1nfe-n100-seed0.json").exists()

    # Straightness before and after, on the same seeded noise: lr = 0 left the teacher's weights, so they agree.
    got = json.loads((out / "straightness.json").read_text())
    z = torch.randn((reflow.STRAIGHTNESS_N, *shape), generator=torch.Generator().manual_seed(0))
    want = reflow.straightness(tmodel, z, reflow.STRAIGHTNESS_STEPS).mean().item()
    assert got["straightness_before"] == pytest.approx(want, rel=1e-6) and want > 1e-3
    assert got["straightness_after"] == pytest.approx(want, rel=1e-6)
    assert "Straightness of the trajectories" in (out / "report.md").read_text()

    # Rerunning the command resumes: the shards are checked, not redrawn, and no step is trained again.
    def shards():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "couples").glob("couples-*.safetensors")}
    before = shards()
    log = (out / "metrics.jsonl").read_text()
    assert cli.main(argv) == 0
    assert shards() == before and len(before) == 1
    assert latest(out).step == 3 and (out / "metrics.jsonl").read_text() == log
    # ... and other couple settings in the same folder are refused rather than mixed in.
    with pytest.raises(SystemExit, match="other settings"):
        cli.main([*argv[:5], "41", *argv[6:]])


def test_reflow_distill_learns_a_one_step_map_of_its_couples(teacher, tmp_path):
    # Calibration: the teacher's own 1-step sample is 0.0035 (squared distance) from its 4-step one, the
    # reflowed model's 0.0008 after 100 steps; pairing the couples wrongly (other noise) would give ~5.
    out = tmp_path / "rf1"
    assert cli.main(["reflow", str(teacher), "--out", str(out), "--n", "256", "--sampler", "euler", "--steps", "4",
                     "--seed", "7", "--distill", "1", "train.steps=100", "train.lr=3e-3"]) == 0
    z, x1, _ = reflow.load_couples(out / "couples")
    cfg, model, shape, _ = run.load_run(out)
    _, tmodel, _, _ = run.load_run(teacher)
    one_step, nfe = generate.sample(model, cfg, shape, 256, seed=7, progress=False)  # the couples' noise
    before, _ = generate.sample(tmodel, cfg, shape, 256, seed=7, progress=False)
    dist = lambda a: ((a - x1) ** 2).sum(1).mean().item()  # noqa: E731
    assert nfe == 1
    assert dist(one_step) < 0.5 * dist(before) < 0.01
    # straightness.json's "after" is the trained model's own (it moved away from the teacher's "before").
    got = json.loads((out / "straightness.json").read_text())
    zs = torch.randn((reflow.STRAIGHTNESS_N, *shape), generator=torch.Generator().manual_seed(0))
    after = reflow.straightness(model, zs, reflow.STRAIGHTNESS_STEPS).mean().item()
    assert got["straightness_after"] == pytest.approx(after, rel=1e-6)
    assert got["straightness_after"] != pytest.approx(got["straightness_before"], rel=1e-2)


# --- distillation (SiD / FGM) ---------------------------------------------------------------------------------

def test_distill_starts_generator_and_fake_from_the_teacher(teacher, tmp_path):
    out = tmp_path / "fgm"
    argv = ["distill", str(teacher), "--method", "fgm", "--out", str(out), "train.steps=2", "train.lr=0"]
    assert cli.main(argv) == 0
    cfg, model, _, _ = run.load_run(out)
    assert cfg.objective.name == "sid" and cfg.objective.args == {"alpha": 0.5}
    assert cfg.model.init == str(teacher) and cfg.sample.steps == 1
    assert (cfg.train.adam_beta1, cfg.train.grad_clip, cfg.train.cosine) == (0.0, float("inf"), False)
    assert cfg.train.ema_rampup == 0.05  # the EMA generator must forget its teacher initialisation
    objective = configs.objective(cfg, 0, teacher=run.load_run(teacher)[1])
    assert objective.alpha == 0.5 and objective.sigma_init == 2.5

    ck, teacher_ema = latest(out), run.ema_weights(teacher)
    for weights in (ck.model, ck.ema):  # both networks are in the checkpoint, live and EMA
        assert set(weights) == {f"net.{role}.{k}" for role in ("generator", "fake") for k in teacher_ema}
        for key, value in teacher_ema.items():
            for role in ("generator", "fake"):
                torch.testing.assert_close(weights[f"net.{role}.{key}"], value, rtol=0, atol=0)
    # The teacher's folder is read, never written.
    assert latest(teacher).step == 60
    # Rerunning resumes (the saved config, grad_clip = inf included, reads back as the same config).
    assert cli.main(argv) == 0 and latest(out).step == 2


def test_distill_sample_is_one_call_of_the_ema_generator(teacher, tmp_path):
    out = tmp_path / "sid"
    assert cli.main(["distill", str(teacher), "--out", str(out), "train.steps=4", "train.lr=1e-3",
                     "train.ema_decay=0.5"]) == 0
    cfg, model, shape, _ = run.load_run(out)
    assert cfg.objective.args == {}  # SiD's own alpha = 1.2
    assert configs.objective(cfg, 0, teacher=run.load_run(teacher)[1]).alpha == 1.2
    assert cli.main(["sample", str(out), "--n", "10", "--seed", "3", "--out", str(tmp_path / "s")]) == 0
    assert "sid, 1 NFE, seed 3" in (tmp_path / "s" / "report.md").read_text()
    got = load_file(tmp_path / "s" / "samples.safetensors")["samples"]
    z = noise(3, 10, shape)
    sigma = torch.full((10,), 2.5)
    with torch.no_grad():
        torch.testing.assert_close(got, model.generator(2.5 * z, sigma), rtol=0, atol=1e-5)
        # Training moved the generator off the fake and the teacher, so the check above tells them apart.
        assert (model.fake(2.5 * z, sigma) - got).abs().max() > 1e-3
        assert (run.load_run(teacher)[1](2.5 * z, sigma) - got).abs().max() > 1e-3
    result = run.eval_run(out, sampler=None, steps=2, n=100, seed=0, progress=False)
    assert (result["sampler"], result["nfe"]) == ("sid", 2)
    with pytest.raises(SystemExit, match="own sampler"):
        cli.main(["sample", str(out), "--sampler", "euler", "--n", "2"])
    with pytest.raises(SystemExit, match="trained without labels"):  # an unconditional teacher
        cli.main(["sample", str(out), "--guidance", "2", "--n", "2"])


def test_distill_clear_errors(teacher, tmp_path):
    with pytest.raises(SystemExit, match="unknown distillation method 'xyz'; choose one of sid, fgm"):
        cli.main(["distill", str(teacher), "--method", "xyz", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="has no checkpoints"):
        cli.main(["distill", str(tmp_path), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="unknown key 'alpah' in objective.args of sid; did you mean 'alpha'"):
        cli.main(["distill", str(teacher), "--out", str(tmp_path / "d"), "objective.args.alpah=1", "train.steps=1"])
    assert not (tmp_path / "d").exists()


def test_teacher_folders_that_read_as_yaml_values(teacher, tmp_path, monkeypatch):
    # Folder names go into the derived config as override values, which are parsed as YAML.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(teacher, tmp_path / "1")
    assert cli.main(["distill", "1", "--out", "on", "train.steps=1", "train.lr=0"]) == 0
    assert run.load_run(Path("on"))[0].model.init == "1"
    assert cli.main(["reflow", "1", "--out", "r #2", "--n", "8", "--steps", "2", "train.steps=1"]) == 0
    cfg = run.load_run(Path("r #2"))[0]
    assert (cfg.model.init, cfg.data.couples) == ("1", str(Path("r #2") / "couples"))


# --- config errors --------------------------------------------------------------------------------------------

def test_config_errors_of_the_one_step_methods():
    sc = ROOT / "configs" / "checkerboard-shortcut.yaml"
    with pytest.raises(ValueError, match="objective.name=shortcut trains a flow: set model.path=rectified_flow"):
        configs.model(configs.load(sc, ["model.path=edm"]), (2,), 0)
    with pytest.raises(ValueError, match="objective.name=reflow trains a flow: set model.path=rectified_flow"):
        configs.model(configs.load(None, ["objective.name=reflow"]), (2,), 0)
    with pytest.raises(ValueError, match="unknown key 'levls' in objective.args of shortcut; did you mean 'levels'"):
        configs.objective(configs.load(sc, ["objective.args={levls: 3}"]), 0)
    with pytest.raises(ValueError, match="unknown key 'distil' in objective.args of reflow; did you mean 'distill'"):
        configs.objective(configs.load(None, ["objective.name=reflow", "objective.args={distil: 1}"]), 0)
    with pytest.raises(ValueError, match="unknown key 'shortcutt' in objective.name; did you mean 'shortcut'"):
        configs.objective(configs.load(sc, ["objective.name=shortcutt"]), 0)
    with pytest.raises(ValueError, match="objective.args configures a one-step method"):
        configs.objective(configs.load(None, ["objective.args={levels: 3}"]), 0)
    with pytest.raises(ValueError, match="objective.name=sid distils a teacher: set model.init"):
        configs.objective(configs.load(None, ["objective.name=sid"]), 0)
    # A shortcut model's sample.steps is checked before training, not when training ends and samples it.
    with pytest.raises(ValueError, match=r"sample.steps=18: .*power of two steps \(1, 2, 4, 8 "):
        configs.objective(configs.load(sc, ["objective.args={levels: 3}", "sample.steps=18"]), 0)
    configs.objective(configs.load(sc, ["objective.args={levels: 3}", "sample.steps=8"]), 0)


def test_a_config_error_leaves_no_run_behind(teacher, tmp_path):
    # The corrected command must work in the same folder (no stale config.yaml from the failed one).
    out = tmp_path / "sid"
    fm = str(ROOT / "configs" / "checkerboard-fm.yaml")
    with pytest.raises(SystemExit, match="set model.init"):
        cli.main(["train", fm, *TINY, "objective.name=sid", "train.steps=1", "--out", str(out)])
    assert not (out / "config.yaml").exists()
    assert cli.main(["train", fm, *TINY, "objective.name=sid", "train.steps=1", f"model.init={teacher}",
                     "--out", str(out)]) == 0
    assert latest(out).step == 1 and set(latest(out).ema) >= {f"net.generator.{k}" for k in run.ema_weights(teacher)}


def test_reflow_refuses_a_non_flow_teacher_before_drawing_couples(teacher, tmp_path):
    edm = tmp_path / "edm"
    run.train_run(configs.load(None, [*TINY, "data.name=checkerboard", "train.steps=2", "sample.steps=2"]), edm,
                  progress=False)
    with pytest.raises(SystemExit, match="reflow needs a rectified-flow teacher.*model.path=edm"):
        cli.main(["reflow", str(edm), "--out", str(tmp_path / "rf"), "--n", "8", "--steps", "2"])
    assert not (tmp_path / "rf").exists()
    with pytest.raises(SystemExit, match="unknown key 'stpes' in config.train; did you mean 'steps'"):
        cli.main(["reflow", str(teacher), "--out", str(tmp_path / "rf"), "--n", "8", "train.stpes=2"])
    assert not (tmp_path / "rf").exists()
