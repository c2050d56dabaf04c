"""Pallas decode kernels (placeholder)."""
