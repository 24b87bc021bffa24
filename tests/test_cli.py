import pytest

from diffkit import cli


def test_bench_unknown_name_is_an_error():
    with pytest.raises(SystemExit, match="unknown benchmark 'sampler'"):
        cli.main(["bench", "sampler"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="config file .* not found"):
        cli.main(["train", str(tmp_path / "nope.yaml")])
