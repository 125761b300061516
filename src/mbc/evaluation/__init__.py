"""Scoring answers, validation, the paper's online evaluation with its baselines, and figures."""
