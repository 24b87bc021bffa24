"""Training and sampling throughput of our UNet next to diffusers' UNet2DModel, on one device, in one run.

Both nets are built at the same configuration (default: DDPM's CIFAR-10 net, 35.7M parameters; diffusers' blocks
with the same attention levels, head width and dropout) and run the same way, with PyTorch's own tools: bf16
autocast on CUDA, fused AdamW (diffkit.train.optim), channels_last weights, cudnn.benchmark, and in the "compiled"
rows torch.compile (diffkit.train.fast; inductor on CUDA, aot_eager elsewhere). Nothing in either net is rewritten.

Training: one step is the real objective's forward + backward + AdamW step: ours is diffkit.objectives.Denoising
on Precond(UNet, VPLinear, "eps"); diffusers' is the eps-prediction MSE of its training example (DDPMScheduler
.add_noise, integer t). FLOPs per image come from torch.utils.flop_counter (forward + backward, 2 FLOPs per
multiply-add, attention counted through its math kernels); MFU is achieved FLOP/s over the nominal dense bf16
peak (H100 / H200 SXM: 989 TFLOP/s, H100 PCIe: 756) and over a large bf16 GEMM measured in this run. The
"train.loop" rows train ours through diffkit.train.loop itself (EMA, clipping, data from host memory): the speed a
`diffkit train` user gets, timed from the loop's own metrics.jsonl.

Sampling: images/s of a deterministic DDIM loop at each NFE: ours is diffkit.samplers.ddim over a FastDenoiser
(one CUDA graph per step when compiled on CUDA); diffusers' is its DDIMScheduler loop on its net, compiled with
mode="reduce-overhead" as diffusers' documentation recommends. "host_syncs" counts synchronizing CUDA calls in
one run of the loop (torch.cuda.set_sync_debug_mode).

    diffkit bench throughput [--quick] [--part all|train|loop|sample] [--batches 128,512] [--sample-batches 128,1024]
                             [--nfes 1,10,35] [--compile-mode MODE] [--profile] [--fresh] [--out DIR] [--device DEV]

Writes throughput.json / .md under --out (default benchmarks/results) after every row, so a run cut short keeps what
it measured. A later run on the same device, versions and net adds its rows to the file (a row measured again
replaces the old one; --fresh starts over), so the benchmark can be run in parts, e.g. on a machine lent in
10-minute slices: `--part train --batches 512`, then `--part sample --sample-batches 1024 --nfes 10`, and so on.
The JSON's top level carries `device` and the headline ratios of images/s, ours over diffusers', both compiled
(null while not measured): `train_speedup_vs_diffusers_compiled_bs512`, and `sampling_speedup_nfe10` at the
largest sample batch measured for both (`sampling_speedup_nfe10_batch`). --quick is a seconds-long smoke run of a
tiny net (on CPU: the same tables, not a measurement). --profile adds, per row, the kernels that take the
time and the share spent in GEMM/conv/attention kernels: what to tune next.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity
from torch.utils.flop_counter import FlopCounterMode

from diffkit import grids, samplers
from diffkit.nets.unet import UNet
from diffkit.objectives import Denoising
from diffkit.paths import VPLinear
from diffkit.precond import Precond
from diffkit.train import fast, optim
from diffkit.train.loop import TrainSettings, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput_results as results  # noqa: E402
from throughput_results import add, headlines, markdown, save  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
import diffusers  # noqa: E402

CIFAR = {"channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,),
         "image_size": 32, "dropout": 0.1, "head_channels": 64}
FULL = {"net": CIFAR, "batches": (128, 512), "train_warmup": 5, "train_steps": 20, "sample_batches": (128, 1024),
        "nfes": (1, 10, 35), "sample_warmup": 3, "sample_repeats": 5, "gemm_n": 8192, "gemm_reps": 50,
        "compile_mode": None, "profile": False}
QUICK = {"net": {**CIFAR, "channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
                 "image_size": 16},
         "batches": (4,), "train_warmup": 1, "train_steps": 2, "sample_batches": (4,), "nfes": (1, 2),
         "sample_warmup": 1, "sample_repeats": 1, "gemm_n": 256, "gemm_reps": 3, "compile_mode": None, "profile": False}
NOMINAL_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense bf16 peak; first match in the name
PATH = VPLinear()
LR = 1e-4


def ours_net(cfg: dict) -> UNet:
    return UNet(3, **cfg)


def diffusers_config(cfg: dict) -> dict:
    """UNet2DModel's arguments for our configuration: attention blocks at the same resolutions, the same head width."""
    res = [cfg["image_size"] // 2**i for i in range(len(cfg["channel_mult"]))]
    attn = [r in cfg["attn_resolutions"] for r in res]
    return {"sample_size": cfg["image_size"], "in_channels": 3, "out_channels": 3,
            "block_out_channels": tuple(cfg["channels"] * m for m in cfg["channel_mult"]),
            "layers_per_block": cfg["num_res_blocks"],
            "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            "attention_head_dim": cfg["head_channels"], "dropout": cfg["dropout"]}


def diffusers_net(cfg: dict) -> diffusers.UNet2DModel:
    return diffusers.UNet2DModel(**diffusers_config(cfg))


def ours_loss(model: Precond, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Our training loss: the Denoising objective (eps prediction, uniform t, plain MSE) on a Precond."""
    return Denoising(PATH)(model, x0, generator=gen).mean()


def diffusers_loss(unet, scheduler, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """diffusers' training example: integer t, add_noise, MSE between the predicted and the drawn eps."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    return F.mse_loss(unet(scheduler.add_noise(x0, eps, t), t).sample.float(), eps)


def train_setup(name: str, cfg: dict, device: torch.device, compile: bool,
                mode: str | None = None) -> tuple[Callable, torch.optim.Optimizer]:
    """(loss(x0, gen), optimizer) for "ours" or "diffusers", the net on `device`, seeded, compiled if asked."""
    torch.manual_seed(0)
    if name == "ours":
        model = Precond(fast.prepare(ours_net(cfg), device, compile=compile, mode=mode), PATH, "eps")
        return (lambda x0, gen: ours_loss(model, x0, gen)), optim.build(model, lr=LR)[0]
    unet = fast.prepare(diffusers_net(cfg), device, compile=compile, mode=mode)
    scheduler = diffusers.DDPMScheduler()
    return (lambda x0, gen: diffusers_loss(unet, scheduler, x0, gen)), optim.build(unet, lr=LR)[0]


def train_step(loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Forward under autocast, backward, optimizer step; no host sync."""
    with fast.autocast(device):
        value = loss()
    value.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value.detach()


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of fn (2 per multiply-add); SDPA runs its math kernels so attention counts on every device."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_flops_per_image(name: str, cfg: dict, device: torch.device, batch: int = 2) -> float:
    """Forward + backward FLOPs of one training example (the optimizer's elementwise work is not counted)."""
    loss, _ = train_setup(name, cfg, device, compile=False)
    x0 = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)
    return count_flops(lambda: loss(x0, torch.Generator(device).manual_seed(0)).backward()) / batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, calls: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call over `calls` timed calls, seconds of the `warmup` calls before them, compilation included)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t1) / calls, t1 - t0


def gemm_flops(device: torch.device, n: int, reps: int) -> dict:
    """FLOP/s of an n x n x n matmul, bf16 on CUDA (fp32 elsewhere): the practical peak MFU is also read against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec, _ = timed(lambda: a @ b, 2, reps, device)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * n**3 / sec}


MATMUL_KERNELS = re.compile(r"gemm|conv|xmma|cutlass|cudnn|flash|attention|matmul|wgrad|dgrad|\b(add|b)?mm\b",
                            re.IGNORECASE)  # by name: GEMM / convolution / attention kernels and ops


def profile(fn: Callable[[], object], device: torch.device, calls: int = 3, top: int = 12) -> dict:
    """Where one call's time goes: the kernels (CUDA) or ops (CPU) with the most self time over `calls` calls,
    and the share of that time spent in matmul-like kernels, by name (the rest is what fusion can still win)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    fn()
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events)
    return {"total_ms_per_call": total / 1e3 / calls,
            "matmul_share": sum(getattr(e, attr) for e in events if MATMUL_KERNELS.search(e.key)) / total,
            "top": [{"op": e.key[:90], "ms_per_call": getattr(e, attr) / 1e3 / calls, "share": getattr(e, attr) / total,
                     "launches_per_call": e.count / calls} for e in events[:top]]}


def bench_train(name: str, compile: bool, batch: int, s: dict, device: torch.device, flops: float, peaks: dict) -> dict:
    loss, opt = train_setup(name, s["net"], device, compile, s["compile_mode"])
    size = s["net"]["image_size"]
    x0 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device).manual_seed(0)
    last = {}
    step = lambda: last.update(loss=train_step(lambda: loss(x0, gen), opt, device))  # noqa: E731
    sec, first = timed(step, s["train_warmup"], s["train_steps"], device)
    row = train_row(name, "compiled" if compile else "eager", batch, sec, first, flops, peaks, last["loss"].item())
    return row | ({"profile": profile(step, device)} if s["profile"] else {})


def train_row(model: str, mode: str, batch: int, sec: float, first: float, flops: float, peaks: dict,
              loss: float) -> dict:
    """A training row: images/s and MFU of `sec` seconds per step of `batch` images at `flops` per image."""
    achieved = flops * batch / sec
    return {"model": model, "mode": mode, "batch": batch, "images_per_s": batch / sec, "step_ms": 1e3 * sec,
            "warmup_s": first, "gflop_per_image": flops / 1e9, "tflop_per_s": achieved / 1e12,
            "mfu_nominal": achieved / peaks["nominal"] if peaks["nominal"] else None,
            "mfu_vs_gemm": achieved / peaks["gemm"], "gemm_tflop_per_s": peaks["gemm"] / 1e12, "loss": loss}


def loop_seconds(log: list[dict], batch: int, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step after the warm-up, seconds of the warm-up) from train.loop's metrics.jsonl rows, whose
    samples_per_s is batch x steps so far over the time since the loop started."""
    elapsed = {row["step"]: batch * row["step"] / row["samples_per_s"] for row in log}
    return (elapsed[warmup + steps] - elapsed[warmup]) / steps, elapsed[warmup]


def bench_loop(batch: int, s: dict, device: torch.device, flops: float, peaks: dict) -> dict:
    """Our UNet trained by diffkit.train.loop as `diffkit train` runs it (train.compile on CUDA, bf16 autocast, fused
    AdamW, clipping, EMA, LR schedule, batches copied from host memory, one finite-step read per step), timed
    from the loop's own metrics.jsonl: what a user gets, next to the bare step of bench_train."""
    torch.manual_seed(0)
    model = Precond(ours_net(s["net"]).to(device), PATH, "eps")
    size, warmup, steps = s["net"]["image_size"], s["train_warmup"], s["train_steps"]
    x = torch.randn(4 * batch, 3, size, size)  # in host memory, as a dataset is
    settings = TrainSettings(steps=warmup + steps, batch=batch, lr=LR, warmup=warmup, log_every=warmup,
                             checkpoint_every=warmup + steps, keep=1, compile=device.type == "cuda")
    with tempfile.TemporaryDirectory() as folder:
        train(model, Denoising(PATH), x, None, settings, Path(folder), progress=False)
        log = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    sec, first = loop_seconds(log, batch, warmup, steps)
    return train_row("ours", "train.loop", batch, sec, first, flops, peaks, log[-1]["loss"])


def ours_sampler(cfg: dict, device: torch.device, compile: bool, batch: int) -> Callable[[int], Callable]:
    """nfe -> a thunk that runs diffkit's DDIM (eta 0) at that NFE on diffusers' trailing grid."""
    torch.manual_seed(0)
    net = fast.prepare(ours_net(cfg).eval(), device)  # eval: no dropout when sampling
    denoiser = fast.FastDenoiser(Precond(net, PATH, "eps"), device, compile=compile)

    def at(nfe: int) -> Callable:
        sigmas = grids.discrete(PATH.alphas_cumprod(), nfe, "trailing")
        x = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device) * float(sigmas[0])
        return lambda: samplers.ddim(denoiser, x, sigmas)
    return at


def diffusers_sampler(cfg: dict, device: torch.device, compile: bool, batch: int) -> Callable[[int], Callable]:
    """nfe -> a thunk that runs diffusers' DDIMScheduler loop (trailing spacing) on its net, as DDIMPipeline does."""
    torch.manual_seed(0)
    unet = fast.prepare(diffusers_net(cfg).eval(), device, compile=compile, graphs=True)

    def at(nfe: int) -> Callable:
        scheduler = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
        scheduler.set_timesteps(nfe)
        x = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)

        def loop() -> torch.Tensor:
            sample = x
            with torch.no_grad(), fast.autocast(device):
                for t in scheduler.timesteps:
                    sample = scheduler.step(unet(sample, t).sample, t, sample).prev_sample
            return sample
        return loop
    return at


def host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by one call of fn (None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_sample(name: str, compile: bool, batch: int, s: dict, device: torch.device) -> Iterator[dict]:
    """One row per NFE for one net, mode and batch; the net is built (and compiled) once for all of them."""
    at = (ours_sampler if name == "ours" else diffusers_sampler)(s["net"], device, compile, batch)
    for nfe in s["nfes"]:
        run = at(nfe)
        sec, first = timed(run, s["sample_warmup"], s["sample_repeats"], device)
        yield {"model": name, "mode": "compiled" if compile else "eager", "nfe": nfe, "batch": batch,
               "images_per_s": batch / sec, "seconds": sec, "warmup_s": first, "host_syncs": host_syncs(run, device),
               **({"profile": profile(run, device)} if s["profile"] else {})}


def settings_record(s: dict, device: torch.device) -> dict:
    """The settings every row shares, as written to the JSON (rows carry their own batch and NFE)."""
    cuda = device.type == "cuda"
    shared = {k: v for k, v in s.items() if k not in ("batches", "sample_batches", "nfes", "profile")}
    return {**shared, "diffusers_net": diffusers_config(s["net"]), "train_objective": "eps MSE, VPLinear (DDPM betas)",
            "lr": LR, "sampler": "DDIM eta 0, trailing timesteps", "precision": "bf16 autocast" if cuda else "fp32",
            "channels_last": True, "fused_adamw": True, "cudnn_benchmark": cuda,
            "compile": (f"inductor (mode={s['compile_mode']}; sampling: mode=reduce-overhead, CUDA graphs)" if cuda
                        else "aot_eager"),
            "threads": torch.get_num_threads()}


def start(s: dict, device: torch.device, file: Path, fresh: bool) -> dict:
    """The result this run adds rows to: the one in `file` if it was measured the same way, else a new one."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    new = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "settings": settings_record(s, device),
           "parameters": {m: sum(p.numel() for p in make(s["net"]).parameters())
                          for m, make in (("ours", ours_net), ("diffusers", diffusers_net))},
           "nominal_peak_flops": next((v for k, v in NOMINAL_BF16.items() if k in name), None),
           "gemm": None, "train": [], "sample": [], "commands": []}
    return results.resume(file, new, fresh)


def run(s: dict, device: torch.device, part: str, out: Path, fresh: bool, command: str) -> dict:
    """Measure the chosen part, saving after every row (a run cut short keeps what it measured)."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    r = start(s, device, out / "throughput.json", fresh)
    r["commands"] = [*r["commands"], command]
    r.update(headlines(r))
    save(r, out)
    models, modes = ("ours", "diffusers"), (False, True)
    if part in ("all", "train", "loop"):
        r["gemm"] = gemm_flops(device, s["gemm_n"], s["gemm_reps"])
        peaks = {"nominal": r["nominal_peak_flops"], "gemm": r["gemm"]["flops"]}
        flops = {m: train_flops_per_image(m, s["net"], device) for m in models}
    if part in ("all", "train"):
        for b, m, c in itertools.product(s["batches"], models, modes):
            add(r, "train", bench_train(m, c, b, s, device, flops[m], peaks))
            save(r, out)
            print(f"train {m} {'compiled' if c else 'eager'} batch {b}: done", file=sys.stderr, flush=True)
    if part in ("all", "loop"):
        for b in s["batches"]:
            add(r, "train", bench_loop(b, s, device, flops["ours"], peaks))
            save(r, out)
            print(f"train.loop batch {b}: done", file=sys.stderr, flush=True)
    if part in ("all", "sample"):
        for b, m, c in itertools.product(s["sample_batches"], models, modes):
            for row in bench_sample(m, c, b, s, device):
                add(r, "sample", row)
                save(r, out)
            print(f"sample {m} {'compiled' if c else 'eager'} batch {b}: done", file=sys.stderr, flush=True)
    return r


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 128,512, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run of a tiny net (CPU is fine)")
    parser.add_argument("--part", choices=("all", "train", "loop", "sample"), default="all",
                        help="train: the bare steps of both nets; loop: ours through diffkit.train.loop; sample")
    parser.add_argument("--batches", type=_ints, help="training batch sizes (default 128,512)")
    parser.add_argument("--sample-batches", type=_ints, help="sampling batch sizes (default 128,1024)")
    parser.add_argument("--nfes", type=_ints, help="sampling NFEs (default 1,10,35)")
    parser.add_argument("--compile-mode", help="torch.compile mode of the compiled training rows, both nets "
                                               "(e.g. max-autotune-no-cudagraphs; default: inductor's default)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each row: the top kernels by time and the share in matmul-like kernels")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to it")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        raise SystemExit("diffkit bench throughput: the full benchmark needs a GPU (--device cuda); on CPU use --quick")
    s = dict(QUICK if args.quick else FULL)
    s.update({k: v for k, v in (("batches", args.batches), ("sample_batches", args.sample_batches),
                                ("nfes", args.nfes), ("compile_mode", args.compile_mode)) if v is not None},
             profile=args.profile)
    command = "diffkit bench throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(s, device, args.part, args.out, args.fresh, command.strip())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
