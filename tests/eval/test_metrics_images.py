import math

import pytest
import torch

from diffkit import data
from diffkit.eval import digits, metrics


def test_frechet_closed_form_for_commuting_covariances():
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert abs(metrics.frechet_from_moments(mu1, torch.diag(s1), mu2, torch.diag(s2)) - expected) < 1e-10


def test_frechet_general_case_against_rotation_invariance():
    # FD is invariant under a common rotation; for S2 = c^2 S1 it equals |dmu|^2 + (1 - c)^2 tr S1.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    s1 = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64)
    mu = torch.randn(4, generator=g, dtype=torch.float64)
    fd = metrics.frechet_from_moments(mu, s1, -mu, 9 * s1)
    assert abs(fd - (4 * mu.pow(2).sum() + 4 * s1.trace()).item()) < 1e-8


def test_frechet_and_kid_from_samples():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    assert metrics.frechet_distance(x, y) < 0.01 and abs(metrics.frechet_distance(x, y) - metrics.frechet_distance(y, x)) < 1e-9
    assert abs(metrics.frechet_distance(x, y + 1) - 3.0) < 0.1
    same, shifted = metrics.kid(x, y, subsets=20), metrics.kid(x, y + 0.5, subsets=20)
    assert abs(same) < 0.01 < shifted


def test_shipped_classifier_accuracy():
    x, y = data.digits("test")
    assert digits.accuracy(x, y) >= 0.981  # stated in diffkit.eval.digits: 98.6%


def test_real_data_floor_is_far_below_broken_digits():
    train, _ = data.digits("train")
    test, _ = data.digits("test")
    n = len(test)
    shuffled = test.reshape(n, -1)[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))].reshape(n, 1, 8, 8)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(test, (1, 1, 1, 1), value=-1.0), 3, 1)
    floor = metrics.digits_fd(train, test)  # measured: 0.80
    assert floor < 2 and metrics.digits_fd(shuffled, test) > 50 * floor and metrics.digits_fd(blurred, test) > 50 * floor
    assert metrics.digits_kid(shuffled, test) > 100 * abs(metrics.digits_kid(train, test))


def test_features_check_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        digits.features(torch.zeros(2, 3, 8, 8))
