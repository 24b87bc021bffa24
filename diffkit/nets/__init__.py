"""Backbones F(x, c_noise, cond). They import only torch: a net never knows what sigma means (the Precond does)."""
