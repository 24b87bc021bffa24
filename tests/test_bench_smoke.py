import json
import math
from pathlib import Path

import pytest

from diffkit import cli

pytest.importorskip("diffusers")


def test_sampler_benchmark_quick_writes_results(tmp_path):
    assert cli.main(["bench", "samplers", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sampler_accuracy.json").read_text())
    assert {t["target"] for t in res["targets"]} == {"ring2d", "digits64"}
    assert (tmp_path / "sampler_accuracy.md").exists() and (tmp_path / "sampler_accuracy.png").exists()
    for t in res["targets"]:
        labels = {r["label"] for r in t["rows"]}
        assert "DPM++ 2M (karras)" in labels and "dpmpp_2m (calibrated grid)" in labels
        assert all(math.isfinite(r["median"]) for r in t["rows"] if "median" in r)
        assert set(t["verdict"]["per_nfe"]) == {"5", "10"}
