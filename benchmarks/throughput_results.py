"""The throughput benchmark's results file: rows keyed and merged across runs, the headline ratios, the report.

Split from throughput.py, which measures; this module only keeps, compares and prints what was measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from diffkit import report


IDENTITY = ("device", "torch", "diffusers", "parameters", "settings")  # results that may share one file


def resume(file: Path, new: dict, fresh: bool) -> dict:
    """`new` with the rows already in `file` when they were measured the same way (same IDENTITY), else `new`."""
    if fresh or not file.exists():
        return new
    try:
        old = json.loads(file.read_text())
        same = all(old[k] == json.loads(json.dumps(new[k])) for k in IDENTITY)
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        print(f"{file} holds results measured another way (device, versions, net or settings): starting a new file",
              file=sys.stderr)
        return new
    return {**new, **{k: old[k] for k in ("gemm", "train", "sample", "commands")}}


MODES = ("eager", "compiled", "train.loop")  # train.loop: ours through diffkit.train.loop (no peer row)
KEYS = {"train": ("model", "mode", "batch"), "sample": ("model", "mode", "nfe", "batch")}


def add(r: dict, section: str, row: dict) -> None:
    """Put `row` into r[section], replacing a row with the same key; rows stay in a fixed order."""
    key = lambda x: tuple(x[k] for k in KEYS[section])  # noqa: E731
    r[section] = sorted([x for x in r[section] if key(x) != key(row)] + [row],
                        key=lambda x: (x["batch"], x.get("nfe", 0), x["model"] != "ours", MODES.index(x["mode"])))
    r.update(headlines(r))


def save(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.atomic_write(out / "throughput.json", json.dumps(r, indent=1))
    report.atomic_write(out / "throughput.md", markdown(r))


def ratio(rows: list[dict], **where) -> float | None:
    """images/s of ours over diffusers' in the compiled rows matching `where`; None if either is missing."""
    rate = {r["model"]: r["images_per_s"] for r in rows
            if r["mode"] == "compiled" and all(r[k] == v for k, v in where.items())}
    return rate["ours"] / rate["diffusers"] if {"ours", "diffusers"} <= set(rate) else None


def headlines(r: dict) -> dict:
    """The top-level ratios: training at batch 512; sampling at NFE 10 and the largest batch measured for both."""
    both = [b for b in sorted({row["batch"] for row in r["sample"]}, reverse=True)
            if ratio(r["sample"], nfe=10, batch=b) is not None]
    return {"train_speedup_vs_diffusers_compiled_bs512": ratio(r["train"], batch=512),
            "sampling_speedup_nfe10": ratio(r["sample"], nfe=10, batch=both[0]) if both else None,
            "sampling_speedup_nfe10_batch": both[0] if both else None}


TRAIN_COLUMNS = ["model", "mode", "batch", "images_per_s", "step_ms", "warmup_s", "gflop_per_image", "tflop_per_s",
                 "mfu_nominal", "mfu_vs_gemm", "loss"]
SAMPLE_COLUMNS = ["model", "mode", "nfe", "batch", "images_per_s", "seconds", "warmup_s", "host_syncs"]


def _table(rows: list[dict], columns: list[str]) -> str:
    return report.table([{k: "n/a" if v is None else v for k, v in row.items()} for row in rows], columns)


def _speedup(v: float | None) -> str:
    return "null (not measured)" if v is None else f"{v:.3g}x"


def _setup_text(r: dict) -> str:
    s, gemm = r["settings"], r["gemm"]
    nominal = f"{r['nominal_peak_flops'] / 1e12:.0f} TFLOP/s nominal bf16" if r["nominal_peak_flops"] else \
        "no nominal peak for this device"
    measured = (f"a {gemm['n']}^3 {gemm['dtype']} GEMM measured here at {gemm['flops'] / 1e12:.4g} TFLOP/s"
                if gemm else "a GEMM measured with the training rows")
    commands = "; ".join(f"`{c}`" for c in r["commands"])
    return (f"Commands: {commands}, on {r['device']}, torch {r['torch']}, diffusers {r['diffusers']}. "
            f"Net: {s['net']} (parameters: ours {r['parameters']['ours']:,}, "
            f"diffusers {r['parameters']['diffusers']:,}). "
            f"Both run with: {s['precision']}, channels_last, fused AdamW {s['fused_adamw']}, cudnn.benchmark "
            f"{s['cudnn_benchmark']}; compiled rows: {s['compile']}. Training: {s['train_warmup']} warm-up + "
            f"{s['train_steps']} timed steps. Sampling: {s['sampler']}, {s['sample_warmup']} warm-up + "
            f"{s['sample_repeats']} timed runs. warmup_s: the warm-up calls, compilation included. "
            f"MFU against {nominal} and against {measured}.")


def markdown(r: dict) -> str:
    pairs = sorted({(row["nfe"], row["batch"]) for row in r["sample"]})
    per_nfe = ", ".join(f"NFE {n} batch {b}: {_speedup(ratio(r['sample'], nfe=n, batch=b))}" for n, b in pairs)
    return "\n".join([
        "# Training and sampling throughput: our UNet next to diffusers' UNet2DModel", "", _setup_text(r), "",
        "## Training (forward + backward + AdamW step)", "", _table(r["train"], TRAIN_COLUMNS), "",
        f"Ours / diffusers, compiled, batch 512: {_speedup(r['train_speedup_vs_diffusers_compiled_bs512'])}.", "",
        "## Sampling (DDIM, deterministic)", "", _table(r["sample"], SAMPLE_COLUMNS), "",
        f"Ours / diffusers, compiled, images/s: {per_nfe or 'not measured'}.", "", *_profiles(r)])


def _profiles(r: dict) -> list[str]:
    """One table per profiled row: where its time goes."""
    out = []
    for section in ("train", "sample"):
        for row in r[section]:
            if "profile" in row:
                p, at = row["profile"], f"nfe {row['nfe']}, " if "nfe" in row else ""
                out += [f"### Profile: {section}, {row['model']} {row['mode']}, {at}batch {row['batch']}", "",
                        f"{p['total_ms_per_call']:.4g} ms of {'kernel' if r['device'] != 'cpu' else 'op'} time per "
                        f"call, {100 * p['matmul_share']:.1f}% in GEMM/conv/attention kernels (by name).", "",
                        report.table(p["top"], ["op", "ms_per_call", "share", "launches_per_call"]), ""]
    return (["## Profiles", ""] + out) if out else []
