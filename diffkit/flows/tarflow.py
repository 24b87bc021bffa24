"""TARFLOW: a transformer autoregressive normalizing flow, its likelihood objective and its sampler.

Zhai, Zhang, Nakkiran, Berthelot, Gu, Zheng, Chen, Bautista, Jaitly & Susskind, "Normalizing Flows are Capable
Generative Models", ICML 2025 (arXiv 2412.06329), Fig. 2 and Eqs. 3-6; details as in the reference code
(apple/ml-tarflow, `transformer_flow.py`).

A sample is cut into T tokens: an image (C, H, W) into its (H/p)(W/p) patches of D = C p^2 values, a vector
(d,) into d/p runs of D = p values. The flow f = f_N o ... o f_1 maps data to noise. Block b reads the tokens in
its own order (identity for even b, reversed for odd b, so that every token is conditioned on every other one
by some block) and applies the affine autoregressive map (Eq. 3)

    z_0 = x_0,    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),

where (alpha_i, mu_i) is the output at token i - 1 of a causal transformer over x: in-projection + learned
position embedding (+ class embedding), `layers` pre-LN layers, and an out-projection to 2 D values, shifted
right by one token. The Jacobian is triangular with diagonal exp(-alpha), so log|det| = -sum_i alpha_i (Eq. 5)
and, by the change of variables, log p(x) = log N(f(x); 0, I) + sum_b log|det_b|. The out-projection starts
at zero, so every block starts as the identity.

Training (`TarFlowNLL`) minimises the negative log-likelihood per dimension (Eq. 6) of noise-augmented data
x + sigma eps (or of uniformly dequantised 8-bit data). Sampling inverts the blocks in reverse order, token by
token, x_i = z_i exp(alpha_i) + mu_i: T - 1 sequential transformer calls per block, each on the one new token,
with the keys and values of the tokens before it cached (`KVCache`).

Classifier-free guidance, as the reference code does it: at every decoding step of every block both outputs
(alpha, mu) are guided, out = out_u + w (out_c - out_u), where out_u comes from the null class (index
num_classes, trained by label dropout; the reference code uses the mean class embedding instead). w = 1 is the
conditional flow, w = 0 the unconditional one; the reference code's guidance g is w - 1. With `anneal`, g
ramps up linearly along the sequence: the step that decodes token i + 1 uses w_i = 1 + (w - 1) (i + 1) / (T - 1).
Guidance changes decoding only: log_prob, the objective and the denoising step are the plain conditional flow's.

Denoising: a flow fitted to x + sigma eps models p_sigma = p_data * N(0, sigma^2 I), so Tweedie's formula
E[x_0 | x] = x + sigma^2 grad_x log p_sigma(x) removes the augmentation noise from a sample, with the flow's own
exact log-density gradient (`tweedie_denoise`; the reference code's gradient step on its mean loss with
lr = B D sigma^2 is the same step).

The paper's training settings (the configs' business): AdamW betas (0.9, 0.95), weight decay 1e-4, lr 1e-4
cosine after a one-epoch warm-up, bf16 autocast; noise sigma 0.05 (ImageNet 64, p = 2, width 768, 8 blocks x 8
layers), 0.15 (ImageNet 128, p = 4, width 1024), 0.07 (AFHQ 256, p = 8); label dropout 0.1.

`TarFlowMethod` makes it a run's method (diffkit.method): `objective.name: tarflow`, `model.net: tarflow`.

One file of about 400 lines, as the reference keeps its model in one: the blocks, the objective that trains
them, the sampler that inverts them and the method that runs them are read together.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkit._tensor import per_sample
from diffkit.data import dequantize
from diffkit.method import Method, labels_of
from diffkit.nets.embed import LabelEmbedding
from diffkit.objectives import drop_labels

NOISES = ("gaussian", "uniform")


class KVCache:
    """Keys and values of the tokens decoded so far for one attention layer, in a buffer for all T tokens."""

    def __init__(self, tokens: int):
        self.tokens, self.length = tokens, 0
        self.k = self.v = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append one token's k, v (B, heads, 1, head_dim); return the keys and values so far."""
        if self.k is None:
            shape = (*k.shape[:2], self.tokens, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, self.length], self.v[:, :, self.length] = k[:, :, 0], v[:, :, 0]
        self.length += 1
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class Layer(nn.Module):
    """A pre-LN transformer layer, h + Attn(LN(h)) then h + MLP(LN(h)), with causal self-attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def attention(self, h: Tensor, cache: KVCache | None) -> Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # One new token that sees itself and every cached one: no mask (is_causal would align the mask to
            # the top left and hide all but the first key).
            k, v = cache.extend(k, v)
            a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, w))

    def forward(self, h: Tensor, cache: KVCache | None = None) -> Tensor:
        h = h + self.attention(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class Block(nn.Module):
    """One autoregressive flow block over (B, T, D) tokens, read in reversed order when `flip` (Fig. 2)."""

    def __init__(self, token_dim: int, tokens: int, *, width: int, layers: int, heads: int, mlp_ratio: float,
                 num_classes: int, flip: bool):
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(0.01 * torch.randn(tokens, width))  # learned, small at init as in the reference
        self.labels = LabelEmbedding(num_classes, width) if num_classes else None
        self.layers = nn.ModuleList(Layer(width, heads, mlp_ratio) for _ in range(layers))
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def order(self, x: Tensor) -> Tensor:
        """The block's permutation of the tokens (its own inverse)."""
        return x.flip(1) if self.flip else x

    def label(self, cond: Tensor | None, batch: int) -> Tensor | None:
        """(B, 1, width) class embedding (cond None: the null class), or None for an unconditional flow."""
        if self.labels is None:
            if cond is not None:
                raise ValueError("this flow is unconditional (num_classes=0): pass cond=None, "
                                 "or build it with num_classes")
            return None
        return self.labels(cond, batch)[:, None]

    def outputs(self, x: Tensor, label: Tensor | None, *, start: int = 0,
                caches: list[KVCache] | None = None) -> Tensor:
        """(B, n, 2D) transformer outputs for tokens x (B, n, D) at positions start..start+n-1 of the block's
        order; the output at token i holds (alpha, mu) of token i + 1."""
        h = self.proj_in(x) + self.pos[start:start + x.shape[1]]
        if label is not None:
            h = h + label
        for k, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[k])
        # No final norm, as in the reference: the residual stream carries proj_in(x) to the out-projection, so
        # (alpha, mu) can be exactly affine in the tokens.
        return self.proj_out(h)

    def params(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(alpha, mu), each (B, T, D), of every token of x (B, T, D) in the block's order: the outputs shifted
        right by one token, so token 0 gets (0, 0), the identity. In x's dtype (bf16 autocast leaves the affine
        map and its log-det in the data's precision)."""
        out = self.outputs(x, self.label(cond, x.shape[0])).to(x.dtype)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        alpha, mu = out.chunk(2, dim=-1)
        return alpha, mu

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> (z (B, T, D), log|det dz/dx| (B,))."""
        x = self.order(x)
        alpha, mu = self.params(x, cond)
        z = (x - mu) * torch.exp(-alpha)  # Eq. 3
        return self.order(z), -alpha.flatten(1).sum(1)  # Eq. 5

    @torch.no_grad()  # the KV cache is written in place: decoding is inference only
    def inverse(self, z: Tensor, cond: Tensor | None = None, *, null: Tensor | None = None, w: float = 1.0,
                anneal: bool = False, cache: bool = True) -> Tensor:
        """x (B, T, D) with forward(x) = z, decoded token by token; guided with weight w when `null` (B,) labels
        are given. cache=False reruns the transformer over all decoded tokens at every step (the reference)."""
        z = self.order(z)
        b, t, _ = z.shape
        label = self.label(cond, b)
        if null is not None:  # conditional rows, then unconditional ones, in one batch
            label = torch.cat([label, self.label(null, b)])
        caches = [KVCache(t) for _ in self.layers] if cache else None
        xs = [z[:, 0]]  # token 0 passes unchanged
        for i in range(t - 1):
            x_in = xs[-1][:, None] if cache else torch.stack(xs, dim=1)
            if null is not None:
                x_in = torch.cat([x_in, x_in])
            out = self.outputs(x_in, label, start=i if cache else 0, caches=caches)[:, -1].to(z.dtype)
            if null is not None:  # guide alpha and mu alike
                out_c, out_u = out.chunk(2)
                w_i = 1 + (w - 1) * (i + 1) / (t - 1) if anneal else w
                out = out_u + w_i * (out_c - out_u)
            alpha, mu = out.chunk(2, dim=-1)
            xs.append(z[:, i + 1] * torch.exp(alpha) + mu)  # Eq. 3 inverted
        return self.order(torch.stack(xs, dim=1))


class TarFlow(nn.Module):
    """The flow: data (B, *data_shape) <-> noise of the same shape, through `blocks` autoregressive blocks.

    data_shape: (C, H, W) for images, cut into p x p patches (p = patch_size), or (d,) for vectors, cut into
    tokens of p values. num_classes > 0 adds a class embedding per block, with a null class (index num_classes,
    also what cond=None means) for guidance. The paper's ImageNet-64 model: p = 2, width 768, 8 blocks x 8 layers.
    """

    def __init__(self, data_shape: Sequence[int], *, patch_size: int = 1, width: int = 256, blocks: int = 4,
                 layers: int = 4, heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 0):
        super().__init__()
        shape, p = tuple(data_shape), patch_size
        sizes = shape[1:] if len(shape) == 3 else shape  # what the tokens cut
        if len(shape) not in (1, 3) or p < 1 or any(n % p for n in sizes):
            raise ValueError(f"data_shape must be (C, H, W) with H and W divisible by patch_size, or (d,) with d "
                             f"divisible by patch_size; got {shape} and patch_size {p}")
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.data_shape, self.patch_size, self.num_classes = shape, p, num_classes
        # With optimizer "muon", Muon takes the transformer layers' matrices; AdamW the embeddings and projections.
        self.muon_exclude = tuple(f"blocks.{k}.{part}" for k in range(blocks) for part in ("proj", "pos", "labels"))
        if len(shape) == 3:
            token_dim, tokens = shape[0] * p * p, (shape[1] // p) * (shape[2] // p)
        else:
            token_dim, tokens = p, shape[0] // p
        self.blocks = nn.ModuleList(
            Block(token_dim, tokens, width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                  num_classes=num_classes, flip=k % 2 == 1) for k in range(blocks))

    def tokens(self, x: Tensor) -> Tensor:
        """(B, *data_shape) -> (B, T, D); an image's token holds a patch's values, channel-major."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"this flow was built for data of shape (B, {', '.join(map(str, self.data_shape))}), "
                             f"got {tuple(x.shape)}")
        b, p = x.shape[0], self.patch_size
        if x.ndim == 2:
            return x.reshape(b, -1, p)
        c, h, w = self.data_shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)

    def untokens(self, t: Tensor) -> Tensor:
        """(B, T, D) -> (B, *data_shape), the inverse of `tokens`."""
        b, p = t.shape[0], self.patch_size
        if len(self.data_shape) == 1:
            return t.reshape(b, *self.data_shape)
        c, h, w = self.data_shape
        return t.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, *data_shape), cond (B,) labels or None -> (z shaped like x, log|det dz/dx| (B,))."""
        h, logdet = self.tokens(x), x.new_zeros(x.shape[0])
        for block in self.blocks:
            h, block_logdet = block(h, cond)
            logdet = logdet + block_logdet
        return self.untokens(h), logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None, *, null: Tensor | None = None, guidance: float = 1.0,
                anneal: bool = False, cache: bool = True) -> Tensor:
        """x with forward(x, cond) = (z, .), blocks in reverse order; guided (module docstring) when `null` (B,)
        labels are given. cache=False: the uncached reference decoding."""
        h = self.tokens(z)
        for block in reversed(self.blocks):
            h = block.inverse(h, cond, null=null, w=guidance, anneal=anneal, cache=cache)
        return self.untokens(h)


def log_prob(net: nn.Module, x: Tensor, cond: Tensor | None = None) -> Tensor:
    """log p(x | cond) (B,) = log N(z; 0, I) + log|det dz/dx|, from net(x, cond) -> (z, logdet)."""
    z, logdet = net(x, cond)
    z = z.flatten(1)
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet


class Flow(nn.Module):
    """The trainable model for diffkit.train.loop: `.net` is the TarFlow, so the loop's compile / DDP wrapping,
    EMA and checkpoints ("net.*") cover it unchanged, and every call goes through model.net."""

    def __init__(self, net: TarFlow):
        super().__init__()
        self.net = net

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """The exact log-density log p(x | cond), (B,), of x (B, *data_shape)."""
        return log_prob(self.net, x, cond)


class TarFlowNLL:
    """loss(model, x0, cond, generator) -> (B,) negative log-likelihood per dimension for a Flow (Eq. 6 over D).

    loss = 0.5 mean(z^2) - log|det| / D on the augmented sample, z, log|det| = model.net(x, cond), D values per
    sample. The exact NLL per dimension in nats is loss + 0.5 log(2 pi).
    noise "gaussian": x = x0 + sigma eps, eps ~ N(0, I) (the paper's noise augmentation; sigma = 0 trains on x0).
    noise "uniform": x0 holds integer data of `levels` levels as diffkit.data scales it; x is its uniform
      dequantization (diffkit.data.dequantize), for bits/dim models: bits/dim = data.dequantized_bits(-D (loss +
      0.5 log(2 pi)), dims=D, levels=levels).
    label_dropout, null: conditions replaced by `null` with this probability, for classifier-free guidance.
    All draws come from `generator` on its own device.
    """

    def __init__(self, *, noise: str = "gaussian", sigma: float = 0.05, levels: int = 256, label_dropout: float = 0.0,
                 null: Tensor | int | None = None):
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; expected one of {NOISES}")
        if sigma < 0 or levels < 2:
            raise ValueError(f"need sigma >= 0 and levels >= 2, got sigma={sigma}, levels={levels}")
        if not 0 <= label_dropout <= 1 or (label_dropout > 0 and null is None):
            raise ValueError("label_dropout must be in [0, 1], and needs a `null` condition when > 0")
        self.noise, self.sigma, self.levels, self.label_dropout, self.null = noise, sigma, levels, label_dropout, null

    def augment(self, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The training sample: x0 + sigma eps, or x0 dequantised (class docstring)."""
        if self.noise == "uniform":
            return dequantize(x0, levels=self.levels, generator=generator)
        device = generator.device if generator is not None else torch.device("cpu")
        return x0 + self.sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)

    def __call__(self, model: Flow, x0: Tensor, cond: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        x = self.augment(x0, generator=generator)
        cond = drop_labels(cond, self.label_dropout, self.null, generator=generator)
        z, logdet = model.net(x, cond)
        return 0.5 * (z.flatten(1) ** 2).mean(1) - logdet / z[0].numel()


def tweedie_denoise(model: Flow | TarFlow, x: Tensor, *, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor:
    """E[x_0 | x] = x + sigma^2 grad_x log p(x | cond) (Tweedie), x (B, *data_shape), sigma a float or (B,): the
    paper's denoising of a sample from a flow trained with noise augmentation at sigma; unguided."""
    net = model.net if isinstance(model, Flow) else model
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(net, x_in, cond).sum(), x_in)
    return x + per_sample(sigma, x) ** 2 * grad


@torch.no_grad()
def tarflow_sample(model: Flow | TarFlow, z: Tensor, *, cond: Tensor | None = None, guidance: float | None = None,
                   null: Tensor | int | None = None, anneal: bool = False, denoise_sigma: float | None = None,
                   cache: bool = True) -> Tensor:
    """Samples (B, *data_shape) from noise z ~ N(0, I) of the same shape (drawn by the caller, per sample).

    guidance: w (w = 1 plain conditional, 0 unconditional; module docstring), which needs `cond` (B,) and the
    `null` label (the model's num_classes); anneal ramps it along each block's sequence. denoise_sigma: the
    training noise sigma, for the final Tweedie step (None: no denoising). cache=False decodes without the KV
    cache (the slow reference).
    """
    net = model.net if isinstance(model, Flow) else model
    guided = guidance is not None and guidance != 1
    if guided and (cond is None or null is None):
        raise ValueError("guidance needs `cond` and the `null` label")
    null_labels = torch.as_tensor(null, dtype=cond.dtype, device=cond.device).expand_as(cond) if guided else None
    x = net.inverse(z, cond, null=null_labels, guidance=1.0 if guidance is None else guidance, anneal=anneal,
                    cache=cache)
    return x if denoise_sigma is None else tweedie_denoise(net, x, sigma=denoise_sigma, cond=cond)


class TarFlowMethod(Method):
    """TARFLOW as a run's method: model.args are the TarFlow's, objective.args TarFlowNLL's (noise, sigma, levels).

    Samplers: "tarflow" ends with the Tweedie denoising step when the flow was trained with Gaussian noise
    augmentation, "tarflow_raw" returns the flow's own sample. NFE counts whole-network passes: the cached
    inverse is one (two with guidance), the denoising step one more.
    """

    name = "tarflow"
    objective_class = TarFlowNLL
    own_args = ("label_dropout", "null")
    nets = ("tarflow",)
    samplers = ("tarflow", "tarflow_raw")
    likelihood = "exact"

    def wrap(self, net: TarFlow, cfg, path) -> Flow:
        return Flow(net)

    def objective(self, cfg, path, *, label_dropout: float, null: int | None, teacher=None) -> TarFlowNLL:
        return TarFlowNLL(label_dropout=label_dropout, null=null, **cfg.objective.args)

    def draw(self, model: Flow, cfg, *, sampler: str, steps: int, guidance: float | None, label: int | None,
             n_classes: int):
        nll = self.objective(cfg, None, label_dropout=0.0, null=None)
        denoise = nll.sigma if sampler == "tarflow" and nll.noise == "gaussian" and nll.sigma > 0 else None
        guided = guidance is not None and guidance != 1
        if guided and label is None:
            raise ValueError("guidance on a flow needs the class to guide towards: pass --label")

        def draw(z: Tensor, noise) -> tuple[Tensor, int]:
            x = tarflow_sample(model, z, cond=labels_of(label, z), guidance=guidance, null=n_classes,
                               denoise_sigma=denoise)
            return x, (2 if guided else 1) + (denoise is not None)
        return draw

    def log_prob(self, model: Flow, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return model.log_prob(x, cond)
