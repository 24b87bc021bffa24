import json
import pickle

import pytest
import torch

from diffkit.train import checkpoint


def sample_state():
    model = {"net.w": torch.randn(3, 4), "net.b": torch.zeros(4)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return model, opt.state_dict()


def test_round_trip_and_keep_last(tmp_path):
    model, opt = sample_state()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model=model, ema=model, optimizers=[opt], extra={"k": step},
                        config={"lr": 0.1}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003", "step-000000004"]
    ck = checkpoint.load(checkpoint.latest(tmp_path))
    assert ck.step == 4 and ck.extra == {"k": 4} and ck.config == {"lr": 0.1}
    for k in model:
        assert torch.equal(ck.model[k], model[k])
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    restored.load_state_dict(ck.optimizers[0])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    model, opt = sample_state()
    path = checkpoint.save(tmp_path, 1, model=model, ema=model, optimizers=[opt], extra={}, config={})
    target = path / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:40])
    elif damage == "garbage":
        target.write_bytes(b"\x00" * 100)
    else:
        target.unlink()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_no_pickle_is_ever_loaded(tmp_path, monkeypatch):
    model, opt = sample_state()
    path = checkpoint.save(tmp_path, 1, model=model, ema=model, optimizers=[opt], extra={}, config={})

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert checkpoint.load(path).step == 1


def test_bytes_damaged_in_place_fail_their_checksum_and_the_previous_checkpoint_is_used(tmp_path, damage):
    model, opt = sample_state()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model=model, ema=model, optimizers=[opt], extra={}, config={})
    newest = checkpoint.latest(tmp_path)
    damage(newest / "ema.safetensors")
    with pytest.raises(ValueError, match="step-000000002 is corrupt or truncated: ema.safetensors does not match"):
        checkpoint.load(newest)
    with pytest.warns(UserWarning, match="step-000000002 is corrupt.* Using the newest good checkpoint, .*step-000000001"):
        assert checkpoint.load_latest(tmp_path).step == 1
    damage(tmp_path / "checkpoints" / "step-000000001" / "model.safetensors")
    with pytest.raises(ValueError, match="no checkpoint of .* is intact: .*step-000000002.*step-000000001.*new run folder"):
        checkpoint.load_latest(tmp_path)


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    model, opt = sample_state()
    path = checkpoint.save(tmp_path, 1, model=model, ema=model, optimizers=[opt], extra={}, config={})
    assert set(json.loads((path / "checksums.json").read_text())) == {
        "model.safetensors", "ema.safetensors", "state.safetensors", "config.yaml"}
    (path / "checksums.json").unlink()
    assert checkpoint.load_latest(tmp_path).step == 1


def test_saving_a_step_drops_the_checkpoints_past_it(tmp_path):
    """A run that resumed from step 1 (step 2 was bad) replaces what came after it as it goes."""
    model, opt = sample_state()
    for step in (1, 2, 1):
        checkpoint.save(tmp_path, step, model=model, ema=model, optimizers=[opt], extra={}, config={})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000001"]
