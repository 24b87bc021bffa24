"""Low-rank tools against their theorems: Eckart-Young, Moore-Penrose, the ID's exact skeleton, CR's unbiasedness
and expected error (Drineas-Kannan-Mahoney 2006), randomized vs exact SVD, and model compression."""
import math

import pytest
import torch
from torch import nn

from diffkit import lowrank


def matrix(m: int, n: int, seed: int = 0, decay: float | None = None) -> torch.Tensor:
    """A random (m, n) float64 matrix; with `decay`, singular values decay^i."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    if decay is None:
        return a
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u * decay ** torch.arange(min(m, n), dtype=torch.float64) @ vh


def frob(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x).item()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_eckart_young_svd_error_is_the_tail_and_nothing_tried_beats_it(k):
    a = matrix(30, 20)
    s = torch.linalg.svdvals(a)
    f = lowrank.svd(a, k)
    err = a - f.left @ f.right
    assert frob(err) ** 2 == pytest.approx(s[k:].square().sum().item(), rel=1e-10)
    assert torch.linalg.matrix_norm(err, 2).item() == pytest.approx(s[k].item(), rel=1e-10)
    # Other rank-k approximations: the ID, the best fit in span of CR's and of random columns (C pinv(C) a),
    # the randomized SVD, a perturbed SVD.
    g = torch.Generator().manual_seed(1)
    idf = lowrank.interpolative_decomposition(a, k)
    c = lowrank.cr(a, torch.eye(20, dtype=a.dtype), k, generator=g).left
    rand = a[:, torch.randperm(20, generator=g)[:k]]
    rsvd = lowrank.svd(a, k, randomized=True, oversample=0, niter=0)
    others = [idf.left @ idf.right, c @ torch.linalg.pinv(c) @ a, rand @ torch.linalg.pinv(rand) @ a,
              rsvd.left @ rsvd.right, (f.left + 1e-3 * torch.randn(30, k, generator=g, dtype=a.dtype)) @ f.right]
    for other in others:
        assert torch.linalg.matrix_rank(other) <= k
        assert frob(a - other) > frob(err) * (1 + 1e-9)


def test_pinv_meets_the_moore_penrose_conditions_and_solves_least_squares():
    a = matrix(8, 3, 2) @ matrix(3, 6, 3)  # rank 3, so no inverse of any kind but the pseudo-inverse
    p = torch.linalg.pinv(a)
    for lhs, rhs in ((a @ p @ a, a), (p @ a @ p, p), ((a @ p).mT, a @ p), ((p @ a).mT, p @ a)):
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)
    # argmin_B ||a B - M||_F is pinv(a) M, and of all minimisers it has the least norm.
    m = matrix(8, 4, 4)
    b = p @ m
    null = torch.eye(6, dtype=a.dtype) - p @ a  # projects on a's null space
    other = b + null @ matrix(6, 4, 5)
    assert frob(a @ other - m) == pytest.approx(frob(a @ b - m), rel=1e-10)
    assert frob(other) > frob(b)
    assert frob(a @ (b + 1e-3 * matrix(6, 4, 6)) - m) > frob(a @ b - m)


@pytest.mark.parametrize("randomized", [False, True])
def test_id_reproduces_its_skeleton_exactly_and_recovers_a_rank_k_matrix(randomized):
    a = matrix(40, 25, 7).float()
    f = lowrank.interpolative_decomposition(a, 6, randomized=randomized)
    assert f.left.dtype == torch.float32 and f.columns.shape == (6,)
    assert torch.equal(f.left, a[:, f.columns])
    assert torch.equal((f.left @ f.right)[:, f.columns], a[:, f.columns])  # bit for bit
    low = matrix(40, 6, 8) @ matrix(6, 25, 9)
    g = lowrank.interpolative_decomposition(low, 6, randomized=randomized)
    assert frob(low - g.left @ g.right) < 1e-12 * frob(low)


def test_deterministic_id_error_is_the_projection_on_its_skeleton_and_never_grows_with_rank():
    a = matrix(30, 20, 10, decay=0.8)
    errors = []
    for k in range(1, 20):
        f = lowrank.interpolative_decomposition(a, k)
        projected = f.left @ torch.linalg.pinv(f.left) @ a
        errors.append(frob(a - f.left @ f.right))
        assert errors[-1] == pytest.approx(frob(a - projected), rel=1e-6)
    assert all(e1 <= e0 for e0, e1 in zip(errors, errors[1:]))


def cr_setup():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(10, 40, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    b = torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, 40, dtype=torch.float64)[:, None]
    return a, b


def test_cr_is_unbiased_and_its_mean_error_is_the_dkm_formula():
    a, b = cr_setup()
    c, draws = 5, 4000
    g = torch.Generator().manual_seed(0)
    exact = a @ b
    norms = torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=1)
    expected = (norms.sum().item() ** 2 - frob(exact) ** 2) / c  # E||AB - CR||_F^2 at the optimal p
    total, sq = torch.zeros_like(exact), 0.0
    for _ in range(draws):
        f = lowrank.cr(a, b, c, generator=g)
        total += f.left @ f.right
        sq += frob(exact - f.left @ f.right) ** 2 / draws
    assert sq == pytest.approx(expected, rel=0.05)
    # The mean of `draws` independent estimates has E||mean - AB||^2 = expected / draws; a bias shows as more.
    assert frob(total / draws - exact) ** 2 < 2 * expected / draws


def test_cr_merges_repeated_draws_and_keeps_only_drawn_columns():
    a, b = cr_setup()
    f = lowrank.cr(a, b, 200, generator=torch.Generator().manual_seed(1))
    assert f.left.shape[1] == f.columns.numel() < 40
    torch.testing.assert_close(f.right, b[f.columns])


def test_randomized_svd_is_near_exact_on_a_decaying_spectrum():
    a = matrix(200, 120, 12, decay=0.9)
    for k in (5, 10, 20):
        exact = lowrank.svd(a, k)
        fast = lowrank.svd(a, k, randomized=True, seed=3)
        e_exact, e_fast = frob(a - exact.left @ exact.right), frob(a - fast.left @ fast.right)
        assert e_exact * (1 - 1e-12) <= e_fast < 1.001 * e_exact
        crude = lowrank.svd(a, k, randomized=True, oversample=0, niter=0, seed=3)
        assert frob(a - crude.left @ crude.right) > 1.2 * e_exact  # oversampling and power steps matter here
    again = lowrank.svd(a, 5, randomized=True, seed=3)
    assert torch.equal(again.left, lowrank.svd(a, 5, randomized=True, seed=3).left)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("method", ["svd", "id"])
def test_full_rank_compression_reproduces_the_model(method):
    model, x = small_model(), torch.randn(32, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, rows = lowrank.compress(model, 6, method=method)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert [r["rank"] for r in rows] == [6, 6, None]  # the last layer (min dim 3 < 6) is kept
    assert [r["params_after"] for r in rows] == [6 * 15 + 9, 6 * 15 + 6, 6 * 3 + 3]
    assert isinstance(small[4], nn.Linear) and isinstance(small[0], nn.Sequential)
    assert max(r["rel_error"] for r in rows) < 1e-12


def test_compression_error_falls_with_rank():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    out = model(x)
    for method in ("svd", "id"):
        errors, layer_errors = [], []
        for r in range(1, 17):
            small, rows = lowrank.compress(model, r, method=method)
            errors.append(frob(small(x) - out))
            layer_errors.append([row["rel_error"] for row in rows])
        assert all(b <= a * (1 + 1e-9) for la, lb in zip(layer_errors, layer_errors[1:]) for a, b in zip(la, lb))
        if method == "svd":
            assert all(b < a for a, b in zip(errors, errors[1:]))
        assert errors[-1] < 1e-12 < errors[0]
    # CR: the mean error over seeds falls as the draws grow.
    mean = [sum(lowrank.compress(model, r, method="cr", seed=s)[1][0]["rel_error"] for s in range(20)) / 20
            for r in (2, 6, 16)]
    assert mean[0] > mean[1] > mean[2]


def test_cr_compression_uses_the_calibration_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8)).double()
    x = torch.randn(100, 8, dtype=torch.float64)
    x[:, 3] = 0  # a dead input feature: its column of W never matters, so CR of W X never draws it
    small, rows = lowrank.compress(model, 8, method="cr", calibrate=lambda m: m(x), seed=0)
    assert small[0][0].weight[:, 3].abs().sum() == 0
    assert 3 not in set(torch.nonzero(small[0][0].weight)[:, 1].tolist())
    _, plain = lowrank.compress(model, 8, method="cr", seed=0)
    assert rows[0]["rel_error"] != plain[0]["rel_error"]
    with pytest.raises(ValueError, match="never called"):
        lowrank.compress(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), 2, method="cr",
                         calibrate=lambda m: m[0](x.float()))


def test_bad_input_is_refused_with_what_to_do():
    a = matrix(5, 4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
            lowrank.svd(a, bad)
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
            lowrank.interpolative_decomposition(a, bad)
    with pytest.raises(ValueError, match="expected a matrix"):
        lowrank.svd(torch.ones(3), 1)
    with pytest.raises(ValueError, match="a \\(m, n\\) and b \\(n, p\\)"):
        lowrank.cr(a, matrix(5, 2), 3)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        lowrank.cr(a, matrix(4, 2), 0)
    with pytest.raises(ValueError, match="nothing|no nonzero"):
        lowrank.cr(torch.zeros(5, 4), matrix(4, 2), 3)
    with pytest.raises(ValueError, match="unknown method 'qr'; choose one of: svd, cr, id"):
        lowrank.compress(small_model(), 2, method="qr")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lowrank.compress(small_model(), 0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lowrank.compress(nn.Tanh(), 2)


def test_a_lone_linear_is_compressed_too():
    layer = nn.Linear(5, 4).double()
    small, rows = lowrank.compress(layer, 2)
    assert isinstance(small, nn.Sequential) and rows[0]["rank"] == 2
    s = torch.linalg.svdvals(layer.weight.detach())
    assert rows[0]["rel_error"] == pytest.approx(math.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()), rel=1e-10)
