"""Pallas-Mosaic (TPU) decode kernels."""
