"""Evaluation: distances between sample sets (metrics.py)."""
