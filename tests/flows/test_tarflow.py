import math

import pytest
import torch

from diffkit.flows.tarflow import Flow, TarFlow, TarFlowNLL, log_prob, tarflow_sample, tweedie_denoise
from diffkit.train import checkpoint, optim
from diffkit.train.loop import TrainSettings, train

SHAPES = {"image": dict(data_shape=(2, 4, 4), patch_size=2), "vector": dict(data_shape=(6,), patch_size=2)}
NULL = 3  # the null class of the conditional flows (num_classes = 3)


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small run several times faster on one thread than split over two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flow(seed: int = 0, *, perturb: float = 0.05, blocks: int = 3, **kwargs) -> TarFlow:
    """A small float64 flow; its zero-initialised out-projections perturbed so every block does something."""
    torch.manual_seed(seed)
    options = dict(width=32, blocks=blocks, layers=2, heads=2) | SHAPES["image"] | kwargs
    net = TarFlow(**options).double()
    with torch.no_grad():
        for block in net.blocks:
            block.proj_out.weight.normal_(std=perturb)
            block.proj_out.bias.normal_(std=perturb)
    return net


def data(net: TarFlow, b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, *net.data_shape, generator=gen(seed), dtype=torch.float64)


def labels(b: int = 3) -> torch.Tensor:
    return torch.arange(b) % NULL


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_classes", [0, 3])
def test_inverse_undoes_forward(shape, num_classes):
    net = flow(**SHAPES[shape], num_classes=num_classes)
    x, cond = data(net), (labels() if num_classes else None)
    z, logdet = net(x, cond)
    assert z.shape == x.shape and (z - x).abs().max() > 0.1 and logdet.abs().min() > 1e-3  # not the identity
    assert (net.inverse(z, cond) - x).abs().max() < 1e-10


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logdet_is_the_log_det_of_the_jacobian(shape):
    net = flow(**SHAPES[shape])
    x = data(net, b=2)
    _, logdet = net(x)
    for x_i, logdet_i in zip(x, logdet):
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0].flatten(), x_i, vectorize=True)
        sign, brute = torch.linalg.slogdet(jac.reshape(x_i.numel(), x_i.numel()))
        assert sign == 1 and abs(brute - logdet_i) < 1e-10, (brute, logdet_i)


def test_each_block_is_triangular_in_its_own_order():
    # In block b's order, token i's output depends on tokens <= i only, and on token i itself through the
    # elementwise scale exp(-alpha_i): the Jacobian is block lower-triangular with diagonal diagonal blocks.
    net = flow(blocks=2)
    assert [block.flip for block in net.blocks] == [False, True]
    tokens = net.tokens(data(net, b=1))[0]  # (T, D)
    t, d = tokens.shape
    for block in net.blocks:
        jac = torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], tokens, vectorize=True)  # (T, D, T, D)
        jac = jac.flip(0, 2) if block.flip else jac  # output and input tokens in the block's order
        alpha, _ = block.params(block.order(tokens[None]))
        for i in range(t):
            assert jac[i, :, i + 1:].abs().sum() == 0  # nothing from later tokens
            torch.testing.assert_close(jac[i, :, i], torch.diag(torch.exp(-alpha[0, i])), rtol=1e-12, atol=1e-12)
        assert jac[1:, :, :1].abs().max() > 1e-3  # and later tokens do read earlier ones
    # The flip makes the two blocks triangular in opposite directions of the data's order.
    first = torch.autograd.functional.jacobian(lambda v: net.blocks[0](v[None])[0][0], tokens, vectorize=True)
    second = torch.autograd.functional.jacobian(lambda v: net.blocks[1](v[None])[0][0], tokens, vectorize=True)
    assert first[0, :, 1:].abs().max() == 0 and second[-1, :, :-1].abs().max() == 0


@pytest.mark.parametrize("guided", [False, True])
def test_kv_cache_decodes_as_the_uncached_reference(guided):
    net, cond = flow(num_classes=3), labels()
    z = data(net)
    options = dict(null=torch.full((3,), NULL), guidance=2.5, anneal=True) if guided else {}
    cached, uncached = (net.inverse(z, cond, cache=c, **options) for c in (True, False))
    assert (cached - uncached).abs().max() < 1e-12


def test_guidance_weight_one_is_conditional_and_zero_unconditional():
    net, cond = flow(num_classes=3), labels()
    z, null = data(net), torch.full((3,), NULL)
    conditional, unconditional = net.inverse(z, cond), net.inverse(z, null)
    assert (conditional - unconditional).abs().max() > 1e-3  # the class embedding matters
    assert (net.inverse(z, cond, null=null, guidance=1.0) - conditional).abs().max() < 1e-12
    assert (tarflow_sample(net, z, cond=cond, guidance=0.0, null=NULL) - unconditional).abs().max() < 1e-12
    with pytest.raises(ValueError, match="needs `cond` and the `null`"):
        tarflow_sample(net, z, cond=cond, guidance=2.0)


@pytest.mark.parametrize("anneal", [False, True])
def test_guided_decoding_mixes_alpha_and_mu_per_token(anneal):
    # Re-derive every token of a guided sample from the block's conditional and unconditional (alpha, mu),
    # recomputed in parallel on the sample: out = out_u + w_i (out_c - out_u), w_i = 1 + (w - 1) i / (T - 1).
    net, cond, w = flow(num_classes=3, blocks=1), labels(), 3.0
    z, null = data(net), torch.full((3,), NULL)
    x = net.tokens(net.inverse(z, cond, null=null, guidance=w, anneal=anneal))
    (alpha_c, mu_c), (alpha_u, mu_u) = (net.blocks[0].params(x, c) for c in (cond, null))
    t = x.shape[1]
    w_i = (1 + (w - 1) * torch.arange(t, dtype=torch.float64) / (t - 1) if anneal
           else torch.full((t,), w, dtype=torch.float64))[:, None]
    alpha, mu = alpha_u + w_i * (alpha_c - alpha_u), mu_u + w_i * (mu_c - mu_u)
    torch.testing.assert_close((x - mu) * torch.exp(-alpha), net.tokens(z), rtol=0, atol=1e-12)


def test_tweedie_step_on_the_identity_flow_is_the_gaussian_posterior_mean():
    # Zero init: f = identity, log p = log N(0, I), so x + sigma^2 grad log p = x (1 - sigma^2).
    net = TarFlow((2, 4, 4), patch_size=2, width=32, blocks=2, layers=1, heads=2).double()
    x, sigma = data(net), 0.3
    assert (log_prob(net, x) + 0.5 * (x.flatten(1) ** 2).sum(1) + 16 * math.log(2 * math.pi)).abs().max() < 1e-12
    posterior_mean = x * (1 - sigma**2)
    torch.testing.assert_close(tweedie_denoise(net, x, sigma=sigma), posterior_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(tarflow_sample(Flow(net), x, denoise_sigma=sigma), posterior_mean, rtol=0, atol=1e-14)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_objective_is_the_nll_per_dimension_of_the_augmented_sample(noise):
    model = Flow(flow(num_classes=3))
    k = torch.randint(0, 256, (3, 2, 4, 4), generator=gen(2))
    x0 = (k / 127.5 - 1).double()  # 8-bit images in [-1, 1]
    objective = TarFlowNLL(noise=noise, sigma=0.1)
    loss = objective(model, x0, labels(), generator=gen(3))
    g = gen(3)
    if noise == "gaussian":
        x = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    else:  # the dequantised value lies in its integer's cell of width 2 / 255 around it
        x = x0 + (torch.rand(x0.shape, generator=g, dtype=torch.float64) - 0.5) / 127.5
        assert torch.equal(torch.round((x + 1) * 127.5).long(), k)
    # Eq. 6 is -log p / D without the Gaussian's constant 0.5 log(2 pi).
    torch.testing.assert_close(loss, -model.log_prob(x, labels()) / 32 - 0.5 * math.log(2 * math.pi))


def test_label_dropout_trains_the_null_class():
    model = Flow(flow(num_classes=3))
    x0, cond = torch.randn(4000, 2, 4, 4, generator=gen(1), dtype=torch.float64), torch.zeros(4000, dtype=torch.long)
    everything = TarFlowNLL(label_dropout=1.0, null=NULL)(model, x0[:4], cond[:4], generator=gen(4))
    null = TarFlowNLL()(model, x0[:4], torch.full((4,), NULL), generator=gen(4))
    assert (everything - null).abs().max() < 1e-12
    assert (TarFlowNLL()(model, x0[:4], cond[:4], generator=gen(4)) - null).abs().max() > 1e-3  # labels matter
    seen = []
    model.net.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    TarFlowNLL(label_dropout=0.3, null=NULL)(model, x0, cond, generator=gen(5))
    assert abs((seen[0] == NULL).double().mean() - 0.3) < 0.03
    with pytest.raises(ValueError, match="needs a `null`"):
        TarFlowNLL(label_dropout=0.1)


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        TarFlow((3, 6, 6), patch_size=4)
    net = TarFlow((6,), patch_size=2, width=8, blocks=1, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"built for data of shape \(B, 6\)"):
        net(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown noise"):
        TarFlowNLL(noise="logistic")


def test_muon_takes_only_the_transformer_layers_matrices():
    model = Flow(TarFlow((6,), patch_size=2, width=8, blocks=2, layers=1, heads=2, num_classes=3))
    adamw, muon = optim.build(model, "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert in_muon == {f"net.blocks.{k}.layers.0.{m}.weight" for k in (0, 1) for m in ("qkv", "proj", "mlp.0", "mlp.2")}


def test_flow_fitted_by_the_training_loop_matches_a_correlated_gaussian(tmp_path):
    # A 2-D Gaussian as two 1-value tokens: two blocks represent it exactly (block 1 standardises x_1 given x_0,
    # block 2 scales x_0). Trained on x + sigma eps, the flow models N(0, Sigma_s), Sigma_s = Sigma + sigma^2 I,
    # with entropy 0.5 log det(2 pi e Sigma_s) = 1.906 nats. Calibration (300 steps, data / init / loop seeds
    # 0-2, ~3 s each on one thread): NLL on 20000 fresh samples - entropy +0.013, +0.004, -0.006 (its standard
    # error is 0.007); paired KL estimate 0.0005-0.0007; covariance of 20000 samples off by at most 0.018, 0.012,
    # 0.034 (standard error ~0.014); Tweedie shift off the exact -sigma^2 Sigma_s^-1 x by 4.0%, 3.7%, 4.3%.
    # A flow that missed the correlation would be 0.6 nats off.
    sigma = 0.1
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    cov_s = cov + sigma**2 * torch.eye(2, dtype=torch.float64)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov_s).item()
    train_x = (torch.randn(8192, 2, generator=gen(7), dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    torch.manual_seed(0)
    model = Flow(TarFlow((2,), width=32, blocks=2, layers=1, heads=2))
    settings = TrainSettings(steps=300, batch=256, lr=3e-3, warmup=20, ema_decay=0.9, checkpoint_every=300)
    ema = train(model, TarFlowNLL(sigma=sigma), train_x, None, settings, tmp_path, progress=False).model

    held_out = torch.randn(20000, 2, generator=gen(8), dtype=torch.float64) @ torch.linalg.cholesky(cov_s).T
    with torch.no_grad():
        nll = -ema.log_prob(held_out.float()).double()
    exact_nll = -torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov_s).log_prob(held_out)
    assert abs(nll.mean() - entropy) < 0.03 and abs((nll - exact_nll).mean()) < 0.005, (nll.mean() - entropy)
    samples = tarflow_sample(ema, torch.randn(20000, 2, generator=gen(6))).double()
    assert (torch.cov(samples.T) - cov_s).abs().max() < 0.06, torch.cov(samples.T)
    # Tweedie with the fitted flow's score against the exact Gaussian one, x - sigma^2 Sigma_s^-1 x.
    x = held_out[:2000]
    shift = tweedie_denoise(ema, x.float(), sigma=sigma).double() - x
    exact_shift = -sigma**2 * x @ torch.linalg.inv(cov_s)
    assert (shift - exact_shift).norm(dim=1).mean() < 0.1 * exact_shift.norm(dim=1).mean()
    # The checkpoint holds the flow under "net.*": a fresh Flow loads the EMA weights and agrees.
    fresh = Flow(TarFlow((2,), width=32, blocks=2, layers=1, heads=2))
    fresh.load_state_dict(checkpoint.load(checkpoint.latest(tmp_path)).ema)
    with torch.no_grad():
        assert torch.equal(fresh.log_prob(x.float()), ema.log_prob(x.float()))
