"""PrefixKV (Wang et al., 2024, "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-
Following Models Need for Efficient Generation", arXiv 2412.03409): layer-adaptive budgets found
by one global search over the layers' cumulative attention curves.

Per layer l, from the tokens' importance (SnapKV window attention here), per kv head normalised
to sum 1 over the candidate slots (live, not the protected window), sorted descending and
accumulated, then averaged over the heads:

    c_l(n) = mean_h sum_{i <= n} sorted_h(importance)_i          (the share of attention kept by n tokens)
    n_l(p) = min{n : c_l(n) >= p}                                (the shortest prefix keeping share p)
    p*     = max{p : sum_l (n_l(p) + w_l) <= L * budget}         (bisection, 32 steps)
    b_l    = n_l(p*) + w_l                                       (w_l: the protected window)

so every layer keeps the same share of its attention and layers with concentrated attention keep
fewer tokens. The kept tokens are each head's top-b_l by importance. The cache becomes one cache
per layer (`kvjax.layerwise`, as PyramidKV): each layer allocates its own budget.
Differences, said plainly: the paper estimates the curves offline on a few samples and reuses the
layer budgets; here they come from the prompt itself (no public code read; the spec file has no
entry [unverified]).
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

STEPS = 32


def attention_curves(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """scores [L, B, Hkv, S] (+inf = protected): (curves c [L, B, S] (c[.., n-1] = c_l(n)),
    candidates m [L, B], protected w [L, B]) -- per head counts reduced by the max over heads."""
    cand = valid & jnp.isfinite(scores)
    x = jnp.where(cand, jnp.maximum(scores.astype(jnp.float32), 0.0), 0.0)
    x = x / jnp.maximum(x.sum(-1, keepdims=True), 1e-30)
    curve = jnp.cumsum(-jnp.sort(-x, axis=-1), axis=-1).mean(2)
    return curve, cand.sum(-1).max(-1), (valid & ~cand).sum(-1).max(-1)


def prefix_budgets(scores: jax.Array, valid: jax.Array, n_keep: jax.Array) -> jax.Array:
    """PrefixKV's layer budgets [L, B] for the uniform per-head budget n_keep [B]."""
    curve, m, w = attention_curves(scores, valid)
    total = n_keep * scores.shape[0]                                                   # [B]

    def budgets(p):                                                                    # p [B] -> [L, B]
        n = jnp.sum(curve < p[None, :, None], axis=-1) + 1
        return jnp.minimum(n, m) + w

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = budgets(mid).sum(0) <= total
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(n_keep.shape, jnp.float32)
    lo, _ = jax.lax.fori_loop(0, STEPS, step, (lo, jnp.full(n_keep.shape, 1.0 + 1e-6, jnp.float32)))
    return budgets(lo).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PrefixKV(SnapKV):
    """Importance: SnapKV window attention (window 32, kernel 5, avg pooling); ragged: the final
    cache as one cache per layer of its own budget (False: stacked at the largest)."""

    window: int = 32
    kernel: int = 5
    pool: str = "avg"
    ragged: bool = True

    def max_keep(self, n_keep: int, context: int) -> int:
        if np.any(np.asarray(n_keep) <= self.window):
            raise ValueError(f"PrefixKV budget ({int(np.min(n_keep))} tokens per head) must exceed the "
                             f"observation window ({self.window})")
        return context                                       # a layer may keep its whole context

    def budgets(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        b = prefix_budgets(scores, obs.cache.positions >= 0, n_keep)
        return jnp.broadcast_to(b[..., None], scores.shape[:3])

    def finalize(self, new, obs, idx):
        if self.ragged and isinstance(new, kvcache.KVCache):
            return from_stacked(new)
        return new
