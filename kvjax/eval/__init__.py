"""Evaluation: fidelity vs the full cache, perplexity, needle tasks, memory and speed."""
