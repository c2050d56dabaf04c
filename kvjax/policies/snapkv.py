"""SnapKV (Li et al., 2024, arXiv 2404.14469): observation-window attention, pooled.

score_j = pool1d(sum_{i in window} softmax(q_i k^T / sqrt(d))_j), averaged over the GQA group
(kvpress convention); the window's own tokens are always kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy, group_reduce, newest_mask, protect, window_scores
from kvjax.observation import Observe


def pool1d(x: jax.Array, kernel: int, how: str = "avg") -> jax.Array:
    """Stride-1 pooling over the last axis with `kernel // 2` padding on both sides (output same length).

    avg pooling divides by the full kernel (zero padding counted), as torch's avg_pool1d does. Each
    output is a direct sum of its `kernel` inputs (shifted slices of the zero-padded array), never a
    difference of running sums: a cumsum over ~1K slots quantises small scores to the float32 spacing
    of the running total, which made distinct scores equal and changed SnapKV's kept set (issue 19).
    SnapKV, PyramidKV, AdaKV's and ThinK's default scorer all pool through this function."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    n = x.shape[-1]
    widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
    if how == "avg":
        xp = jnp.pad(x, widths)
        total = xp[..., 0:n]
        for k in range(1, kernel):
            total = total + xp[..., k:k + n]
        return total / kernel
    xp = jnp.pad(x, widths, constant_values=-jnp.inf)
    out = jax.lax.reduce_window(xp, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,),
                                (1,) * x.ndim, "VALID")
    return out[..., :n]


@dataclasses.dataclass(frozen=True)
class SnapKV(ScoringPolicy):
    """window: observation queries (kvpress 64; paper code 32); kernel: pooling size; pool: avg|max."""

    window: int = 64
    kernel: int = 5
    pool: str = "avg"
    reduce: str = "mean"

    def __post_init__(self):
        if self.window <= 0 or self.kernel <= 0:
            raise ValueError(f"window and kernel must be positive, got {self.window}, {self.kernel}")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")

    @property
    def observe(self) -> Observe:
        return Observe(window=self.window)

    def score(self, obs: Observation) -> jax.Array:
        return self.pooled(window_scores(obs, self.window), obs)

    def pooled(self, s: jax.Array, obs: Observation) -> jax.Array:
        """Window attention [L, B, Hq, S] -> the kv-head scores (GQA reduce, pool, window kept)."""
        s = group_reduce(s, obs.cache.keys.shape[2], self.reduce)
        # The window's own columns are zeroed before pooling (as kvpress and the paper code score
        # only the prefix), so the tokens just before the window do not borrow their weight.
        recent = newest_mask(obs.cache.positions, self.window)
        s = pool1d(jnp.where(recent, 0.0, s), self.kernel, self.pool)
        return protect(s, recent)
