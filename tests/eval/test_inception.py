"""FID's wrapper around torch-fidelity. Real Inception weights are never downloaded: the error paths run
everywhere; the call into torch-fidelity runs where it imports, with a randomly initialised Inception."""
import pathlib
import sys

import pytest
import torch

from diffkit.eval import inception


@pytest.fixture(autouse=True)
def _fresh_extractor():
    inception._extractor.cache_clear()
    yield
    inception._extractor.cache_clear()


def _plain_state_dict(tmp_path):
    path = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(2)}, path)
    return path


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        inception.fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), inception_weights=tmp_path / "absent.pth")


def test_weights_file_that_is_not_plain_tensors(tmp_path):
    pickled_object, garbage = tmp_path / "object.pth", tmp_path / "garbage.pth"
    torch.save(pathlib.PurePosixPath("code is not weights"), pickled_object)
    garbage.write_bytes(b"not a checkpoint")
    for path in (pickled_object, garbage):
        with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
            inception.inception_features(torch.zeros(2, 3, 8, 8), inception_weights=path)


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r"diffkit\[fid\]"):
        inception.inception_features(torch.zeros(2, 3, 8, 8), inception_weights=_plain_state_dict(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="feature must be one of"):
        inception.inception_features(torch.zeros(2, 3, 8, 8), inception_weights=tmp_path, feature="1000")
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        inception.inception_features(torch.zeros(2, 2, 8, 8), inception_weights=_plain_state_dict(tmp_path))


def test_fid_through_torch_fidelity_with_random_weights(tmp_path):
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as fe
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    except (ImportError, RuntimeError) as err:  # RuntimeError: torchvision built for another torch
        pytest.skip(f"torch-fidelity does not import here: {err}")
    with pytest.MonkeyPatch.context() as mp:  # build it without any weights, then save its random ones
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: None)
        net = fe.FeatureExtractorInceptionV3("random", ["64"])
    weights = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), weights)

    g = torch.Generator().manual_seed(0)
    grey, colour = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.rand(6, 3, 16, 16, generator=g) * 2 - 1

    def features(x, **options):
        return inception.inception_features(x, inception_weights=weights, feature="64", **options)

    a, b = features(colour), features(grey)
    by_hand = net(((colour + 1) * 127.5).round().to(torch.uint8))[0].double()
    assert a.shape == (6, 64) and torch.allclose(features(colour, batch_size=4), by_hand, atol=1e-6)
    assert torch.equal(b, features(grey.expand(-1, 3, -1, -1)))

    stats = fid_features_to_statistics(a), fid_features_to_statistics(b)
    theirs = fid_statistics_to_metric(*stats, verbose=False)
    ours = inception.fid(colour, grey, inception_weights=weights, feature="64")
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6) and ours > 0
    assert abs(inception.fid(colour, colour, inception_weights=weights, feature="64")) < 1e-6
