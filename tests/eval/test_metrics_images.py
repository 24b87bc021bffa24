import numpy as np
import pytest
import scipy.linalg
import torch

from diffkit import data
from diffkit.eval import digits, metrics

f64 = dict(dtype=torch.float64)


def _spd(g: torch.Generator, d: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, **f64)
    return a @ a.T + 0.1 * torch.eye(d, **f64)


def test_frechet_closed_form_for_commuting_covariances():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s.
    t = torch.tensor
    one_d = metrics.frechet_from_moments(t([1.0]), t([[4.0]]), t([-2.0]), t([[9.0]]))
    assert one_d == pytest.approx(9.0 + 1.0, abs=1e-12)
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert abs(metrics.frechet_from_moments(mu1, torch.diag(s1), mu2, torch.diag(s2)) - expected) < 1e-10


def test_frechet_general_case():
    g = torch.Generator().manual_seed(0)
    s1, s2, mu = _spd(g, 4), _spd(g, 4), torch.randn(4, generator=g, **f64)
    # For S2 = c^2 S1 it equals |dmu|^2 + (1 - c)^2 tr S1.
    expected = (4 * mu.pow(2).sum() + 4 * s1.trace()).item()
    assert metrics.frechet_from_moments(mu, s1, -mu, 9 * s1) == pytest.approx(expected, abs=1e-8)
    # Non-commuting covariances: the reference code's tr sqrtm(S1 S2), computed independently.
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    reference = (mu.pow(2).sum() + s1.trace() + s2.trace()).item() - 2 * np.trace(root).real
    fd = metrics.frechet_from_moments(mu, s1, 0 * mu, s2)
    assert fd == pytest.approx(reference, rel=1e-9)
    assert fd == pytest.approx(metrics.frechet_from_moments(0 * mu, s2, mu, s1), rel=1e-9)


def test_frechet_from_samples_matches_moments():
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0], **f64), torch.tensor([0.5, 0.0, -1.0], **f64)
    s1, s2 = _spd(g, 3), _spd(g, 3)
    x = mu1 + torch.randn(20000, 3, generator=g, **f64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(20000, 3, generator=g, **f64) @ torch.linalg.cholesky(s2).T
    assert metrics.frechet_distance(x, y) == pytest.approx(metrics.frechet_from_moments(mu1, s1, mu2, s2), rel=0.05)
    assert metrics.frechet_distance(x, y) == pytest.approx(metrics.frechet_distance(y, x), abs=1e-9)
    assert abs(metrics.frechet_distance(x, x)) < 1e-9


def test_frechet_with_singular_covariances():
    # Fewer samples than dimensions (rank-deficient covariances), as for FID on a few hundred images.
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(10, 20, generator=g) ** 3, torch.rand(10, 20, generator=g) ** 3
    assert abs(metrics.frechet_distance(x, x)) < 1e-7
    fd = metrics.frechet_distance(x, y)
    assert fd > 0.5 and fd == pytest.approx(metrics.frechet_distance(y, x), rel=1e-8)


def test_kid_is_zero_within_its_error_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    same, shifted = metrics.kid_subsets(x, y, subsets=20), metrics.kid_subsets(x, y + 0.5, subsets=20)
    assert abs(same.mean()) < 2 * same.std() and shifted.mean() > 5 * shifted.std() > 0


def test_shipped_classifier_accuracy():
    x, y = data.digits("test")
    assert digits.accuracy(x, y) >= 0.981  # stated in diffkit.eval.digits: 98.6%


def test_real_data_floor_is_far_below_broken_digits():
    train, _ = data.digits("train")
    test, _ = data.digits("test")
    n, g = len(test), torch.Generator().manual_seed(0)
    broken = {
        "noise": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
        "shuffled": test.reshape(n, -1)[:, torch.randperm(64, generator=g)].reshape(n, 1, 8, 8),
        "blurred": torch.nn.functional.avg_pool2d(torch.nn.functional.pad(test, (1, 1, 1, 1), value=-1.0), 3, 1),
    }
    f_train, f_test = digits.features(train), digits.features(test)
    floor, floor_kid = metrics.frechet_distance(f_train, f_test), metrics.kid_subsets(f_train, f_test)
    assert metrics.digits_fd(train, test) == floor and metrics.digits_kid(train, test) == floor_kid.mean().item()
    assert floor < 2 and abs(floor_kid.mean()) < 2 * floor_kid.std()  # measured: FD 0.79, KID -3.1 +- 3.6
    for name, x in broken.items():  # measured FD 110 / 140 / 318, KID 474 / 635 / 1544
        f = digits.features(x)
        assert metrics.frechet_distance(f, f_test) > 50 * floor, name
        assert metrics.kid(f, f_test, subsets=5) > 50 * floor_kid.std(), name


def test_features_check_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        digits.features(torch.zeros(2, 3, 8, 8))
