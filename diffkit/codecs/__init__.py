"""Codecs: models that turn images into codes and back (quantized autoencoders, the tokenizers of latent diffusion)."""
