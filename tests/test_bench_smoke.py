import json
import math

import pytest

from diffkit import cli, generate, run
from diffkit import config as configs
from diffkit.onestep import reflow

pytest.importorskip("diffusers")


def test_sampler_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "samplers", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sampler_accuracy.json").read_text())
    assert {t["target"] for t in res["targets"]} == {"ring2d", "digits64"}
    assert (tmp_path / "sampler_accuracy.md").exists() and (tmp_path / "sampler_accuracy.png").exists()
    for t in res["targets"]:
        labels = {r["label"] for r in t["rows"]}
        assert {"DPM++ 2M (karras)", "dpmpp_2m (calibrated grid)", "unipc bh2 order 2 (calibrated grid)"} <= labels
        assert {(c["sampler"], c["nfe"]) for c in t["calibration"]} >= {("dpmpp_3m (calibrated grid)", 10)}
        assert all(math.isfinite(r["median"]) for r in t["rows"] if "median" in r)
        assert set(t["verdict"]["per_nfe"]) == {"5", "10"}


def test_onestep_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "onestep", "--quick", "--data", "checkerboard", "--out", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "onestep.json").read_text())
    (data,) = res["datasets"]
    methods = {(r["method"], r["nfe"]) for r in data["rows"]}
    assert methods >= {("teacher", 35), ("shortcut", 1), ("2-RF distilled to 1 step", 1), ("SiD (alpha 1.2)", 4)}
    assert all(math.isfinite(r["distance"]) for r in data["rows"])
    # The couples of both reflow runs were drawn with the teacher's best sampler at 35 NFE.
    best = next(r for r in data["rows"] if r["method"] == "teacher")
    teacher_cfg = run.load_run(tmp_path / "work" / "checkerboard-teacher")[0]
    sigmas = generate.grid(configs.derive(teacher_cfg, [f"sample.grid={best['grid']}"]), best["steps"])
    for run_dir in ("checkerboard-2rf", "checkerboard-2rf-distilled"):
        meta = reflow._read_shard(tmp_path / "work" / run_dir / "couples" / "couples-00000.safetensors")[1]
        assert meta["sampler"] == best["sampler"]
        assert meta["sigmas"] == pytest.approx(sigmas.tolist())
    assert data["straightness"]["teacher"] > 0 and "Straightness" in (tmp_path / "onestep.md").read_text()
    assert (tmp_path / "onestep.md").exists() and (tmp_path / "onestep-checkerboard.png").exists()


@pytest.mark.slow  # about 2 CPU-minutes: 60 tiny runs over two data sets
def test_optimizers_benchmark_quick_writes_results(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    assert cli.main(["bench", "optimizers", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "training_stack.json").read_text())
    for data in ("digits", "checkerboard"):
        assert [r["optimizer"] for r in res[data]["summary"]] == ["adamw", "muon", "lion", "tiger"]
    assert {"muon_steps_to_target_over_adamw", "lion_steps_to_target_over_adamw",
            "tiger_steps_to_target_over_adamw", "scaling_holdout_rel_error"} <= set(res)
    assert set(res["lr_transfer_spectral"]) == set(res["lr_transfer_standard"]) == {"adamw", "muon"}
    assert [r["grad_clip"] for r in res["clip"]] == ["1.0", "auto", ".inf"]
    assert all(0 <= r["clipped_fraction"] <= 1 for r in res["clip"])
    assert set(res["scaling"]["fit"]) == {"E", "A", "B", "alpha", "beta"}
    assert math.isfinite(res["scaling_holdout_rel_error"]) and sum(r["held_out"] for r in res["scaling"]["rows"]) == 7
    assert all((tmp_path / f).exists() for f in ("training_stack.md", "training_stack.png", "training_stack-scaling.png"))


def test_tokenizer_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "tokenizers", "--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "tokenizers.json").read_text())
    for key in ("photos_psnr", "photos_usage", "digits_psnr", "digits_usage"):
        assert set(res[key]) == {"ste", "rotation", "simvq", "fsq"}
    assert all(0 < u <= 1 for u in res["photos_usage"].values())
    assert math.isfinite(res["digits_fd_latent"]) and math.isfinite(res["digits_fd_pixel"])
    # The latent run trained on the latents of the tokenizer the benchmark named as the best.
    cfg = run.load_run(tmp_path / "work" / f"digits-latent-{res['latent_tokenizer']}")[0]
    assert cfg.data.tokenizer.endswith(f"digits-{res['latent_tokenizer']}")
    assert (tmp_path / "tokenizers.png").exists() and (tmp_path / "tokenizers-reconstructions.png").exists()


def test_codec_benchmark_quick_writes_results(tmp_path):
    tiny = configs.load("configs/photos-unet.yaml", ["train.steps=2", "data.stride=32", "train.batch=8",
                                                     "model.args={channels: 8, channel_mult: [1], num_res_blocks: 1, "
                                                     "attn_resolutions: [], num_groups: 4}"])
    run.train_run(tiny, tmp_path / "photos", progress=False)
    assert cli.main(["bench", "codec", "--quick", "--run", str(tmp_path / "photos"), "--out", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "codec.json").read_text())
    assert {r["codec"] for r in res["rows"]} == {"DDCM", "JPEG", "WebP"}
    assert all(math.isfinite(r["psnr"]) and 0 < r["ms_ssim"] <= 1 for r in res["rows"])
    assert res["webp_min_bpp"] == min(r["bpp"] for r in res["rows"] if r["codec"] == "WebP")
    assert "ddcm_bpp_over_webp_at_webp_min_quality" in res and len(res["headline_per_photo"]) == 3
    assert (tmp_path / "codec.png").exists() and (tmp_path / "codec-reconstructions.png").exists()


def test_interop_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "interop", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "interop.json").read_text())
    assert {r["side"] for r in res["rows"]} == {"diffusers", "diffkit"}
    assert {r["sampler"] for r in res["rows"]} >= {"DPM++ 2M", "dpmpp_2m (calibrated grid)"}
    assert all(math.isfinite(r["digits_fd"]) for r in res["rows"])
    assert [b["nfe"] for b in res["best_by_nfe"]] == [4] and (tmp_path / "interop.md").exists()


@pytest.mark.slow
def test_finetune_benchmark_quick_writes_and_merges_sections(tmp_path):
    assert cli.main(["bench", "finetune", "--quick", "--only", "lowrank", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "finetune.json").read_text())
    rows = res["sections"]["lowrank"]["rows"]
    assert {(r["method"], r["rank"]) for r in rows} == {(m, r) for m in ("svd", "id", "cr", "cr (W I)") for r in (2, 8)}
    assert all(math.isfinite(r["digits_fd"]) and 0 < r["params_fraction"] < 1 for r in rows)
    assert cli.main(["bench", "finetune", "--quick", "--only", "moe", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "finetune.json").read_text())
    assert set(res["sections"]) == {"moe", "lowrank"}  # the lowrank section was kept
    assert set(res["moe_fd"]) == {"dense", "none", "aux_loss", "aux_free"} and res["moe_maxvio_none"] >= 0
    md = (tmp_path / "finetune.md").read_text()
    assert "| svd | 8 |" in md and "| aux_free |" in md and (tmp_path / "finetune.png").exists()


@pytest.mark.slow
def test_finetune_benchmark_adapters_section(tmp_path):
    assert cli.main(["bench", "finetune", "--quick", "--only", "adapters", "--out", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "finetune.json").read_text())["sections"]["adapters"]
    assert [s["method"] for s in res["summary"]] == ["lora", "lora_ga", "pissa", "full"]
    # every adapter starts where the base model is (its output unchanged at init), on the same held-out loss
    starts = {s["method"]: s["start_loss"] for s in res["summary"]}
    assert max(starts.values()) - min(starts.values()) < 1e-4
    assert {s["trainable_params"] for s in res["summary"][:3]} == {res["summary"][0]["trainable_params"]}
    assert res["summary"][3]["trainable_params"] == res["summary"][3]["total_params"]
    assert "loraga_steps_to_target_over_lora" in res and (tmp_path / "finetune.png").exists()


@pytest.mark.slow
def test_memory_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "memory", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "memory.json").read_text())
    assert [(r["net"], r["grad_checkpoint"]) for r in res["rows"]] == [("dit", False), ("dit", True),
                                                                       ("unet", False), ("unet", True)]
    for r in res["rows"][1::2]:  # checkpointing keeps fewer activations, by both measures
        assert r["activations_vs_plain"] < 0.8 and r["rss_vs_plain"] < 0.8
    assert (tmp_path / "memory.md").exists()
