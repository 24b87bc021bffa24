"""`diffkit finetune RUN --adapter lora|lora_ga|pissa|full --rank r --out NEW [key=value ...]`.

Fine-tuning is a derived run (diffkit.run.derive_run), not a method: the new run keeps the trained run's
method, objective, path and sampler. Its config is the trained run's with model.init = RUN and
model.adapter = the adapters (diffkit.adapters; `full`: none, every weight trains), and the overrides on top,
e.g. data.classes=[5,6,7,8,9] for new data; a run without an EMA ramp-up gets EDM's (0.05), so the EMA
forgets the starting weights in proportion to the fine-tuning done. The training loop trains only parameters that require a gradient
(train.optim.build), so nothing else changes: the new run samples, evaluates and resumes like any run
(`diffkit sample NEW [--merge]`). After training it writes adapter.safetensors: what the fine-tune adds to RUN
(every adapter's A and B of the EMA weights; for PiSSA and LoRA-GA, which start from residual weights, also the
adapted layers' base weights), with the adapter settings and RUN's folder in its metadata.
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from diffkit import adapters
from diffkit.method import Derivation, Option, Trained, quote

FULL = "full"  # every weight trains, no adapters
RAMPUP = 0.05  # EDM's EMA ramp-up ratio, for runs that start from trained weights (ARCHITECTURE.md §4)


class Finetune(Derivation):
    command = "finetune"
    command_help = "fine-tune a trained run on new data with low-rank adapters (LoRA, LoRA-GA, PiSSA; peft) or in full"
    options = (
        Option("adapter", str, "lora", f"{', '.join(adapters.KINDS)} or {FULL} (every weight trains); default lora"),
        Option("rank", int, 8, "adapter rank r (default 8)"),
        Option("alpha", float, None, "adapter scale s = alpha / r (default alpha = r: s = 1)"),
    )

    def derive(self, teacher: Trained, options: dict, out_dir: Path) -> list[str]:
        kind, cfg = options["adapter"], teacher.cfg
        if kind not in (*adapters.KINDS, FULL):
            raise ValueError(f"unknown --adapter {kind!r}; choose one of {', '.join(adapters.KINDS)} or {FULL}")
        if not teacher.method.finetunes:
            raise ValueError(f"{teacher.folder} is a {cfg.objective.name} run, whose model.init is its teacher: "
                             f"fine-tune the teacher ({cfg.model.init}) instead")
        if cfg.model.adapter.name is not None:
            raise ValueError(f"{teacher.folder} is itself fine-tuned with {cfg.model.adapter.name} adapters: "
                             f"fine-tune its base run ({cfg.model.init}) instead")
        start = [f"model.init={quote(teacher.folder)}"]
        if cfg.train.ema_rampup == 0:  # a fixed decay would keep the trained run's weights in the EMA for long
            start.append(f"train.ema_rampup={RAMPUP}")
        if kind == FULL:
            return [*start, "model.adapter.name=null"]
        adapters.import_peft()  # the install hint before any work
        alpha = "null" if options["alpha"] is None else options["alpha"]
        return [*start, f"model.adapter.name={kind}", f"model.adapter.rank={options['rank']}",
                f"model.adapter.alpha={alpha}"]

    def after_training(self, teacher: Trained, trained: Trained, options: dict) -> tuple[dict[str, dict], str]:
        a = trained.cfg.model.adapter
        total = sum(p.numel() for p in trained.model.parameters())
        result = {"base_run": str(teacher.folder), "adapter": a.name or FULL, "total_params": total}
        if a.name is None:
            return {"finetune.json": result | {"trainable_params": total}}, \
                f"\nFine-tuned in full from {teacher.folder}: all {total} weights trained.\n"
        state = adapters.adapter_state(trained.model, a.name)
        layers = adapters.layers(trained.model)
        convs = sum(isinstance(m, nn.Conv2d) for m in trained.model.modules()) - \
            sum(isinstance(m.get_base_layer(), nn.Conv2d) for m in layers.values())
        trainable = sum(p.numel() for n, p in trained.model.named_parameters() if ".lora_" in n)
        result |= {"rank": a.rank, "alpha": a.alpha or a.rank, "targets": a.targets, "adapted_layers": len(layers),
                   "frozen_conv_layers": convs, "trainable_params": trainable,
                   "adapter_file": "adapter.safetensors", "adapter_file_tensors": len(state)}
        path = trained.folder / "adapter.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, tmp, metadata={k: str(v) for k, v in result.items()})
        os.replace(tmp, path)
        text = (f"\nFine-tuned from {teacher.folder} with {a.name} adapters (rank {a.rank}, alpha {a.alpha or a.rank}) "
                f"on {len(layers)} layers: {trainable} of {total} weights trained. adapter.safetensors holds what "
                "the fine-tune adds to that run (the EMA adapters"
                + (", and the adapted layers' residual weights W - s B0 A0 it started from" if a.name in
                   adapters.MATRIX_ONLY else "") + "). `diffkit sample --merge` merges them into the weights.\n")
        if convs:
            text += f"{convs} Conv2d layers were not adapted (model.adapter.targets=linear) and stayed frozen.\n"
        return {"finetune.json": result}, text
