"""The gradient noise scale on a quadratic with known gradient covariance, and the batch-size lr rules."""
import pytest
import torch

from diffkit.train import batchsize

THETA, MU = torch.tensor([1.0, -0.5, 0.25, 2.0]), torch.zeros(4)
STD = torch.tensor([3.0, 1.0, 0.5, 2.0])  # per-sample gradient covariance diag(STD^2)


def quadratic_grad(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Mean gradient of l(theta; x) = |theta - x|^2 / 2 over x ~ N(MU, diag(STD^2)): theta - mean(x)."""
    x = MU + STD * torch.randn(batch, 4, generator=gen)
    return THETA - x.mean(0)


def test_the_estimator_recovers_the_known_noise_scale():
    exact = STD.square().sum() / (THETA - MU).square().sum()  # tr(Sigma) / |G|^2 = 14.25 / 5.3125
    ns = batchsize.noise_scale(quadratic_grad, small=4, big=64, pairs=4000)
    assert ns.trace == pytest.approx(STD.square().sum().item(), rel=0.05)
    assert ns.grad_sq == pytest.approx(5.3125, rel=0.05)
    assert ns.b_noise == pytest.approx(exact.item(), rel=0.07)


def test_the_naive_big_batch_norm_is_biased_and_the_estimator_is_not():
    """|G_B|^2 alone overestimates |G|^2 by tr(Sigma)/B: the two-batch estimator removes exactly that."""
    gen = torch.Generator().manual_seed(1)
    naive = sum(quadratic_grad(8, gen).square().sum().item() for _ in range(4000)) / 4000
    assert naive == pytest.approx(5.3125 + 14.25 / 8, rel=0.05)


def test_lr_rules_in_their_limits():
    # SGD: linear far below B_noise, flat far above.
    assert batchsize.sgd_lr(1e-3, 32, 64, b_noise=1e6) == pytest.approx(2e-3, rel=1e-3)
    assert batchsize.sgd_lr(1e-3, 32, 64, b_noise=1e-3) == pytest.approx(1e-3, rel=1e-3)
    # Adam with eps << g_rms: square root far below B_noise; with eps >> g_rms: SGD's rule.
    assert batchsize.adam_lr(1e-3, 32, 128, 1e6, g_rms=1.0, eps=0.0) == pytest.approx(2e-3, rel=1e-3)
    assert batchsize.adam_lr(1e-3, 32, 128, 1e6, g_rms=1e-9, eps=1.0) == pytest.approx(4e-3, rel=1e-3)
    assert batchsize.adam_lr(1e-3, 32, 128, 100.0, 1e-9, 1.0) == pytest.approx(batchsize.sgd_lr(1e-3, 32, 128, 100.0))
    with pytest.raises(ValueError, match="small < big"):
        batchsize.noise_scale(quadratic_grad, small=8, big=8, pairs=1)


def test_tune_batch_prints_the_noise_scale_and_each_rule(tmp_path, capsys):
    from diffkit import cli

    out = tmp_path / "run"
    cli.main(["train", "train.steps=20", "train.batch=32", "train.warmup=2", "train.checkpoint_every=20",
              "train.optimizer=lion", "train.lr=1e-4", "model.args={width: 16, depth: 1}", "sample.steps=2",
              "--out", str(out)])
    capsys.readouterr()
    assert cli.main(["tune", "batch", str(out), "--batch", "64", "--pairs", "4", "--big", "64"]) == 0
    text = capsys.readouterr().out
    assert "B_noise = tr(Sigma)/|G|^2" in text and "McCandlish eq. 2.7" in text
    (row,) = [line.split() for line in text.splitlines() if line.split()[:1] == ["64"]]
    assert float(row[3]) == pytest.approx(1e-4 * 2 ** 0.5, rel=1e-3)  # the plain sqrt(B) column
