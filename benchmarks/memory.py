"""Peak memory of one training step with and without gradient checkpointing (model.args grad_checkpoint: true),
for DiT-S/2 and the DDPM UNet on 32x32x3 images, batch 8, on the CPU.

    diffkit bench memory [--quick] [--out DIR]

Each (net, setting) runs in a fresh process that builds the net and a batch, takes one forward + backward pass
of the squared output to get one-time allocations (kernels, caches) out of the way, then measures two more:
1. seconds per pass (checkpointing recomputes each block's forward in the backward pass), and the peak resident
   memory over that pass minus the resident memory before it: what the operating system gave the step. glibc
   is told to return freed memory at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) and the kernel's
   peak (VmHWM) is reset before the pass (/proc/self/clear_refs), so it is this pass's peak alone (Linux).
2. the peak of the bytes held by torch's CPU allocator, summed in order from the profiler's memory events
   (every allocation and free), the CPU's counterpart of torch.cuda.max_memory_allocated (used on CUDA). The
   pass starts with no gradients and ends holding them, so this peak minus their size is the activations' peak.

Writes memory.json / memory.md under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MB = 2**20
# glibc hands freed memory back to the OS at once, so the resident set follows what is in use.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
NETS = {"dit": "DiT-S/2 (width 384, depth 12)", "unet": "DDPM UNet (channels 128, 35.7M)"}


def build(name: str, checkpointed: bool, quick: bool) -> torch.nn.Module:
    from diffkit.nets.dit import DiT
    from diffkit.nets.unet import UNet

    if name == "dit":
        return DiT(32, 3, **({"width": 64, "depth": 2, "heads": 2} if quick else {}), grad_checkpoint=checkpointed)
    return UNet(3, image_size=32, **({"channels": 32} if quick else {}), grad_checkpoint=checkpointed)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Make the kernel's peak resident set (VmHWM) the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _allocator_peak(prof) -> int:
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events))


def measure(name: str, checkpointed: bool, quick: bool) -> dict:
    """One (net, setting) in this process: the three passes of the module docstring."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build(name, checkpointed, quick).to(device).train()
    x, c = torch.randn(8, 3, 32, 32, device=device), torch.rand(8, device=device)

    def step():
        net.zero_grad(set_to_none=True)
        net(x, c).square().mean().backward()

    step()  # one-time allocations (kernels, caches) out of the way
    net.zero_grad(set_to_none=True)
    before = _rss()
    _reset_peak_rss()
    t0 = time.perf_counter()
    step()
    out = {"seconds_per_step": time.perf_counter() - t0, "peak_rss_delta_mb": (_peak_rss() - before) / MB}
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        peak = _allocator_peak(prof)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters())
    out |= {"allocator_peak_mb": peak / MB, "gradients_mb": grads / MB,
            "parameters": sum(p.numel() for p in net.parameters())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkit bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small nets, a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--one", nargs=2, metavar=("NET", "CHECKPOINTED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process of one measurement
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.quick)))
        return 0
    rows = []
    for name, checkpointed in itertools.product(NETS, (False, True)):
        cmd = [sys.executable, __file__, "--one", name, str(int(checkpointed))] + (["--quick"] if args.quick else [])
        root = str(Path(__file__).resolve().parents[1])  # diffkit importable from a checkout, as in this process
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               **MALLOC}
        child = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800, env=env)
        rows.append({"net": name, "grad_checkpoint": checkpointed, **json.loads(child.stdout.splitlines()[-1])})
    for plain, ck in zip(rows[::2], rows[1::2]):
        for r in (plain, ck):
            r["activations_peak_mb"] = r["allocator_peak_mb"] - r["gradients_mb"]
        ck["activations_vs_plain"] = ck["activations_peak_mb"] / plain["activations_peak_mb"]
        ck["rss_vs_plain"] = ck["peak_rss_delta_mb"] / plain["peak_rss_delta_mb"]
        ck["time_vs_plain"] = ck["seconds_per_step"] / plain["seconds_per_step"]
    result = {"command": "diffkit bench memory" + (" --quick" if args.quick else ""), "torch": torch.__version__,
              "device": "CUDA" if torch.cuda.is_available() else f"CPU ({platform.machine()}, 1 thread)",
              "batch": 8, "image": [3, 32, 32], "nets": NETS, "rows": rows}
    from diffkit import report

    columns = ["net", "grad_checkpoint", "parameters", "allocator_peak_mb", "gradients_mb", "activations_peak_mb",
               "activations_vs_plain", "peak_rss_delta_mb", "rss_vs_plain", "seconds_per_step", "time_vs_plain"]
    lines = ["# Gradient checkpointing: peak memory of one training step", "",
             f"`{result['command']}` on {result['device']}, torch {result['torch']}, batch 8 of 3x32x32. "
             "Peaks in MiB of one step after a warm-up step: torch's CPU allocator (profiler memory events; "
             "CUDA: max_memory_allocated), activations = that peak - gradients, and the resident set's growth "
             "(peak - start). Ratios: grad_checkpoint over plain.", "",
             report.table(rows, columns)]
    args.out.mkdir(parents=True, exist_ok=True)
    report.results(args.out, "memory", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
