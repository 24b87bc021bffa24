"""diffkit: diffusion and flow models as one path / denoiser / sampler stack (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
