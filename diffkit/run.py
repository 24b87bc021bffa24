"""The jobs behind `diffkit train | sample | eval`: each reads or writes one run folder.

A run folder holds config.yaml (the resolved config plus the data's shape and class count),
checkpoints/, metrics.jsonl, loss_curve.png, samples.png and report.md. Training resumes when the folder
already has checkpoints made with the same config (only train.steps may grow).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from diffkit import config as configs
from diffkit import generate, report
from diffkit.config import Config
from diffkit.eval import metrics
from diffkit.onestep import reflow
from diffkit.train import checkpoint
from diffkit.train.loop import train


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_info(cfg: Config, x: torch.Tensor, n_classes: int) -> dict:
    return {"config": configs.to_dict(cfg), "shape": list(configs.sample_shape(cfg, x)), "num_classes": n_classes}


def _latest(run_dir: str | Path) -> checkpoint.Checkpoint:
    """A run's latest checkpoint; a folder without one is an error that says how to make it."""
    found = checkpoint.latest(Path(run_dir))
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints: train it first with `diffkit train`")
    return checkpoint.load(found)


def ema_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The EMA state dict of a run's latest checkpoint (what model.init and teachers load)."""
    return _latest(run_dir).ema


def _check_same_config(run_dir: Path, info: dict) -> None:
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return
    saved = yaml.safe_load(saved_file.read_text())
    for d in (saved, info):
        d["config"]["train"].pop("steps", None)
    if saved != info:
        raise ValueError(f"{run_dir} holds a run made with a different config; pass a new --out folder "
                         "(or the same config to resume; only train.steps may change)")


def train_run(cfg: Config, run_dir: Path, *, progress: bool = True) -> Path:
    """Train cfg in run_dir (resuming if it has checkpoints), then write samples, loss curve and report."""
    run_dir = Path(run_dir)
    x, y = configs.dataset(cfg, "train")
    n_classes = configs.num_classes(cfg, y)
    info = _run_info(cfg, x, n_classes)
    _check_same_config(run_dir, json.loads(json.dumps(info)))
    torch.manual_seed(cfg.train.seed)
    shape = configs.sample_shape(cfg, x)
    denoiser = configs.model(cfg, shape, n_classes)
    if cfg.model.init is not None:  # reflow fine-tunes the teacher; SiD copies it into generator and fake
        denoiser.load_state_dict(ema_weights(cfg.model.init))
    denoiser = denoiser.to(_device())
    model = configs.trainable(cfg, denoiser)
    objective = configs.objective(cfg, n_classes, teacher=denoiser if cfg.model.init is not None else None)
    # The folder is made only once the config has built: a config error must not leave a config.yaml behind
    # that makes the corrected command fail as "a run made with a different config".
    run_dir.mkdir(parents=True, exist_ok=True)
    report.atomic_write(run_dir / "config.yaml", yaml.safe_dump(info, sort_keys=False))
    ema = train(model, objective, x, y, cfg.train, run_dir, config=info, progress=progress)
    report.loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    samples, nfe = generate.sample(ema.model, cfg, shape, 64, n_classes=n_classes, progress=progress)
    name = generate.sampler_name(cfg, None)
    title = f"{name}, {nfe} NFE, EMA weights after {cfg.train.steps} steps"
    data = x[:64, 0] if cfg.data.couples is not None else x[:64]
    report.panels(run_dir / "samples.png", {"training data": data, "samples": samples}, title=title)
    facts = configs.describe(cfg)
    report.atomic_write(run_dir / "report.md", "\n".join([
        f"# Training run {run_dir.name}", "", report.table([facts], list(facts)), "",
        "![loss](loss_curve.png)", "", f"![samples](samples.png) ({title})", ""]))
    return run_dir


def load_run(run_dir: Path) -> tuple[Config, torch.nn.Module, tuple[int, ...], int]:
    """(config, EMA model on the best device, per-sample shape, class count) of a run's latest checkpoint.

    The model is what was trained: a Precond denoiser, or for SiD the generator and fake pair."""
    ck = _latest(run_dir)
    cfg = configs.from_dict(ck.config["config"])
    shape, n_classes = tuple(ck.config["shape"]), ck.config["num_classes"]
    model = configs.trainable(cfg, configs.model(cfg, shape, n_classes))
    model.load_state_dict(ck.ema)
    return cfg, model.to(_device()).eval(), shape, n_classes


def sample_run(run_dir: Path, *, sampler: str | None, steps: int | None, n: int, seed: int,
               guidance: float | None = None, label: int | None = None, out: Path | None = None,
               fast: bool = False, progress: bool = True) -> Path:
    """Sample a trained run; writes samples.png, samples.safetensors and report.md into `out`."""
    cfg, model, shape, n_classes = load_run(run_dir)
    name = generate.sampler_name(cfg, sampler)
    x, nfe = generate.sample(model, cfg, shape, n, sampler=name, steps=steps, seed=seed, guidance=guidance,
                             label=label, n_classes=n_classes, fast=fast, progress=progress)
    out = Path(out or Path(run_dir) / f"samples-{name}-{nfe}nfe-seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({"samples": x.contiguous()}, out / "samples.safetensors")
    title = f"{name}, {nfe} NFE, seed {seed}" + (f", label {label}" if label is not None else "") + \
        (f", guidance w={guidance}" if guidance is not None else "")
    report.panels(out / "samples.png", {"samples": x}, title=title)
    report.atomic_write(out / "report.md", f"# Samples of {Path(run_dir).name}\n\n{title}\n\n![samples](samples.png)\n")
    return out


def evaluate(cfg: Config, samples: torch.Tensor) -> dict:
    """Distances between samples and held-out data: classifier FD/KID for digits, sliced W / MMD / energy for vectors."""
    held, _ = configs.dataset(cfg, "test")
    if cfg.data.name == "digits":
        return {"digits_fd": metrics.digits_fd(samples, held), "digits_kid": metrics.digits_kid(samples, held)}
    n = min(len(samples), len(held))
    g = torch.Generator().manual_seed(0)
    return {"sliced_wasserstein": metrics.sliced_wasserstein(samples[:n], held[:n], generator=g),
            "energy_distance": metrics.energy_distance(samples[:n], held[:n]), "mmd": metrics.mmd(samples[:n], held[:n])}


def eval_run(run_dir: Path, *, sampler: str | None, steps: int | None, n: int, seed: int, fast: bool = False,
             progress: bool = True) -> dict:
    """Sample n and score them against the held-out split; writes eval-<sampler>-<nfe>.json in the run folder."""
    cfg, model, shape, n_classes = load_run(run_dir)
    name = generate.sampler_name(cfg, sampler)
    x, nfe = generate.sample(model, cfg, shape, n, sampler=name, steps=steps, seed=seed, fast=fast, progress=progress)
    result = {"sampler": name, "nfe": nfe, "n": n, "seed": seed, "fast": fast, **evaluate(cfg, x)}
    report.atomic_write(Path(run_dir) / f"eval-{name}-{nfe}nfe.json", json.dumps(result, indent=2))
    return result


STRAIGHTNESS_N, STRAIGHTNESS_STEPS = 512, 128  # what reflow_run measures straightness on


def reflow_run(teacher_dir: Path, out_dir: Path, *, n: int, sampler: str, steps: int, grid: str = "karras",
               seed: int = 0, distill: int = 0, overrides: list[str] = (), progress: bool = True) -> Path:
    """ReFlow (Liu et al. 2022, Alg. 1): couples from a trained rectified flow, then the next flow trained on them.

    The couples are drawn with `sampler` on `steps` steps of `grid` (karras by default: a flow's own uniform_t
    grid starts at sigma ~1000, where Heun's first step is far off) and go to out_dir/couples (resumable
    shards); the new run starts from the teacher's EMA weights and trains in out_dir. distill = k >= 1 trains
    only at the times of a k-step Euler sampler instead (§2.3).
    """
    cfg, model, shape, n_classes = load_run(teacher_dir)
    out_dir = Path(out_dir)
    m = cfg.model
    # The new run starts from the teacher's weights with the teacher's parametrization, which must be a flow's.
    flow = (m.path, m.prediction, m.shift) == ("rectified_flow", "velocity", 1)
    if cfg.objective.name in ("shortcut", "sid") or not flow:
        raise ValueError(f"reflow needs a rectified-flow teacher (model.path=rectified_flow, model.prediction="
                         f"velocity, trained by denoising or reflow); {teacher_dir} is a {cfg.objective.name} run "
                         f"with model.path={m.path}, model.prediction={m.prediction}, model.shift={m.shift}")
    # Derived (and so checked) before any couple is drawn. Paths are quoted: overrides are parsed as YAML.
    new = configs.derive(cfg, ["objective.name=reflow", f"objective.args={{distill: {distill}}}",
                               f"data.couples={_quote(out_dir / 'couples')}", f"model.init={_quote(teacher_dir)}",
                               "sample.sampler=euler", "sample.grid=distill", f"sample.steps={max(distill, 1)}",
                               *overrides])
    labels = torch.arange(n) % n_classes if n_classes else None
    sigmas = generate.grid(configs.derive(cfg, [f"sample.grid={grid}"]), steps)
    reflow.make_couples(model, sampler, sigmas, shape, n, out_dir / "couples", seed=seed,
                        labels=labels, device=_device(), progress=progress)
    train_run(new, out_dir, progress=progress)
    # Straightness (Liu et al. 2022, §2.3) of the flow the couples came from and of the new one, on the same noise.
    before, after = (_straightness(m, shape, n_classes) for m in (model, load_run(out_dir)[1]))
    result = {"straightness_before": before, "straightness_after": after, "n": STRAIGHTNESS_N,
              "sampler": "euler", "grid": f"uniform_t, {STRAIGHTNESS_STEPS} steps", "seed": 0}
    report.atomic_write(out_dir / "straightness.json", json.dumps(result, indent=2))
    report.atomic_write(out_dir / "report.md", (out_dir / "report.md").read_text() + (
        f"Straightness of the trajectories (Liu et al. 2022; 0 is straight; {STRAIGHTNESS_N} samples, "
        f"{STRAIGHTNESS_STEPS} Euler steps): {before:.4g} for {teacher_dir}, {after:.4g} after reflow.\n"))
    return out_dir


@torch.no_grad()
def _straightness(model: torch.nn.Module, shape: tuple[int, ...], n_classes: int) -> float:
    """Mean straightness of a flow's Euler trajectories from STRAIGHTNESS_N seeded noises (labels cycled)."""
    device = _device()
    z = torch.randn((STRAIGHTNESS_N, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(STRAIGHTNESS_N) % n_classes).to(device) if n_classes else None
    denoiser = model if labels is None else (lambda x, sigma: model(x, sigma, labels))
    return reflow.straightness(denoiser, z, STRAIGHTNESS_STEPS).mean().item()


def _quote(folder: str | Path) -> str:
    """A folder as a YAML string: unquoted, `1`, `on` or `a #b` would parse as a number, a bool or be cut short."""
    return json.dumps(str(Path(folder)))


# SiD from a trained start: Adam beta1 = 0, no clipping, and an EMA whose half-life ramps up as 0.05 x the steps
# so far (Zhou et al. 2024, run_sid.sh). The EMA generator is the one sampled, and it starts as the teacher: a
# fixed 0.999 decay kept 37% of the teacher after 1000 steps (digits FD 26.6 at 1 NFE; with the ramp-up, 3.2).
# The paper's lr 1e-5 is for 56M-parameter UNets at batch 256+; from the onestep bench's digits teacher the MLP
# reached FD 1.98 at 2000 steps with lr 3e-4 against 2.34 with 1e-4.
SID_TRAIN = ["train.lr=3e-4", "train.adam_beta1=0", "train.warmup=0", "train.cosine=false", "train.grad_clip=.inf",
             "train.steps=4000", "train.ema_decay=0.999", "train.ema_rampup=0.05"]


def distill_run(teacher_dir: Path, out_dir: Path, *, method: str = "sid", overrides: list[str] = (),
                progress: bool = True) -> Path:
    """A one-step generator distilled from a trained run: SiD (alpha 1.2) or FGM (SiD at alpha 0.5)."""
    methods = {"sid": [], "fgm": ["objective.args.alpha=0.5"]}
    if method not in methods:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(methods)}")
    cfg, _, _, _ = load_run(teacher_dir)
    if cfg.objective.name != "denoising":
        raise ValueError(f"distill needs a denoising teacher; {teacher_dir} is a {cfg.objective.name} run")
    new = configs.derive(cfg, ["objective.name=sid", "objective.args={}", f"model.init={_quote(teacher_dir)}",
                               "sample.steps=1", *SID_TRAIN, *methods[method], *overrides])
    return train_run(new, out_dir, progress=progress)
