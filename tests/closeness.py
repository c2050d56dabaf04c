"""Comparison helpers shared by the quantized-cache tests."""
from __future__ import annotations

import numpy as np


def assert_mostly_close(got, want, tol: float, step: float, frac: float = 0.01) -> None:
    """|got - want| <= tol for all but a fraction `frac` of the entries (rounding-boundary flips), and
    no entry off by more than one quantization `step` (+ tol)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    bad = err > tol
    assert bad.mean() <= frac, f"{bad.mean():.3%} entries differ by more than {tol:.2e} (max {err.max():.3e})"
    assert err.max() <= step + tol, f"max error {err.max():.3e} exceeds one quantization step {step:.3e} + tol"
