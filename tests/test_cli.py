import json

import pytest

from diffkit import cli


def test_demo_fast_writes_every_promised_file(tmp_path):
    assert cli.main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert {p.name for p in run.iterdir()} == {"samples.png", "error_vs_nfe.png", "metrics.json", "report.md"}
    metrics = json.loads((run / "metrics.json").read_text())
    ode = {r["sampler"]: r for r in metrics["runs"] if r["nfe"] >= 34 and not r["stochastic"]}
    assert ode["dpmpp_2m"]["median_error"] < 0.05  # the exact target makes the demo's own numbers checkable
    assert "| dpmpp_2m |" in (run / "report.md").read_text()


def test_bench_unknown_name_is_an_error():
    with pytest.raises(SystemExit, match="unknown benchmark 'sampler'"):
        cli.main(["bench", "sampler"])
