"""The jobs behind `diffkit train | sample | eval`: each reads or writes one run folder.

A run folder holds config.yaml (the resolved config plus the data's shape and class count),
checkpoints/, metrics.jsonl, loss_curve.png, samples.png and report.md.

Resuming, one rule however a run stopped (Ctrl-C, a kill, a finished run given more steps): training in a
folder with checkpoints continues from the newest intact one (one whose files fail their checksums is skipped
with a warning that names it; sampling loads the same one). That checkpoint's config is the run's config
(config.yaml is a copy for readers): the command's must equal it but for train.steps, else the error names
the keys that differ. train.steps below the checkpoint's step is an error; another total continues under the
learning-rate schedule of that total from the checkpoint's step on, and report.md says so. metrics.jsonl
keeps only its rows up to the checkpoint's step. Ctrl-C saves a checkpoint of the step it stopped after.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from diffkit import config as configs
from diffkit import data as datasets
from diffkit import adapters, calibration, generate, interop_jobs, latent, likelihood, registry, report
from diffkit.config import Config
from diffkit.eval import distortion, metrics
from diffkit.interop import diffusers as interop
from diffkit.method import Derivation, Trained
from diffkit.train import checkpoint
from diffkit.train.loop import resume_point, train


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_info(cfg: Config, x: torch.Tensor, n_classes: int) -> dict:
    return {"config": configs.to_dict(cfg), "shape": list(configs.sample_shape(cfg, x)), "num_classes": n_classes}


def latest_checkpoint(run_dir: str | Path) -> checkpoint.Checkpoint:
    """A run's newest intact checkpoint; a folder without one is an error that says how to make it."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    if interop.is_diffusers_folder(run_dir):
        raise ValueError(f"{run_dir} is a diffusers folder: `diffkit sample` and `diffkit eval --data ...` take it; "
                         "this command needs a diffkit run folder")
    found = checkpoint.load_latest(Path(run_dir))
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints: train it first with `diffkit train`")
    return found


def ema_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The EMA state dict of a run's latest checkpoint (what model.init and teachers load)."""
    return latest_checkpoint(run_dir).ema


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _check_same_config(run_dir: Path, ck: checkpoint.Checkpoint | None, info: dict) -> None:
    """A run resumes only under the config of its checkpoint (config.yaml is a copy for readers, and the guard of
    a run stopped before its first checkpoint); only train.steps may change."""
    if ck is not None:
        saved = ck.config
    elif (run_dir / "config.yaml").exists():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    else:
        return
    # Keys as they are written on the command line (train.lr), beside the data's shape and num_classes.
    was, now = ({k.removeprefix("config."): v for k, v in _flat(d).items()} for d in (saved, info))
    differ = [k for k in sorted(was.keys() | now.keys()) if k != "train.steps" and was.get(k) != now.get(k)]
    if differ:
        show = lambda d, k: d[k] if k in d else "unset"  # noqa: E731
        raise ValueError(f"{run_dir} holds a run made with a different config ("
                         + "; ".join(f"{k}: {show(was, k)} in the run, {show(now, k)} now" for k in differ)
                         + "); pass a new --out folder (or the same config to resume; only train.steps may change)")


def _reference(cfg: Config, x: torch.Tensor, n: int) -> torch.Tensor:
    """The first n training images of a run: its data, or a reflow run's teacher samples (the couples), decoded
    when the teacher is a latent run."""
    return latent.decode(cfg, x[:n, 0]) if cfg.data.couples is not None else x[:n]


def start_weights(cfg: Config, shape: tuple[int, ...], n_classes: int, x: torch.Tensor,
                   y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The weights a run with model.init starts from: that run's EMA weights, and with model.adapter the adapters
    initialised on them (diffkit.adapters; LoRA-GA from the gradient of the run's objective on grad_batches batches)."""
    ck, a, device = latest_checkpoint(cfg.model.init), cfg.model.adapter, _device()
    if ck.config.get("num_classes", n_classes) != n_classes:
        raise ValueError(f"this run's data has {n_classes} classes and {cfg.model.init}'s net was built for "
                         f"{ck.config['num_classes']}: keep its data.conditional, and labels below its class count")
    if a.name is None:
        return ck.ema
    plain = configs.model(configs.derive(cfg, ["model.adapter.name=null"]), shape, n_classes)
    plain.load_state_dict(ck.ema)
    plain, objective = plain.to(device), configs.objective(cfg, n_classes)
    g, draws = torch.Generator().manual_seed(cfg.train.seed), torch.Generator(device).manual_seed(cfg.train.seed)

    def train_step() -> None:
        for _ in range(a.grad_batches):
            idx = torch.randint(len(x), (cfg.train.batch,), generator=g)
            cond = y[idx].to(device) if y is not None else None
            objective(plain, x[idx].to(device), cond, generator=draws).mean().backward()
    adapters.attach(plain.net, a, train_step=train_step)
    return plain.state_dict()


def train_run(cfg: Config, run_dir: Path, *, progress: bool = True) -> Path:
    """Train cfg in run_dir (resuming if it has checkpoints), then write samples (a codec's reconstructions), loss
    curve and report. A latent run (data.tokenizer) trains on the tokenizer's latents of the data."""
    run_dir = Path(run_dir)
    images, y = configs.dataset(cfg, "train")
    x = latent.encode(cfg, images)
    n_classes = configs.num_classes(cfg, y)
    info = _run_info(cfg, x, n_classes)
    resumed, length_changes = resume_point(run_dir, cfg.train)
    _check_same_config(run_dir, resumed, json.loads(json.dumps(info)))
    torch.manual_seed(cfg.train.seed)
    shape = configs.sample_shape(cfg, x)
    denoiser = configs.model(cfg, shape, n_classes)
    if cfg.model.init is not None:  # e.g. reflow and finetune start from it; SiD copies it into generator and fake
        denoiser.load_state_dict(start_weights(cfg, shape, n_classes, x, y))
    denoiser = denoiser.to(_device())
    model = configs.trainable(cfg, denoiser)
    objective = configs.objective(cfg, n_classes, teacher=denoiser if cfg.model.init is not None else None)
    method = registry.get(cfg.objective.name)
    monitor = method.monitor(cfg, lambda: configs.dataset(cfg, "test")[0])
    # The folder is made only once the config has built: a config error must not leave a config.yaml behind
    # that makes the corrected command fail as "a run made with a different config".
    run_dir.mkdir(parents=True, exist_ok=True)
    report.atomic_write(run_dir / "config.yaml", yaml.safe_dump(info, sort_keys=False))
    ema = train(model, objective, x, y, cfg.train, run_dir, config=info, monitor=monitor, progress=progress)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return run_dir  # under DDP, rank 0 alone writes the run's pictures and report
    report.loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    shown = 64 if len(shape) > 1 else 2000  # an image grid, or enough points to see a 2-D distribution
    data = _reference(cfg, images, shown)
    if method.generates:
        samples, nfe = generate.sample(ema.model, cfg, shape, shown, n_classes=n_classes, progress=progress)
        title = f"{generate.sampler_name(cfg, None)}, {nfe} NFE, EMA weights after {cfg.train.steps} steps"
        report.panels(run_dir / "samples.png", {"training data": data, "samples": samples}, title=title)
    else:
        held = configs.dataset(cfg, "test")[0][:shown]
        recon, _ = method.reconstruct(ema.model, held)
        title = f"held-out images and their reconstructions, EMA weights after {cfg.train.steps} steps"
        report.panels(run_dir / "samples.png", {"held-out": held, "reconstructions": recon}, title=title)
    facts = configs.describe(cfg)
    lines = [f"# Training run {run_dir.name}", "", report.table([facts], list(facts)), ""]
    for c in length_changes:
        how, total = "extended" if c["to_steps"] > c["from_steps"] else "shortened", c["to_steps"]
        lines += [f"Run length {how} from {c['from_steps']} to {total} steps; the schedule is that of {total} steps "
                  f"from step {c['at_step']} on.", ""]
    lines += ["![loss](loss_curve.png)", "", f"![samples](samples.png) ({title})", ""]
    report.atomic_write(run_dir / "report.md", "\n".join(lines))
    return run_dir


def load_run(run_dir: Path) -> tuple[Config, torch.nn.Module, tuple[int, ...], int]:
    """(config, EMA model on the best device, per-sample shape, class count) of a run's latest checkpoint.

    The model is what was trained: a Precond denoiser, or for SiD the generator and fake pair."""
    return _load(run_dir)[:4]


def _load(run_dir: Path) -> tuple[Config, torch.nn.Module, tuple[int, ...], int, int]:
    """load_run's results and the checkpoint's step."""
    ck = latest_checkpoint(run_dir)
    cfg = configs.from_dict(ck.config["config"])
    shape, n_classes = tuple(ck.config["shape"]), ck.config["num_classes"]
    model = configs.trainable(cfg, configs.model(cfg, shape, n_classes))
    model.load_state_dict(ck.ema)
    return cfg, model.to(_device()).eval(), shape, n_classes, ck.step


def sampling(run_dir: Path, grid: str | None, sampler: str | None, steps: int | None, guidance: float | None,
              label: int | None, data: str | None = None, merge: bool = False):
    """(config, model, shape, classes, sampler name, sigmas or None): what sampling a run with `sampler`, `steps`
    and `--grid grid` needs. A named grid replaces the config's; "calibrated" loads the grid `diffkit calibrate`
    stored for the sampler, step count, guidance and label. A diffusers folder is sampled through
    diffkit.interop_jobs (data: the --data of eval). merge: add a fine-tuned run's adapters into its weights."""
    if interop.is_diffusers_folder(run_dir):
        return interop_jobs.sampling(Path(run_dir), grid, sampler, steps, guidance, data=data, device=_device())
    cfg, model, shape, n_classes, step = _load(run_dir)
    if merge:
        adapters.merge(model)
    name = generate.sampler_name(cfg, sampler)
    if grid == "calibrated":
        sigmas = calibration.load(run_dir, name, steps or cfg.sample.steps, guidance=guidance, label=label, step=step)
        return cfg, model, shape, n_classes, name, sigmas
    if grid is not None:
        cfg = configs.derive(cfg, [f"sample.grid={grid}"])
    return cfg, model, shape, n_classes, name, None


def calibrate_run(run_dir: Path, *, sampler: str | None, steps: int | None, n: int = 256, seed: int = 0,
                  guidance: float | None = None, label: int | None = None, progress: bool = True) -> dict:
    """Fit and store the calibrated grid of a run for a sampler and step count (diffkit.calibration)."""
    cfg, model, shape, n_classes, step = _load(run_dir)
    if registry.get(cfg.objective.name).samplers:
        raise ValueError(f"{run_dir} is a {cfg.objective.name} run, which samples with its own sampler: "
                         "calibrated grids are for denoisers sampled with an ODE sampler")
    return calibration.calibrate(run_dir, model, cfg, shape, n_classes, step=step,
                                 sampler=generate.sampler_name(cfg, sampler), steps=steps or cfg.sample.steps, n=n,
                                 seed=seed, guidance=guidance, label=label, progress=progress)


def sample_run(run_dir: Path, *, sampler: str | None, steps: int | None, n: int, seed: int,
               guidance: float | None = None, label: int | None = None, out: Path | None = None,
               grid: str | None = None, fast: bool = False, merge: bool = False, progress: bool = True) -> Path:
    """Sample a trained run; writes samples.png, samples.safetensors and report.md into `out`.

    grid: a named grid instead of the config's, or "calibrated" (the one `diffkit calibrate` stored). merge: a
    fine-tuned run's adapters merged into its weights first (the same samples up to float error)."""
    if out is not None and ((Path(out) / "config.yaml").exists() or (Path(out) / "checkpoints").exists()):
        raise ValueError(f"--out {out} is a run folder: its samples.png and report.md would be replaced; leave --out "
                         "out (samples go to a named folder inside the run) or pass a new folder")
    cfg, model, shape, n_classes, name, sigmas = sampling(run_dir, grid, sampler, steps, guidance, label, merge=merge)
    x, nfe = generate.sample(model, cfg, shape, n, sampler=name, steps=steps, sigmas=sigmas, seed=seed,
                             guidance=guidance, label=label, n_classes=n_classes, fast=fast, progress=progress)
    out = Path(out or Path(run_dir) / output_name("samples", cfg, name, grid, nfe, n=n, seed=seed, label=label,
                                                  guidance=guidance, fast=fast, merge=merge))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"samples": x.contiguous()}, out / "samples.safetensors")
    title = f"{name}, {nfe} NFE, seed {seed}" + (f", label {label}" if label is not None else "") + \
        (f", guidance w={guidance}" if guidance is not None else "")
    report.panels(out / "samples.png", {"samples": x}, title=title)
    report.atomic_write(out / "report.md", f"# Samples of {Path(run_dir).name}\n\n{title}\n\n![samples](samples.png)\n")
    return out


def output_name(kind: str, cfg: Config, sampler: str, grid: str | None, nfe: int, *, n: int, seed: int,
                label: int | None = None, guidance: float | None = None, fast: bool = False,
                merge: bool = False) -> str:
    """The name of a sample or eval output inside a run folder: every setting that changes what it holds, so two
    commands that differ never write to the same place (e.g. samples-dpmpp_2m-calibrated-10nfe-n64-seed0)."""
    own = bool(registry.get(cfg.objective.name).samplers)  # a method's own sampler has no grid
    parts = [kind, sampler, *([] if own else [grid or cfg.sample.grid]), f"{nfe}nfe", f"n{n}", f"seed{seed}",
             *([f"label{label}"] if label is not None else []), *([f"w{guidance:g}"] if guidance is not None else []),
             *(["fast"] if fast else []), *(["merged"] if merge else [])]
    return "-".join(parts)


def evaluate(cfg: Config, samples: torch.Tensor) -> dict:
    """Distances between samples and held-out data: classifier FD/KID for digits, sliced W / MMD / energy for vectors."""
    held, _ = configs.dataset(cfg, "test")
    if cfg.data.name == "digits":
        return {"digits_fd": metrics.digits_fd(samples, held), "digits_kid": metrics.digits_kid(samples, held)}
    n = min(len(samples), len(held))
    g = torch.Generator().manual_seed(0)
    return {"sliced_wasserstein": metrics.sliced_wasserstein(samples[:n], held[:n], generator=g),
            "energy_distance": metrics.energy_distance(samples[:n], held[:n]), "mmd": metrics.mmd(samples[:n], held[:n])}


def notes(scores: dict, n: int) -> list[str]:
    """What a reader should know before trusting `scores` of n samples."""
    out = []
    if n < 500:
        out.append(f"only {n} samples: Fréchet distance and sliced W are biased upward and noisy below ~500")
    if any(k.endswith("kid") or k == "mmd" for k, v in scores.items() if isinstance(v, float) and v < 0):
        out.append("a negative KID / MMD is an unbiased estimate of a distance near 0: the samples are about as "
                   "close to the held-out data as real data is")
    return out


def eval_run(run_dir: Path, *, sampler: str | None, steps: int | None, n: int, seed: int, grid: str | None = None,
             fast: bool = False, data: str | None = None, merge: bool = False, progress: bool = True) -> dict:
    """Sample n and score them against the held-out split, next to the real-data floor (n training points
    scored the same way); writes eval-... .json (output_name) in the run folder.

    grid: as in sample_run. data: the data a diffusers folder is scored against (a run knows its own). A codec run
    (a tokenizer) is scored by its reconstructions instead (`reconstruction_run`)."""
    if interop.is_diffusers_folder(run_dir) and data is None:
        raise ValueError(f"{run_dir} is a diffusers folder, which does not say what data it learned: pass --data "
                         "(e.g. --data digits) to score it against that data's held-out split")
    if data is not None and not interop.is_diffusers_folder(run_dir):
        raise ValueError("--data is for diffusers folders; a run is scored against its own data")
    if data is None and not registry.get(load_run(run_dir)[0].objective.name).generates:
        return reconstruction_run(run_dir, n=n)
    cfg, model, shape, n_classes, name, sigmas = sampling(run_dir, grid, sampler, steps, None, None, data, merge)
    if data is not None:
        interop_jobs.check_data(cfg, shape, run_dir)
    x, nfe = generate.sample(model, cfg, shape, n, sampler=name, steps=steps, sigmas=sigmas, seed=seed, fast=fast,
                             progress=progress)
    scores = evaluate(cfg, x)
    train_x, _ = configs.dataset(cfg, "train")
    floor = evaluate(cfg, _reference(cfg, train_x, n))
    result = {"sampler": name, "grid": grid or cfg.sample.grid, "nfe": nfe, "n": n, "seed": seed, "fast": fast,
              **scores, "real_data_floor": floor, "notes": notes(scores, n)}
    report.atomic_write(Path(run_dir) / (output_name("eval", cfg, name, grid, nfe, n=n, seed=seed, fast=fast,
                                                     merge=merge) + ".json"),
                        json.dumps(result, indent=2))
    return result


def reconstruction_run(run_dir: Path, *, n: int | None = None) -> dict:
    """A codec run's held-out scores: PSNR (dB), MS-SSIM (images of 161 pixels or more) and its codes' usage,
    perplexity and dead codes over the first n held-out images; writes reconstruction-n<N>.json."""
    cfg, model, _, _ = load_run(run_dir)
    held, _ = configs.dataset(cfg, "test")
    held = held[:n]
    recon, stats = registry.get(cfg.objective.name).reconstruct(model, held)
    result = {"n": len(held), "psnr": distortion.psnr(recon, held).mean().item()}
    if min(held.shape[-2:]) >= distortion.MS_SSIM_MIN_SIDE:
        result["ms_ssim"] = distortion.ms_ssim(recon, held).mean().item()
    else:
        result["notes"] = [f"no MS-SSIM: the images are {tuple(held.shape[-2:])} pixels, below the "
                           f"{distortion.MS_SSIM_MIN_SIDE} its five scales need"]
    result |= stats
    report.atomic_write(Path(run_dir) / f"reconstruction-n{len(held)}.json", json.dumps(result, indent=2))
    return result


def likelihood_run(run_dir: Path, *, n: int | None = None, seed: int = 0, batch: int = 512,
                   progress: bool = True) -> dict:
    """Bits per dimension of the held-out split under a run's model; writes likelihood-<n>-seed<seed>.json.

    Flows give their exact log-density; denoisers (denoising, reflow runs, whatever their path) theirs by the
    probability-flow ODE over their path's sigma range (diffkit.likelihood; exact trace up to 256 dimensions,
    else Hutchinson with 4 probes). Integer data (digits: 17 levels, images: 256) is dequantized (seeded) and
    scored as bits per dimension of the integers (diffkit.data.dequantized_bits); continuous data (the toys)
    as nats per dimension. Conditional models are scored by their unconditional density (the null label).
    """
    cfg, model, shape, n_classes = load_run(run_dir)
    method = registry.get(cfg.objective.name)
    if method.likelihood is None:
        raise ValueError(f"{run_dir} is a {cfg.objective.name} run, whose model defines no likelihood; bits/dim is "
                         "for denoising, reflow and flow runs")
    if cfg.data.tokenizer is not None:
        raise ValueError(f"{run_dir} models a tokenizer's latents: their density is not one of the images (the "
                         "decoder is not invertible), so it has no bits/dim of the data")
    held, _ = configs.dataset(cfg, "test")
    x, levels, device = held[:n], configs.levels(cfg), _device()
    dims, g = x[0].numel(), torch.Generator().manual_seed(seed)
    p, s = configs.path(cfg), cfg.sample
    lo, hi = s.sigma_min or p.sigma_min, s.sigma_max or p.sigma_max
    divergence = "exact" if dims <= 256 else "hutchinson"
    log_p = []
    for start in tqdm(range(0, len(x), batch), desc="likelihood", disable=not progress):
        xb = x[start:start + batch]
        xb = (xb if levels is None else datasets.dequantize(xb, levels=levels, generator=g)).to(device)
        cond = torch.full((len(xb),), n_classes, dtype=torch.long, device=device) if n_classes else None
        if method.likelihood == "exact":
            with torch.no_grad():
                log_p.append(method.log_prob(model, xb, cond).cpu())
        else:
            denoiser = model if cond is None else (lambda v, sigma, c=cond: model(v, sigma, c))
            log_p.append(likelihood.log_likelihood(denoiser, xb, sigma_min=lo, sigma_max=hi, divergence=divergence,
                                                   probes=4, generator=g).cpu())
    log_p = torch.cat(log_p).double()
    result = {"n": len(x), "seed": seed, "how": "exact" if method.likelihood == "exact" else
              f"probability-flow ODE from sigma {lo:.4g} to {hi:.4g}, {divergence} trace"}
    if levels is not None:
        bpd = datasets.dequantized_bits(log_p, dims=dims, levels=levels)
        result |= {"bits_per_dim": bpd.mean().item(), "bits_per_dim_stderr": (bpd.std() / len(bpd) ** 0.5).item(),
                   "levels": levels}
    else:
        result["nats_per_dim"] = (-log_p / dims).mean().item()
    report.atomic_write(Path(run_dir) / f"likelihood-{len(x)}-seed{seed}.json", json.dumps(result, indent=2))
    return result


def trained(run_dir: Path) -> Trained:
    """A trained run as a method's command sees it: load_run's results, its method and its grids by name."""
    cfg, model, shape, n_classes = load_run(run_dir)
    return Trained(Path(run_dir), cfg, model, shape, n_classes, registry.get(cfg.objective.name),
                   grid=lambda name, steps: generate.grid(configs.derive(cfg, [f"sample.grid={name}"]), steps),
                   device=_device())


def derive_run(method: Derivation, teacher_dir: Path, out_dir: Path, *, options: dict, overrides: list[str] = (),
               progress: bool = True) -> Path:
    """A new run in out_dir made from the trained run teacher_dir (`diffkit reflow`, `distill`, `finetune`).

    The method checks the teacher and derives the new config (the overrides go on top, all checked) before it
    does any work of its own (ReFlow's couples), then the new run trains and the method measures it against
    its teacher (ReFlow: straightness) into the new run's report.
    """
    teacher, out_dir = trained(teacher_dir), Path(out_dir)
    new = configs.derive(teacher.cfg, [*method.derive(teacher, options, out_dir), *overrides])
    method.before_training(teacher, options, out_dir, progress=progress)
    train_run(new, out_dir, progress=progress)
    files, text = method.after_training(teacher, trained(out_dir), options)
    for name, content in files.items():
        report.atomic_write(out_dir / name, json.dumps(content, indent=2))
    if text:
        report.atomic_write(out_dir / "report.md", (out_dir / "report.md").read_text() + text)
    return out_dir
