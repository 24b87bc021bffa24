"""The quantized autoencoders: each bottleneck against a few-line reference of its paper's rule, the codebook
statistics on hand-made histograms, and a tokenizer trained through the loop with its held-out logging."""
import json
import math

import pytest
import torch

from diffkit import config as configs
from diffkit import run
from diffkit.codecs.tokenizer import Reconstruction, Tokenizer, code_stats
from diffkit.nets.autoencoder import FSQ_LEVELS, Autoencoder


def _net(bottleneck, **kw):
    torch.manual_seed(0)
    return Autoencoder(1, 8, bottleneck=bottleneck, latent_dim=4, codebook_size=256, downsample=1, channels=8, **kw)


def _nearest(z, codebook):
    """The VQ-VAE assignment (van den Oord et al. 2017, Eq. 1): the code nearest to each latent vector."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return torch.cdist(flat, codebook).argmin(1).reshape(z.shape[0], *z.shape[2:])


@pytest.mark.parametrize("bottleneck", ["ste", "rotation"])
def test_vq_forward_is_the_nearest_code(bottleneck):
    net = _net(bottleneck).eval()  # eval: the codebook's moving average does not move
    z = torch.randn(3, 4, 4, 4)
    z_q, indices, _ = net.quantize(z)
    codebook = net.quantizer.codebook
    assert torch.equal(indices, _nearest(z, codebook))
    torch.testing.assert_close(z_q, codebook[indices].permute(0, 3, 1, 2))


def test_ste_passes_the_gradient_straight_through():
    net = _net("ste")  # training mode: in eval mode the library returns the code without a gradient
    z = torch.randn(3, 4, 4, 4, requires_grad=True)
    w = torch.randn(3, 4, 4, 4)
    (net.quantize(z)[0] * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # q = z + sg[e - z]: dq/dz = I


def test_rotation_trick_gradient_is_the_rotation_transposed():
    """Fifty et al. 2024, Eq. 4: q = sg[lambda R] z with R the rotation taking z/|z| to e/|e| in their plane and
    lambda = |e| / |z|, so dL/dz = lambda R^T dL/dq (not dL/dq as with the straight-through estimator)."""
    net = _net("rotation")
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    w = torch.randn(2, 4, 2, 2)
    codebook = net.quantizer.codebook.clone()  # the forward then moves the codebook's average
    z_q, indices, _ = net.quantize(z)
    (z_q * w).sum().backward()
    e = codebook[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q.detach(), e)
    zv, ev, wv = (t.detach().permute(0, 2, 3, 1).reshape(-1, 4).double() for t in (z, e, w))
    expected = []
    for a, b, g in zip(zv, ev, wv):
        u, v = a / a.norm(), b / b.norm()
        r = u + v
        rot = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(r, r) / (r @ r) + 2 * torch.outer(v, u)
        assert torch.allclose(rot @ u, v)  # R takes z's direction to the code's
        expected.append(b.norm() / a.norm() * rot.T @ g)
    got = z.grad.permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_simvq_codes_are_a_linear_map_of_a_frozen_basis():
    net = _net("simvq").eval()
    z = torch.randn(3, 4, 4, 4)
    z_q, indices, _ = net.quantize(z)
    q = net.quantizer
    codes = q.code_transform(q.frozen_codebook)  # Zhu et al. 2024: C' = C W, only W trains
    assert not q.frozen_codebook.requires_grad and q.code_transform.weight.requires_grad
    assert torch.equal(indices, _nearest(z, codes))
    torch.testing.assert_close(z_q, codes[indices].permute(0, 3, 1, 2))


def test_fsq_rounds_each_dimension_to_its_levels():
    """Mentzer et al. 2023, Eq. 1-2: prod(levels) codes; each index decodes to the value the forward gave."""
    net = _net("fsq").eval()
    assert net.codebook_size == math.prod(FSQ_LEVELS[256]) == 240
    z = torch.randn(64, 4, 4, 4)
    z_q, indices, aux = net.quantize(z)
    assert aux == 0 and 0 <= indices.min() and indices.max() < 240
    assert len(indices.unique()) > 50
    torch.testing.assert_close(z_q, net.quantizer.indices_to_codes(indices))
    vectors = z_q.permute(0, 2, 3, 1).reshape(-1, 4)
    assert len(vectors.unique(dim=0)) == len(indices.unique())  # one value per code


def test_continuous_bottleneck_is_the_identity():
    net = _net("continuous")
    z = torch.randn(2, 4, 4, 4)
    z_q, indices, aux = net.quantize(z)
    assert z_q is z and indices is None and aux == 0


def test_code_stats_on_known_histograms():
    assert code_stats(torch.arange(8).repeat(5), 8) == {"usage": 1.0, "perplexity": pytest.approx(8.0),
                                                          "dead_codes": 0}
    collapsed = code_stats(torch.full((100,), 3), 16)
    assert collapsed == {"usage": 1 / 16, "perplexity": pytest.approx(1.0), "dead_codes": 15}
    two = code_stats(torch.tensor([0, 0, 0, 1]), 4)  # p = (3/4, 1/4): exp(H)
    assert two["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_reconstruction_loss_is_the_per_image_error_plus_the_bottleneck_loss():
    model = Tokenizer(_net("simvq"))  # no moving-average state: two calls agree
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loss = Reconstruction(aux_weight=0.5)(model, x)
    torch.manual_seed(1)
    x_hat, _, aux = model(x)
    torch.testing.assert_close(loss, (x_hat - x).flatten(1).pow(2).mean(1) + 0.5 * aux)


@pytest.mark.parametrize("args, message", [
    ({"bottleneck": "vqgan"}, "unknown bottleneck 'vqgan'"),
    ({"bottleneck": "fsq", "codebook_size": 300}, "fsq takes the paper's levels"),
    ({"downsample": 4}, "divisible by 2\\^downsample"),
])
def test_bad_autoencoder_args(args, message):
    with pytest.raises(ValueError, match=message):
        Autoencoder(1, 8, **args)


def test_a_conditional_tokenizer_is_refused():
    cfg = configs.load("configs/digits-vq.yaml", ["data.conditional=true"])
    with pytest.raises(ValueError, match="trained without labels"):
        configs.model(cfg, (1, 8, 8), 10)


def test_tokenizer_run_logs_codebook_health_and_evaluates_reconstructions(tmp_path):
    cfg = configs.load("configs/digits-vq.yaml", ["train.steps=60", "train.log_every=30", "train.batch=64",
                                                  "model.args.channels=8"])
    run.train_run(cfg, tmp_path / "tok", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [30, 60]
    assert {"held_out_mse", "held_out_psnr", "usage", "perplexity", "dead_codes"} <= rows[0].keys()
    assert rows[1]["held_out_mse"] < rows[0]["held_out_mse"]
    assert 0 < rows[1]["usage"] <= 1 and rows[1]["dead_codes"] == round(256 * (1 - rows[1]["usage"]))
    result = run.eval_run(tmp_path / "tok", sampler=None, steps=None, n=200, seed=0)
    assert result["n"] == 200 and "ms_ssim" not in result and "no MS-SSIM" in result["notes"][0]
    assert result["psnr"] == pytest.approx(10 * math.log10(4 / rows[1]["held_out_mse"]), rel=0.05)
    with pytest.raises(ValueError, match="does not generate samples"):
        run.sample_run(tmp_path / "tok", sampler=None, steps=None, n=4, seed=0)
