"""Normalizing flows: exact-likelihood models trained by maximum likelihood (TARFLOW)."""
