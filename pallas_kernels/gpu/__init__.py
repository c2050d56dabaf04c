"""Pallas-Triton (GPU) decode kernels: dense split-K, KIVI 2/4-bit, token-sparse, QJL scores."""
