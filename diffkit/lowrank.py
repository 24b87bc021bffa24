"""Low-rank approximation: truncated SVD (exact and randomized), CR sampling of a product, the interpolative
decomposition (ID), and `compress`, which replaces a model's nn.Linear layers by rank-r factor pairs.

Every approximation is returned as `Factors(left, right)` with a ~= left @ right, left (m, k), right (k, n).

- Pseudo-inverse and least squares are torch.linalg.pinv / torch.linalg.lstsq: argmin_B ||A B - M||_F is
  pinv(A) @ M. Nothing here wraps them.
- SVD: the rank-k truncation is the best rank-k approximation in every unitarily invariant norm, with
  ||A - A_k||_F^2 = sum_{i>k} sigma_i^2 (Eckart-Young-Mirsky). Randomized: torch.svd_lowrank (Halko, Martinsson
  & Tropp 2011, Alg. 4.4 + 5.1), seeded here, since torch draws it from the global generator.
- CR: Drineas, Kannan & Mahoney 2006 ("Fast Monte Carlo algorithms for matrices I", BasicMatrixMultiplication):
  draw c indices i.i.d. with p_i ~ ||A[:, i]|| ||B[i, :]||; A B ~= sum_t A[:, i_t] B[i_t, :] / (c p_{i_t}) is
  unbiased and these p_i minimise its expected error, E||AB - CR||_F^2 = ((sum_i ||A[:, i]|| ||B[i, :]||)^2 -
  ||AB||_F^2) / c. Written by hand: no maintained library has it (about ten lines).
- ID: scipy.linalg.interpolative (SciPy >= 1.15, whose API takes `rng=`): a ~= a[:, J] @ P with P[:, J] = I,
  so the k skeleton columns J are reproduced exactly. Computed on the CPU in float64; torch in, torch out.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.linalg import interpolative
from torch import Tensor, nn

METHODS = ("svd", "cr", "id")


class Factors(NamedTuple):
    """a ~= left @ right; `columns` are the columns of a the factors keep (ID: the skeleton; CR: those drawn)."""
    left: Tensor
    right: Tensor
    columns: Tensor | None = None


def _check(a: Tensor, rank: int, what: str = "rank") -> None:
    if a.ndim != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got shape {tuple(a.shape)}; reshape it first")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(a.shape):
        raise ValueError(f"{what} must be an integer in [1, {min(a.shape)}] for a {tuple(a.shape)} matrix, "
                         f"got {rank!r}")


def svd(a: Tensor, rank: int, *, randomized: bool = False, oversample: int = 10, niter: int = 2,
        seed: int = 0) -> Factors:
    """Truncated SVD of a (m, n) at `rank` k: left = U_k sqrt(S_k) (m, k), right = sqrt(S_k) Vh_k (k, n).

    Splitting sqrt(S) over both factors gives the pair of Linears one scale (||left|| = ||right||).
    `randomized` uses torch.svd_lowrank with k + oversample columns and `niter` power iterations, seeded by `seed`.
    """
    _check(a, rank)
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=min(rank + oversample, *a.shape), niter=niter)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    return Factors(u[:, :rank] * root, root[:, None] * vh[:rank])


def cr(a: Tensor, b: Tensor, samples: int, *, generator: torch.Generator | None = None) -> Factors:
    """CR approximation of the product a (m, n) @ b (n, p) from `samples` = c i.i.d. draws (module docstring).

    Repeated draws are merged, so left (m, k) and right (k, p) have k <= c distinct columns; all the weight
    count_i / (c p_i) sits on left: left = a[:, i] count_i / (c p_i), right = b[i, :].
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cr needs matrices a (m, n) and b (n, p), got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    weight = torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=1)
    total = weight.sum()
    if not total > 0:
        raise ValueError("a @ b has no nonzero column-row term to sample (a or b is zero)")
    p = weight / total
    drawn = torch.multinomial(p.cpu().double(), samples, replacement=True, generator=generator).to(a.device)
    columns, counts = torch.unique(drawn, return_counts=True)
    scale = counts.to(a.dtype) / (samples * p[columns])
    return Factors(a[:, columns] * scale, b[columns], columns)


def interpolative_decomposition(a: Tensor, rank: int, *, randomized: bool = False, seed: int = 0) -> Factors:
    """ID of a (m, n) at `rank` k through scipy: left = a[:, J] (m, k), right = P (k, n) with P[:, J] = I.

    Deterministic (pivoted QR: the error is that of projecting a on span a[:, J]) unless `randomized`.
    """
    _check(a, rank)
    x = np.array(a.detach().cpu().double().numpy(), order="F")  # a copy: scipy may work in place
    if randomized:
        idx, proj = interpolative.interp_decomp(x, rank, rand=True, rng=np.random.default_rng(seed))
    else:
        idx, proj = interpolative.interp_decomp(x, rank, rand=False)
    p = torch.from_numpy(interpolative.reconstruct_interp_matrix(idx, proj)).to(a.dtype).to(a.device)
    columns = torch.from_numpy(np.asarray(idx[:rank], dtype=np.int64)).to(a.device)
    return Factors(a[:, columns], p, columns)


def _input_rms(model: nn.Module, names: list[str], calibrate: Callable[[nn.Module], object]) -> dict[str, Tensor]:
    """The root-mean-square of each input feature of each named Linear while `calibrate(model)` runs."""
    sums, counts, hooks = {}, {}, []
    modules = dict(model.named_modules())

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"calibrate(model) never called these Linear layers: {missing}; it must run the model "
                         "forward on typical inputs")
    return {n: (sums[n] / counts[n]).sqrt() for n in names}


def approximate(weight: Tensor, rank: int, method: str, *, input_rms: Tensor | None = None,
                seed: int = 0) -> Factors:
    """A rank-`rank` approximation of one weight matrix (out, in) by `method` (svd | cr | id).

    For cr, `rank` is the number of draws c (the kept rank is the number of distinct draws). CR needs a product:
    it approximates W X over the layer's inputs X (in, N). Its probabilities and weights depend on X only through
    the norms of its rows, i.e. the input features' RMS s, so it is CR of W diag(s) with diag(s)^-1 folded into
    the right factor: W ~= sum_i count_i / (c p_i) W[:, i] e_i^T, p_i ~ ||W[:, i]|| s_i, the DKM estimator of
    W X, minimising E||W X - W~ X||_F^2. Without `input_rms`, s = 1: CR of W = W I (p_i ~ ||W[:, i]||).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "svd":
        return svd(weight, rank)
    if method == "id":
        return interpolative_decomposition(weight, rank)
    _check(weight, rank, "rank (the number of CR draws)")
    s = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device) if input_rms is None else \
        input_rms.to(weight)
    f = cr(weight, torch.diag(s), rank, generator=torch.Generator().manual_seed(seed))
    return Factors(f.left, f.right / s.masked_fill(s == 0, 1), f.columns)  # drawn columns have s > 0


def _factored(layer: nn.Linear, f: Factors) -> nn.Sequential:
    """in -> k -> out as two Linears: (right, no bias) then (left, the layer's bias)."""
    k = f.left.shape[1]
    down = nn.Linear(layer.in_features, k, bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
    up = nn.Linear(k, layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
                   dtype=layer.weight.dtype)
    with torch.no_grad():
        down.weight.copy_(f.right)
        up.weight.copy_(f.left)
        if layer.bias is not None:
            up.bias.copy_(layer.bias)
    return nn.Sequential(down, up)


def compress(model: nn.Module, rank: int, *, method: str = "svd",
             calibrate: Callable[[nn.Module], object] | None = None, seed: int = 0) -> tuple[nn.Module, list[dict]]:
    """A copy of `model` whose nn.Linear layers are approximated at `rank` by `method`, and a report per layer.

    A layer W (out, in) with rank <= min(out, in) becomes nn.Sequential(Linear(in, k, bias=False), Linear(k, out))
    holding the factors right and left: r (in + out) numbers and multiply-adds instead of in x out, plain Linears,
    so state dicts, optimizers and fine-tuning take it as any model (the dense product would save nothing). A
    layer with min(out, in) < rank already has rank < r and is kept. `calibrate(model)` runs the model on typical
    inputs; only cr uses it (see `approximate`). Report rows: layer, shape (out, in), rank kept (None: kept
    dense), params_before, params_after, rel_error = ||W - left @ right||_F / ||W||_F.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layers to compress")
    rms = _input_rms(model, names, calibrate) if method == "cr" and calibrate is not None else {}
    modules, rows = dict(model.named_modules()), []
    for i, name in enumerate(names):
        layer = modules[name]
        w = layer.weight.detach()
        before = sum(p.numel() for p in layer.parameters())
        row = {"layer": name, "shape": tuple(w.shape), "rank": None, "params_before": before,
               "params_after": before, "rel_error": 0.0}
        if rank <= min(w.shape):
            f = approximate(w, rank, method, input_rms=rms.get(name), seed=seed + i)
            new = _factored(layer, f)
            parent, _, child = name.rpartition(".")
            if name:
                setattr(modules[parent] if parent else model, child, new)
            else:  # the model is one Linear
                model = new
            err = torch.linalg.matrix_norm(w - f.left @ f.right) / torch.linalg.matrix_norm(w)
            row |= {"rank": f.left.shape[1], "params_after": sum(p.numel() for p in new.parameters()),
                    "rel_error": err.item()}
        rows.append(row)
    return model, rows
