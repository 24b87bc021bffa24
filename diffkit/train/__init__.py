"""Training: one loop generic in the objective (loop.py), EMA, safetensors checkpoints, optimizers."""
