"""Evaluation: distances between sample sets (metrics.py), the digits feature classifier (digits.py), FID with
local Inception weights (inception.py)."""
