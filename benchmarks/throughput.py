"""Training and sampling throughput of our UNet next to diffusers' UNet2DModel, on one device, in one run.

Both nets are built at the same configuration (default: DDPM's CIFAR-10 net, 35.7M parameters; diffusers' blocks
with the same attention levels, head width and dropout) and run the same way, with PyTorch's own tools: bf16
autocast and fused AdamW on CUDA, channels_last weights, cudnn.benchmark, and in the "compiled" rows
torch.compile (diffkit.train.fast; inductor on CUDA, aot_eager elsewhere). Nothing in either net is rewritten.

Training: one step is the real objective's forward + backward + AdamW step: ours is diffkit.objectives.Denoising
on Precond(UNet, VPLinear, "eps"); diffusers' is the eps-prediction MSE of its training example (DDPMScheduler
.add_noise, integer t). FLOPs per image come from torch.utils.flop_counter (forward + backward, 2 FLOPs per
multiply-add, attention counted through its math kernels); MFU is achieved FLOP/s over the nominal dense bf16
peak (H100 / H200 SXM: 989 TFLOP/s, H100 PCIe: 756) and over a large bf16 GEMM measured in this run.

Sampling: images/s of a deterministic DDIM loop at each NFE: ours is diffkit.samplers.ddim over a FastDenoiser
(one CUDA graph per step when compiled on CUDA); diffusers' is its DDIMScheduler loop on its net, compiled with
mode="reduce-overhead" as diffusers' documentation recommends. "host_syncs" counts synchronizing CUDA calls in
one run of the loop (torch.cuda.set_sync_debug_mode).

    diffkit bench throughput [--quick] [--out DIR] [--device DEV]

Writes throughput.json / .md under --out (default benchmarks/results). The JSON's top level carries `device` and the
headline ratios of images/s, ours over diffusers', both compiled and measured in this run (null when not measured):
`train_speedup_vs_diffusers_compiled_bs512` and `sampling_speedup_nfe10`. --quick is a seconds-long smoke run of a
tiny net (on CPU: the same tables, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffkit import grids, report, samplers
from diffkit.nets.unet import UNet
from diffkit.objectives import Denoising
from diffkit.paths import VPLinear
from diffkit.precond import Precond
from diffkit.train import fast

warnings.filterwarnings("ignore", category=FutureWarning)
import diffusers  # noqa: E402

CIFAR = {"channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,),
         "image_size": 32, "dropout": 0.1, "head_channels": 64}
FULL = {"net": CIFAR, "batches": (128, 512), "train_warmup": 5, "train_steps": 20, "sample_batch": 128,
        "nfes": (1, 10, 35), "sample_warmup": 3, "sample_repeats": 5, "gemm_n": 8192, "gemm_reps": 50}
QUICK = {"net": {**CIFAR, "channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
                 "image_size": 16},
         "batches": (4,), "train_warmup": 1, "train_steps": 2, "sample_batch": 4, "nfes": (1, 2), "sample_warmup": 1,
         "sample_repeats": 1, "gemm_n": 256, "gemm_reps": 3}
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


def train_setup(name: str, cfg: dict, device: torch.device, compile: bool) -> tuple[Callable, torch.optim.Optimizer]:
    """(loss(x0, gen), optimizer) for "ours" or "diffusers", the net on `device`, seeded, compiled if asked."""
    torch.manual_seed(0)
    if name == "ours":
        model = Precond(fast.prepare(ours_net(cfg), device, compile=compile), PATH, "eps")
        return (lambda x0, gen: ours_loss(model, x0, gen)), fast.adamw(model.parameters(), device, LR)
    unet = fast.prepare(diffusers_net(cfg), device, compile=compile)
    scheduler = diffusers.DDPMScheduler()
    return (lambda x0, gen: diffusers_loss(unet, scheduler, x0, gen)), fast.adamw(unet.parameters(), device, LR)


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


def seconds_per_call(fn: Callable[[], object], warmup: int, calls: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def gemm_flops(device: torch.device, n: int, reps: int) -> dict:
    """FLOP/s of an n x n x n matmul, bf16 on CUDA (fp32 elsewhere): the practical peak MFU is also read against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec = seconds_per_call(lambda: a @ b, 2, reps, device)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * n**3 / sec}


def bench_train(name: str, compile: bool, batch: int, s: dict, device: torch.device, flops: float, peaks: dict) -> dict:
    loss, opt = train_setup(name, s["net"], device, compile)
    size = s["net"]["image_size"]
    x0 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device).manual_seed(0)
    last = {}
    sec = seconds_per_call(lambda: last.update(loss=train_step(lambda: loss(x0, gen), opt, device)),
                           s["train_warmup"], s["train_steps"], device)
    achieved = flops * batch / sec
    return {"model": name, "mode": "compiled" if compile else "eager", "batch": batch, "images_per_s": batch / sec,
            "step_ms": 1e3 * sec, "gflop_per_image": flops / 1e9, "tflop_per_s": achieved / 1e12,
            "mfu_nominal": achieved / peaks["nominal"] if peaks["nominal"] else None,
            "mfu_vs_gemm": achieved / peaks["gemm"], "loss": last["loss"].item()}


def ours_sampler(cfg: dict, device: torch.device, compile: bool, batch: int) -> Callable[[int], Callable]:
    """nfe -> a thunk that runs diffkit's DDIM (eta 0) at that NFE on diffusers' trailing grid."""
    torch.manual_seed(0)
    denoiser = fast.FastDenoiser(Precond(fast.prepare(ours_net(cfg), device), PATH, "eps"), device, compile=compile)

    def at(nfe: int) -> Callable:
        sigmas = grids.discrete(PATH.alphas_cumprod(), nfe, "trailing")
        x = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device) * float(sigmas[0])
        return lambda: samplers.ddim(denoiser, x, sigmas)
    return at


def diffusers_sampler(cfg: dict, device: torch.device, compile: bool, batch: int) -> Callable[[int], Callable]:
    """nfe -> a thunk that runs diffusers' DDIMScheduler loop (trailing spacing) on its net."""
    torch.manual_seed(0)
    unet = fast.prepare(diffusers_net(cfg), device, compile=compile, graphs=True)

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


def bench_sample(name: str, compile: bool, s: dict, device: torch.device) -> list[dict]:
    make = ours_sampler if name == "ours" else diffusers_sampler
    at, batch, rows = make(s["net"], device, compile, s["sample_batch"]), s["sample_batch"], []
    for nfe in s["nfes"]:
        run = at(nfe)
        sec = seconds_per_call(run, s["sample_warmup"], s["sample_repeats"], device)
        rows.append({"model": name, "mode": "compiled" if compile else "eager", "nfe": nfe, "batch": batch,
                     "images_per_s": batch / sec, "seconds": sec, "host_syncs": host_syncs(run, device)})
    return rows


def ratio(rows: list[dict], **where) -> float | None:
    """images/s of ours over diffusers' in the compiled rows matching `where`; None if either is missing."""
    rate = {r["model"]: r["images_per_s"] for r in rows
            if r["mode"] == "compiled" and all(r[k] == v for k, v in where.items())}
    return rate["ours"] / rate["diffusers"] if {"ours", "diffusers"} <= set(rate) else None


def settings_record(s: dict, device: torch.device) -> dict:
    """Every setting the numbers depend on, as written to the JSON."""
    cuda = device.type == "cuda"
    return {**s, "diffusers_net": diffusers_config(s["net"]), "train_objective": "eps MSE, VPLinear (DDPM betas)",
            "lr": LR, "sampler": "DDIM eta 0, trailing timesteps", "precision": "bf16 autocast" if cuda else "fp32",
            "channels_last": True, "fused_adamw": cuda, "cudnn_benchmark": cuda,
            "compile": "inductor (sampling: mode=reduce-overhead, CUDA graphs)" if cuda else "aot_eager",
            "threads": torch.get_num_threads()}


def run_all(s: dict, device: torch.device) -> dict:
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gemm = gemm_flops(device, s["gemm_n"], s["gemm_reps"])
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
    peaks = {"nominal": nominal, "gemm": gemm["flops"]}
    flops = {m: train_flops_per_image(m, s["net"], device) for m in ("ours", "diffusers")}
    params = {m: sum(p.numel() for p in make(s["net"]).parameters())
              for m, make in (("ours", ours_net), ("diffusers", diffusers_net))}
    train = [bench_train(m, c, b, s, device, flops[m], peaks)
             for b in s["batches"] for m in ("ours", "diffusers") for c in (False, True)]
    sample = [row for m in ("ours", "diffusers") for c in (False, True) for row in bench_sample(m, c, s, device)]
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "settings": settings_record(s, device), "parameters": params, "gemm": gemm,
            "nominal_peak_flops": nominal, "train": train, "sample": sample,
            "train_speedup_vs_diffusers_compiled_bs512": ratio(train, batch=512),
            "sampling_speedup_nfe10": ratio(sample, nfe=10)}


TRAIN_COLUMNS = ["model", "mode", "batch", "images_per_s", "step_ms", "gflop_per_image", "tflop_per_s", "mfu_nominal",
                 "mfu_vs_gemm", "loss"]
SAMPLE_COLUMNS = ["model", "mode", "nfe", "batch", "images_per_s", "seconds", "host_syncs"]


def _table(rows: list[dict], columns: list[str]) -> str:
    return report.table([{k: "n/a" if v is None else v for k, v in row.items()} for row in rows], columns)


def _speedup(v: float | None) -> str:
    return "null (not measured)" if v is None else f"{v:.3g}x"


def _setup_text(r: dict) -> str:
    s, gemm = r["settings"], r["gemm"]
    nominal = f"{r['nominal_peak_flops'] / 1e12:.0f} TFLOP/s nominal bf16" if r["nominal_peak_flops"] else \
        "no nominal peak for this device"
    return (f"Command: `{r['command']}` on {r['device']}, torch {r['torch']}, diffusers {r['diffusers']}. "
            f"Net: {s['net']} (parameters: ours {r['parameters']['ours']:,}, "
            f"diffusers {r['parameters']['diffusers']:,}). "
            f"Both run with: {s['precision']}, channels_last, fused AdamW {s['fused_adamw']}, cudnn.benchmark "
            f"{s['cudnn_benchmark']}; compiled rows: {s['compile']}. Training: {s['train_warmup']} warm-up + "
            f"{s['train_steps']} timed steps. Sampling: {s['sampler']}, batch {s['sample_batch']}, "
            f"{s['sample_warmup']} warm-up + {s['sample_repeats']} timed runs. MFU against {nominal} and against a "
            f"{gemm['n']}^3 {gemm['dtype']} GEMM measured here at {gemm['flops'] / 1e12:.4g} TFLOP/s.")


def markdown(r: dict) -> str:
    per_nfe = ", ".join(f"NFE {n}: {_speedup(ratio(r['sample'], nfe=n))}" for n in r["settings"]["nfes"])
    return "\n".join([
        "# Training and sampling throughput: our UNet next to diffusers' UNet2DModel", "", _setup_text(r), "",
        "## Training (forward + backward + AdamW step)", "", _table(r["train"], TRAIN_COLUMNS), "",
        f"Ours / diffusers, compiled, batch 512: {_speedup(r['train_speedup_vs_diffusers_compiled_bs512'])}.", "",
        "## Sampling (DDIM, deterministic)", "", _table(r["sample"], SAMPLE_COLUMNS), "",
        f"Ours / diffusers, compiled, images/s: {per_nfe}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run of a tiny net (CPU is fine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        raise SystemExit("diffkit bench throughput: the full benchmark needs a GPU (--device cuda); on CPU use --quick")
    result = {"command": "diffkit bench throughput" + (" --quick" if args.quick else ""),
              **run_all(QUICK if args.quick else FULL, device)}
    args.out.mkdir(parents=True, exist_ok=True)
    report.atomic_write(args.out / "throughput.json", json.dumps(result, indent=1))
    report.atomic_write(args.out / "throughput.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
