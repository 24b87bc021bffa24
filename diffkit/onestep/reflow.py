"""ReFlow: straighten a flow by retraining it on its own (noise, sample) couples, then distil it to k steps.

Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow".
A rectified flow is fitted by the least-squares problem of Eq. 1, here in diffkit's time convention (data at
t = 0, noise at t = 1; the paper's t is our 1 - t):

    min_v  int_0^1 E || (eps - x0) - v(x_t, t) ||^2 dt,      x_t = (1 - t) x0 + t eps.

1-RF draws (x0, eps) independently. ReFlow (Alg. 1) draws z ~ N(0, I), solves the k-RF's ODE to get the
sample x1 = ODE(z), and fits the (k+1)-RF to the same loss on these FIXED couples. It keeps the marginals,
never increases a convex transport cost, and makes the trajectories straighter, as measured by

    S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt                       (straightness, §2.3 and §3)

S = 0 exactly when every trajectory is a straight line at constant speed, which one Euler step integrates
exactly. Distillation (§2.3; the reference code's `reflow_t_schedule`) trains on the couples only at the
times a k-step Euler sampler visits, t = t_max (k - i) / k: "t0" (k = 1) makes the model a one-step map.

Which noise is coupled. A diffkit sampler starts at x = sigma_start z in the scale-free state x = x_t / alpha,
i.e. at x_t = t_start z, without the (1 - t_start) x0 a true RF marginal carries (sigma_max = 999 for
RectifiedFlow, t_max = 1 - 1e-3). So the line through the couple must pass through that start point:
x0 + sigma_start eps = sigma_start z gives

    eps = z - x1 / sigma_start,

and then one Euler step from sigma_start, x0_hat = x_t - t_start v, returns x1 exactly for a perfect model
(with eps = z it would return t_start x1). Shards store z as drawn; `Reflow` forms eps from its own
`sigma_start`, which must be the start of the grid the new model will be sampled on (the default, the path's
sigma_max, is where generate.grid and the grid builders start).

Couples are written in shards `couples-00000.safetensors` (tensors noise, sample, labels; JSON metadata),
each to a temporary name and renamed into place. Couple i depends only on (seed, i): its noise comes from
its own generator (samplers.noise.GaussianNoise), so shard and batch sizes do not change the couples (bit for
bit with the exact analytic denoisers; a network's batched matmuls may round differently, ~1e-7 in float32).

`ReflowMethod` is how the jobs train it from a run's config, and `diffkit reflow RUN` (Alg. 1: couples from a
trained flow, then the next flow trained on them) derives a new run from a trained one (diffkit.method).
"""
from __future__ import annotations

import json
import os
from pathlib import Path as FilePath
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor
from tqdm import tqdm

from diffkit import grids, samplers
from diffkit._tensor import per_sample
from diffkit.method import Method, Option, Trained, quote
from diffkit.objectives import Denoising
from diffkit.paths import Path, RectifiedFlow, Uniform
from diffkit.precond import Precond, convert
from diffkit.samplers.noise import GaussianNoise

FORMAT = "diffkit.reflow.couples/1"
_PATTERN = "couples-*.safetensors"


def _shard(out_dir: FilePath, k: int) -> FilePath:
    return out_dir / f"couples-{k:05d}.safetensors"


def _read_shard(file: FilePath) -> tuple[dict[str, Tensor], dict]:
    """A shard's tensors and metadata; a corrupt, truncated or foreign file is a ValueError naming it."""
    try:
        tensors = load_file(file)
        with safe_open(file, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("couples", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"couples shard {file} is corrupt or truncated ({err}); delete it and run make_couples "
                         "again with the same settings to rewrite it") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a diffkit reflow couples shard (no {FORMAT!r} metadata)")
    count = meta["stop"] - meta["start"]
    want = {"noise": (count, *meta["shape"]), "sample": (count, *meta["shape"])}
    if meta["label_shape"] is not None:
        want["labels"] = (count, *meta["label_shape"])
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise ValueError(f"couples shard {file} holds tensors {got} but its metadata promises {want}; delete it "
                         "and run make_couples again to rewrite it")
    return tensors, meta


def _mismatch(file: FilePath, found: dict, expected: dict) -> ValueError:
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    text = "; ".join(f"{k}: file has {a!r}, this call wants {b!r}" for k, (a, b) in diff.items())
    return ValueError(f"couples shard {file} was made with other settings ({text}). Use another out_dir, or "
                      "the settings of the run that made it.")


@torch.no_grad()
def make_couples(denoiser: Callable, sampler: str, sigmas: Tensor, shape: tuple[int, ...], n: int,
                 out_dir: str | os.PathLike, *, seed: int = 0, labels: Tensor | None = None,
                 shard_size: int = 4096, batch: int = 256, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True) -> list[FilePath]:
    """Write n couples (z, x1 = sampler(denoiser, sigmas[0] z, sigmas)) to out_dir; return the shard files.

    denoiser: D(x, sigma), or D(x, sigma, cond) when `labels` (n, ...) are given (couple i is sampled with
    labels[i]; bind guidance inside D). sampler: a name from diffkit.samplers, run on the grid `sigmas`;
    stochastic ones draw from couple i's own generator too. shape: per-sample shape.
    Resuming: a shard already on disk is checked, not redone. Writes are atomic, so a complete shard is the
    only kind a crash leaves; a shard made with other settings (seed, sampler, grid, n, shard size, ...) or one
    damaged afterwards is a ValueError naming the file rather than silently mixed in or overwritten.
    """
    fn, out_dir = samplers.get(sampler), FilePath(out_dir)
    grids.check_grid(sigmas)
    if n < 1 or shard_size < 1 or batch < 1:
        raise ValueError(f"n, shard_size and batch must be >= 1, got {n}, {shard_size}, {batch}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must hold one condition per couple: {len(labels)} for n = {n}")
    run = {"format": FORMAT, "seed": seed, "sampler": sampler, "steps": len(sigmas) - 1,
           "sigmas": sigmas.tolist(), "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "n": n,
           "label_shape": None if labels is None else list(labels.shape[1:])}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    bar = tqdm(total=n, desc=f"reflow couples ({sampler}, {run['steps']} steps)", disable=not progress)
    for k, start in enumerate(range(0, n, shard_size)):
        stop, file = min(start + shard_size, n), _shard(out_dir, k)
        meta = {**run, "start": start, "stop": stop}
        if file.exists():
            found = _read_shard(file)[1]
            if found != meta:
                raise _mismatch(file, found, meta)
        else:
            tensors: dict[str, list[Tensor]] = {"noise": [], "sample": []}
            for b0 in range(start, stop, batch):
                idx = range(b0, min(b0 + batch, stop))
                # Couple i's noise (and any sampler noise) from its own generator, seeded by (seed, i).
                source = GaussianNoise(seed, indices=idx, device=device)
                z = source.sample(tuple(shape), dtype)
                d = denoiser if labels is None else _bind(denoiser, labels[b0:idx.stop].to(device))
                tensors["noise"].append(z.cpu())
                tensors["sample"].append(fn(d, sigmas[0].item() * z, sigmas, noise=source).cpu())
            out = {name: torch.cat(parts).contiguous() for name, parts in tensors.items()}
            if labels is not None:
                out["labels"] = labels[start:stop].cpu().contiguous()
            tmp = file.with_name(f".{file.name}.tmp")
            # One JSON metadata entry: safetensors writes several entries in no fixed order.
            save_file(out, tmp, metadata={"couples": json.dumps(meta, sort_keys=True)})
            os.replace(tmp, file)
        files.append(file)
        bar.update(stop - start)
    bar.close()
    return files


def _bind(denoiser: Callable, cond: Tensor) -> Callable:
    return lambda x, sigma: denoiser(x, sigma, cond)


def load_couples(out_dir: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor | None]:
    """(noise z (n, ...), sample x1 (n, ...), labels (n, ...) or None) from the shards of make_couples.

    The shards must be contiguous, from one run, and cover couples 0..n-1; a gap, a missing tail, a foreign or
    damaged shard is a ValueError naming the file.
    """
    out_dir = FilePath(out_dir)
    files = sorted(out_dir.glob(_PATTERN))
    if not files:
        raise FileNotFoundError(f"no {_PATTERN} in {out_dir}: make them with make_couples")
    parts, first, stop = [], None, 0
    for file in files:
        tensors, meta = _read_shard(file)
        run = {k: v for k, v in meta.items() if k not in ("start", "stop")}
        first = first or run
        if run != first:
            raise _mismatch(file, run, first)
        if meta["start"] != stop:
            raise ValueError(f"couples [{stop}, {meta['start']}) are missing before {file}; run make_couples again "
                             "with the same settings to fill the gap")
        parts.append(tensors)
        stop = meta["stop"]
    if stop != first["n"]:
        raise ValueError(f"couples end at index {stop} in {files[-1]} but the run has n = {first['n']}: the last "
                         "shards are missing; run make_couples again with the same settings to finish it")
    cat = lambda name: torch.cat([p[name] for p in parts])  # noqa: E731
    return cat("noise"), cat("sample"), cat("labels") if first["label_shape"] is not None else None


def pack(noise: Tensor, sample: Tensor) -> Tensor:
    """The (N, 2, ...) data tensor [sample, noise] that the training loop hands to `Reflow`."""
    if noise.shape != sample.shape:
        raise ValueError(f"noise and sample must have one shape, got {tuple(noise.shape)} and {tuple(sample.shape)}")
    return torch.stack([sample, noise], 1)


def distill_grid(steps: int, *, path: Path | None = None, sigma_start: float | None = None) -> Tensor:
    """The sigma grid of k = `steps` Euler steps uniform in t from t_start: t_start (k - i) / k, i < k, then 0.

    A model distilled with Reflow(distill=k) is trained exactly at these times; sample it with `euler` on this grid.
    """
    path = path or RectifiedFlow()
    return grids.uniform_t_to_zero(path, steps, float(path.t(path.sigma_max if sigma_start is None else sigma_start)))


class Reflow:
    """loss(model, couples, cond, generator) -> (B,) flow-matching loss on fixed couples (Liu et al. 2022, Eq. 1).

    couples: (B, 2, ...) from `pack`, [sample x1, noise z]. The model regresses its path's target for the pair
    (x0 = x1, eps = z - x1 / sigma_start) with plain MSE on the network output; for Precond(net,
    RectifiedFlow(), "velocity") that target is eps - x0.
    distill: 0 (plain reflow, t ~ U[t_min, t_start]); k >= 1 (k-step distillation: t uniform over the k
    start times of `distill_grid(k)`; True = 1, one-step distillation at t = t_start).
    sigma_start: where the model will be sampled from (default: the path's sigma_max).
    """

    def __init__(self, path: Path | None = None, *, sigma_start: float | None = None, distill: int = 0):
        if distill < 0:
            raise ValueError(f"distill must be 0 (plain reflow) or a number of steps k >= 1, got {distill}")
        self.path = path or RectifiedFlow()
        self.sigma_start = self.path.sigma_max if sigma_start is None else float(sigma_start)
        self.distill = int(distill)
        self._target = Denoising(self.path).target
        self._times = (self.path.t(distill_grid(self.distill, path=self.path, sigma_start=self.sigma_start)[:-1])
                       if self.distill else None)

    def times(self, b: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times t (b,), float64, on the generator's device."""
        if self._times is None:
            return Uniform(t_hi=float(self.path.t(self.sigma_start))).sample(self.path, b, generator)
        device = generator.device if generator is not None else torch.device("cpu")
        i = torch.randint(len(self._times), (b,), generator=generator, device=device)
        return self._times.to(device)[i]

    def __call__(self, model: Precond, couples: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        if couples.ndim < 2 or couples.shape[1] != 2:
            raise ValueError(f"Reflow expects (B, 2, ...) couples from pack(noise, sample), got {tuple(couples.shape)}")
        x0, z = couples[:, 0], couples[:, 1]
        b = x0.shape[0]
        t = self.times(b, generator).to(x0.device)
        # The straight line from the sampler's start point sigma_start z to the sample (module docstring).
        eps = z - x0 / self.sigma_start
        sigma = self.path.sigma(t)
        f = model.raw(x0 + per_sample(sigma, x0) * eps, sigma, cond)
        return ((f - self._target(model, x0, eps, t)) ** 2).reshape(b, -1).mean(1)


@torch.no_grad()
def straightness(denoiser: Callable, z: Tensor, sigmas: Tensor | int = 256, *, sampler: str = "euler",
                 path: Path | None = None) -> Tensor:
    """Per-sample straightness (B,) of the ODE trajectories from sigmas[0] z (z: (B, ...) unit noise).

    The trajectory is the one `sampler` takes on the grid `sigmas` (an int n: uniform_t(path, n)), viewed in
    the path's coordinates (x_t = alpha x, t); default RectifiedFlow, where the velocity is
    dx_t/dt = (x_t - x0_hat) / t. The paper's Z_0 (noise) is our start x_{t_start}, its Z_1 (data) our end
    x_0, and both Z_1 - Z_0 and dZ/dt flip sign, so the batch mean of

        S = 1/t_start sum_i (t_i - t_{i+1}) || (x_{t_start} - x_0) / t_start - v(x_{t_i}, t_i) ||^2

    estimates S(Z) (left-point rule at the points the sampler evaluates; || . ||^2 sums over all dimensions).
    It is exactly 0 when every trajectory is straight at constant speed, e.g. the exact flow of a point mass.
    """
    path = path or RectifiedFlow()
    sigmas = grids.uniform_t(path, sigmas) if isinstance(sigmas, int) else sigmas
    t = path.t(sigmas.to(torch.float64))
    velocities: list[Tensor] = []

    def record(i: int, x: Tensor, sigma: float, x0_hat: Tensor) -> None:
        x, x0_hat = x.to(torch.float64), x0_hat.to(torch.float64)
        velocities.append(convert(x0_hat, "x0", "velocity", per_sample(path.alpha(t[i]), x) * x, t[i], path))

    start = sigmas[0].item() * z
    end = samplers.get(sampler)(denoiser, start, sigmas, callback=record).to(torch.float64)
    start = start.to(torch.float64)
    if len(velocities) != len(sigmas) - 1:
        raise ValueError(f"straightness needs a sampler that reports every step to its callback (euler, heun, "
                         f"dpmpp_2m, ...); {sampler!r} reported {len(velocities)} of {len(sigmas) - 1}")
    x_start = per_sample(path.alpha(t[0]), start) * start
    mean_v = (x_start - end) / (t[0] - t[-1])
    dev = torch.stack([((v - mean_v) ** 2).reshape(len(z), -1).sum(1) for v in velocities])  # (steps, B)
    w = (t[:-1] - t[1:]) / (t[0] - t[-1])
    return (w[:, None].to(dev.device) * dev).sum(0)


STRAIGHTNESS_N, STRAIGHTNESS_STEPS = 512, 128  # what `diffkit reflow` measures straightness on


class ReflowMethod(Method):
    """ReFlow as a run's method: flow matching on fixed couples; `diffkit reflow RUN` draws them and trains."""

    name = "reflow"
    objective_class = Reflow
    own_args = ("path",)
    trains_flow = True
    command = "reflow"
    command_help = "ReFlow a trained flow: draw (noise, sample) couples, train the next flow on them"
    options = (
        Option("n", int, 20000, "number of couples (default 20000)"),
        Option("sampler", str, "heun", "sampler that draws the couples (default heun)"),
        Option("steps", int, 18, "its grid steps (default 18: 35 NFE with heun)"),
        Option("grid", str, "karras", "its sigma grid: karras (default), uniform_t, log_snr or distill"),
        Option("seed", int, 0, "seed of the couples' noise"),
        Option("distill", int, 0, "train only at the times of a K-step Euler sampler (K = 1: a one-step model)"),
    )

    def objective(self, cfg, path: Path, *, label_dropout: float, null: int | None, teacher=None) -> Reflow:
        return Reflow(path, **cfg.objective.args)

    def derive(self, teacher: Trained, options: dict, out_dir: FilePath) -> list[str]:
        """The new run starts from the teacher's EMA weights with its parametrization, which must be a flow's.

        The couples are drawn with `sampler` on `steps` steps of `grid` (karras by default: a flow's own uniform_t
        grid starts at sigma ~1000, where Heun's first step is far off) into out_dir/couples; distill = k >= 1
        trains only at the times of a k-step Euler sampler instead (§2.3)."""
        m = teacher.cfg.model
        flow = (m.path, m.prediction, m.shift) == ("rectified_flow", "velocity", 1)
        if teacher.method.samplers or not flow:
            raise ValueError(f"reflow needs a rectified-flow teacher (model.path=rectified_flow, model.prediction="
                             f"velocity, trained by denoising or reflow); {teacher.folder} is a "
                             f"{teacher.cfg.objective.name} run with model.path={m.path}, model.prediction="
                             f"{m.prediction}, model.shift={m.shift}")
        distill = options["distill"]
        return ["objective.name=reflow", f"objective.args={{distill: {distill}}}",
                f"data.couples={quote(out_dir / 'couples')}", f"model.init={quote(teacher.folder)}",
                "sample.sampler=euler", "sample.grid=distill", f"sample.steps={max(distill, 1)}"]

    def before_training(self, teacher: Trained, options: dict, out_dir: FilePath, *, progress: bool) -> None:
        n, n_classes = options["n"], teacher.n_classes
        labels = torch.arange(n) % n_classes if n_classes else None
        make_couples(teacher.model, options["sampler"], teacher.grid(options["grid"], options["steps"]),
                     teacher.shape, n, out_dir / "couples", seed=options["seed"], labels=labels,
                     device=teacher.device, progress=progress)

    def after_training(self, teacher: Trained, trained: Trained, options: dict) -> tuple[dict[str, dict], str]:
        """Straightness (Liu et al. 2022, §2.3) of the flow the couples came from and of the new one, same noise."""
        before, after = (_mean_straightness(run) for run in (teacher, trained))
        result = {"straightness_before": before, "straightness_after": after, "n": STRAIGHTNESS_N,
                  "sampler": "euler", "grid": f"uniform_t, {STRAIGHTNESS_STEPS} steps", "seed": 0}
        text = (f"Straightness of the trajectories (Liu et al. 2022; 0 is straight; {STRAIGHTNESS_N} samples, "
                f"{STRAIGHTNESS_STEPS} Euler steps): {before:.4g} for {teacher.folder}, {after:.4g} after reflow.\n")
        return {"straightness.json": result}, text


@torch.no_grad()
def _mean_straightness(run: Trained) -> float:
    """Mean straightness of a run's Euler trajectories from STRAIGHTNESS_N seeded noises (labels cycled)."""
    z = torch.randn((STRAIGHTNESS_N, *run.shape), generator=torch.Generator().manual_seed(0)).to(run.device)
    labels = (torch.arange(STRAIGHTNESS_N) % run.n_classes).to(run.device) if run.n_classes else None
    denoiser = run.model if labels is None else _bind(run.model, labels)
    return straightness(denoiser, z, STRAIGHTNESS_STEPS).mean().item()
