"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069; KVCache-Factory `pyramidkv_utils.py::PyramidKVCluster`).

SnapKV scoring with a per-layer budget that decreases linearly with depth, the total preserved.
With average capacity C per head (window w included), context n, L layers and beta=20:

    min_num = (C - w) // beta ;  max_num = 2 (C - w) - min_num
    if max_num >= n - w:  max_num = n - w ;  min_num = 2 (C - w) - max_num
    budget_l = w + max_num - l * (max_num - min_num) // (L - 1)          (layer 0 largest)

(KVCache-Factory's integer division). Its fallback to uniform SnapKV when n < 2 (C - w) (no room
for a pyramid) is kept. Because the arithmetic floors the step, the few surplus tokens are
taken back from the top layers so that sum_l budget_l = L * C exactly (the spec's "budgets sum to
L*C"; the floored step over-allocates by < L*(L-1)/2 tokens).
Memory: after the final compression (the "prefill" schedule) the layers are split into a
`kvjax.layerwise.LayerwiseCache` (one cache per layer, run by an unrolled layer loop), and
generate's `resize` gives layer l exactly budget_l (+ decode room) slots per head: allocated bytes
= sum_l budget_l = L * C, as a uniform cache of the same average budget. With the "chunk" /
"decode" schedules `Compression` switches `ragged` off and the layers stay stacked (capacity =
layer 0's budget).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.layerwise import from_stacked
from kvjax.policies.base import Observation
from kvjax.policies.snapkv import SnapKV


def pyramid_budgets(capacity, context, n_layers: int, window: int, beta: int = 20):
    """Per-layer kept tokens (window included) for average capacity C and context n.

    capacity, context: int or int arrays [B] (numpy or jax) -> [L] or [L, B] budgets (same lib)."""
    xp = jnp if isinstance(capacity, jax.Array) or isinstance(context, jax.Array) else np
    c = xp.asarray(capacity) - window
    n = xp.asarray(context) - window
    min_num = c // beta
    max_num = 2 * c - min_num
    clip = max_num >= n
    max_num = xp.where(clip, n, max_num)
    min_num = xp.where(clip, 2 * c - max_num, min_num)
    layer = xp.arange(n_layers).reshape((n_layers,) + (1,) * c.ndim)
    steps = (max_num - min_num) // max(n_layers - 1, 1)
    b = window + max_num - layer * steps
    # floor division of the step over-allocates by the remainder: take it back from the top
    # layers (evenly, then one token each) so that the total is exactly L*C
    excess = b.sum(0) - n_layers * xp.asarray(capacity)
    b = b - excess // n_layers - (layer < excess % n_layers).astype(b.dtype)
    uniform = (n + window < 2 * c) | (n_layers == 1)
    return xp.where(uniform, xp.asarray(capacity), b)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """KVCache-Factory defaults: window=32, kernel=5, avg pooling, beta=20."""

    window: int = 32
    kernel: int = 5
    pool: str = "avg"
    beta: int = 20
    n_layers: int = 0  # the model's depth, only to size the cache exactly (0: a safe bound)
    ragged: bool = True  # final cache as one cache per layer of its own budget (False: stacked)

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

    def score(self, obs: Observation) -> jax.Array:
        s = super().score(obs)
        return jnp.where(obs.cache.valid, s, -jnp.inf)   # lets head_budgets count the context

    def _check(self, n_keep, context):
        if np.any(np.asarray(n_keep) <= self.window):
            raise ValueError(f"PyramidKV budget ({int(np.min(n_keep))} tokens per head) must exceed the "
                             f"observation window ({self.window})")

    def max_keep(self, n_keep: int, context: int) -> int:
        """Layer 0's budget. Without `n_layers` the bound w + max_num (before the remainder is
        taken back, which never adds) is used: at most a few slots more than needed."""
        self._check(n_keep, context)
        if self.n_layers > 0:
            top = pyramid_budgets(n_keep, context, self.n_layers, self.window, self.beta).max()
        else:
            top = max(pyramid_budgets(n_keep, context, 2, self.window, self.beta).max(), n_keep)
        return int(min(top, context))

    def head_budgets(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
        n_layers = scores.shape[0]
        if self.n_layers and self.n_layers != n_layers:
            raise ValueError(f"PyramidKV(n_layers={self.n_layers}) but the cache has {n_layers} layers")
        context = jnp.sum(scores > -jnp.inf, axis=-1)[0, :, 0]               # [B]
        b = pyramid_budgets(n_keep, context, n_layers, self.window, self.beta)  # [L, B]
        return jnp.broadcast_to(b[:, :, None], scores.shape[:3]).astype(jnp.int32)

    def finalize(self, new, obs, idx):
        if self.ragged and isinstance(new, kvcache.KVCache):
            return from_stacked(new)
        return new
