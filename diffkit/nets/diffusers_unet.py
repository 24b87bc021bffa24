"""diffusers' denoising networks as diffkit nets F(x, c_noise, cond).

A diffusers model takes (sample, timestep, class_labels or encoder_hidden_states) and returns `.sample`; its time
input is the scheduler's timestep, not diffkit's path time t in [0, 1]. `DiffusersNet` maps one to the other,

    timestep = num_train_timesteps * t + time_offset,

with time_offset = -1 on discrete VP paths (timestep i is path time (i + 1) / N, diffkit.interop.schedule) and 0
on flow matching (diffusers' FlowMatchEulerDiscreteScheduler feeds timestep = N * sigma_fm = N * t). It routes
`cond` to the model's class labels or text states, and drops learned-variance channels (DiT's learn_sigma).

`DiffusersUNet2D` is `model.net: diffusers_unet2d`: a UNet2DModel that diffkit's loop trains and
`diffkit export --to diffusers` saves as a pipeline. diffusers is an optional dependency (`pip install
diffkit[diffusers]`); it is imported only when one of these nets is built.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

class MissingDiffusers(ImportError):
    """diffusers is needed and not installed; the message says how to install it."""


def import_diffusers():
    """The diffusers module, or MissingDiffusers saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise MissingDiffusers("diffusers is not installed: pip install 'diffkit[diffusers]' (or pip install "
                               "diffusers)") from err
    return diffusers


class DiffusersNet(nn.Module):
    """F(x, c_noise, cond) over a diffusers model (UNet2DModel, UNet2DConditionModel, a 2-D transformer).

    cond goes to `class_labels` when the model takes them and `cond` is an integer tensor, else to
    `encoder_hidden_states` (required by models that take only those). The input is cast to the model's dtype,
    so a float32 model can serve float64 samplers (and the output comes back in the caller's dtype).
    """

    def __init__(self, model: nn.Module, *, num_train_timesteps: int, time_offset: float):
        super().__init__()
        self.model, self.num_train_timesteps, self.time_offset = model, num_train_timesteps, time_offset
        params = inspect.signature(model.forward).parameters
        self._takes_labels = "class_labels" in params
        self._takes_text = "encoder_hidden_states" in params
        in_channels = model.config.in_channels
        out_channels = getattr(model.config, "out_channels", None) or in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"{type(model).__name__} has {out_channels} output channels for {in_channels} input "
                             "channels: diffkit reads a prediction with the input's channels (or twice that, a learned "
                             "variance it drops)")
        self._channels = in_channels

    def timestep(self, c_noise: Tensor) -> Tensor:
        """The model's time input for path time t = c_noise, as the scheduler would give it."""
        return c_noise * self.num_train_timesteps + self.time_offset

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        if extra is not None:
            raise ValueError("a diffusers net takes no extra scalars (extra_scalars=0): pass extra=None")
        return self.at_timestep(x, self.timestep(c_noise.expand(x.shape[0])), cond)

    def at_timestep(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        """The model's prediction at its own time input (B,), as a diffusers pipeline calls it."""
        dtype = next(self.model.parameters()).dtype
        kwargs = {}
        if cond is not None:
            if self._takes_labels and not cond.is_floating_point():
                kwargs["class_labels"] = cond
            elif self._takes_text:
                kwargs["encoder_hidden_states"] = cond.to(dtype)
            else:
                raise ValueError(f"{type(self.model).__name__} takes no conditioning: pass cond=None")
        elif self._takes_text and not self._takes_labels:
            raise ValueError(f"{type(self.model).__name__} needs encoder_hidden_states: pass them as cond")
        elif getattr(self.model.config, "num_class_embeds", None) or getattr(self.model.config, "class_embed_type", None):
            raise ValueError(f"this {type(self.model).__name__} is class-conditional: pass class labels as cond "
                             "(diffkit sample --label K)")
        out = self.model(x.to(dtype), timestep, **kwargs, return_dict=False)[0]
        return out[:, :self._channels]


class DiffusersUNet2D(DiffusersNet):
    """diffusers' UNet2DModel as a diffkit backbone (`model.net: diffusers_unet2d`).

    The arguments are UNet2DModel's (block_out_channels, layers_per_block, down/up block types, ...). Labels use
    num_classes + 1 class embeddings, the last one "no label", as diffkit's own nets do. time_offset picks the
    scheduler the run exports to: -1 (default) for VP paths, whose DDPM/DDIM timestep i is path time (i + 1) / N;
    0 for rectified flow, whose flow-matching timestep is N t.
    """

    muon_exclude = ("model.conv_in", "model.conv_out", "model.time_embedding", "model.class_embedding")

    def __init__(self, in_channels: int, image_size: int, *, num_classes: int = 0, num_train_timesteps: int = 1000,
                 block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D"), norm_num_groups: int = 8,
                 attention_head_dim: int = 8, dropout: float = 0.0, time_offset: float = -1.0):
        diffusers = import_diffusers()
        unet = diffusers.UNet2DModel(
            sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim, dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes else None)
        super().__init__(unet, num_train_timesteps=num_train_timesteps, time_offset=time_offset)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, *, extra: Tensor | None = None) -> Tensor:
        if cond is None and self.model.config.num_class_embeds:  # no label: the null class, as LabelEmbedding does
            cond = torch.full((x.shape[0],), self.model.config.num_class_embeds - 1, dtype=torch.long, device=x.device)
        return super().forward(x, c_noise, cond, extra=extra)
