"""`diffkit tune batch RUN`: a trained run's gradient noise scale and the learning rate for another batch size.

Measures B_noise (McCandlish et al. 2018; train.batchsize) at the run's EMA weights with the run's own
objective and training data, then prints the SGD and the epsilon-aware Adam rule's learning rates for the
batch sizes asked, starting from the run's train.lr at train.batch. The Adam rule is also the guide for the
sign-like Lion, Tiger and Muon (Muon's lr is train.muon_lr); either way, confirm with a short sweep.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffkit import config as configs
from diffkit import run
from diffkit.train import batchsize

ADAM_EPS = 1e-8  # torch's AdamW default, which train.optim uses


def gradient_fn(run_dir: Path):
    """(grad(batch, generator) -> flat mean gradient over a random training batch, config) for a run."""
    cfg, model, _, n_classes = run.load_run(run_dir)
    if cfg.model.init is not None:
        raise ValueError(f"{run_dir} was derived from another run (model.init): its objective needs that run; "
                         "measure the noise scale of a run trained from scratch")
    x, y = configs.dataset(cfg, "train")
    objective = configs.objective(cfg, configs.num_classes(cfg, y))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def grad(batch: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x), (batch,), generator=gen)
        cond = y[idx].to(device) if y is not None else None
        noise = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        model.zero_grad(set_to_none=True)
        objective(model, x[idx].to(device), cond, generator=noise).mean().backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).cpu()

    return grad, cfg


def batch(run_dir: Path, *, batches: list[int] | None = None, small: int = 16, big: int = 256, pairs: int = 50,
          seed: int = 0) -> dict:
    """The noise scale of a run and each rule's learning rate at each batch size in `batches` (default: half,
    twice and four times the run's train.batch)."""
    grad, cfg = gradient_fn(run_dir)
    batches = batches or [max(1, cfg.train.batch * f // 2) for f in (1, 4, 8)]
    ns = batchsize.noise_scale(grad, small=small, big=big, pairs=pairs, seed=seed)
    t = cfg.train
    rows = [{"batch": b, "sgd_lr": batchsize.sgd_lr(t.lr, t.batch, b, ns.b_noise),
             "adam_lr": batchsize.adam_lr(t.lr, t.batch, b, ns.b_noise, ns.g_rms, ADAM_EPS),
             "sqrt_rule_lr": t.lr * (b / t.batch) ** 0.5} for b in batches]
    return {"b_noise": ns.b_noise, "grad_sq": ns.grad_sq, "trace_sigma": ns.trace, "g_rms": ns.g_rms,
            "pairs": pairs, "small": small, "big": big, "ref_batch": t.batch, "ref_lr": t.lr,
            "optimizer": t.optimizer, "rows": rows}


def describe(result: dict) -> str:
    lines = [f"gradient noise scale B_noise = tr(Sigma)/|G|^2 = {result['b_noise']:.4g} "
             f"(|G|^2 = {result['grad_sq']:.4g}, tr(Sigma) = {result['trace_sigma']:.4g}; {result['pairs']} pairs of "
             f"batches {result['small']} and {result['big']}; McCandlish et al. 2018, App. A.1)",
             f"from train.lr = {result['ref_lr']:g} at train.batch = {result['ref_batch']} ({result['optimizer']}):",
             f"{'batch':>8} {'SGD':>11} {'Adam (eps)':>11} {'sqrt(B)':>11}"]
    lines += [f"{r['batch']:>8} {r['sgd_lr']:>11.4g} {r['adam_lr']:>11.4g} {r['sqrt_rule_lr']:>11.4g}"
              for r in result["rows"]]
    lines += ["SGD: lr_max/(1 + B_noise/B) (McCandlish eq. 2.7). Adam: (g_rms sqrt(1 + B_noise/B) + eps)/(1 + B_noise/B),"
              f" g_rms = {result['g_rms']:.3g}, eps = {ADAM_EPS:g} (diffkit.train.batchsize; square-root rule below "
              "B_noise). Starting points for a short sweep."]
    return "\n".join(lines)
