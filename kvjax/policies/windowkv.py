"""WindowKV (arXiv 2503.17922; optim996/WindowKV `models/compress_utils.py`): keep whole windows
of consecutive tokens, scored by the observation window.

A_sum = sum over the last `suffix` queries of their softmax attention (every query head). The
prefix (live tokens before the suffix) is cut into consecutive windows of `size` (8) tokens from
its first token; a window's score is

    average:  mean of A_sum over (query heads x its tokens)
    max:      per query head the mean of its top size//2 values in the window, averaged over heads

and every token gets its window's score (one index set per layer, shared by all heads); the
suffix is always kept. `compress` then keeps the top tokens to the budget, i.e. the best windows
(the official code drops the ceil((len - budget) / size) lowest windows; here a budget that is
not `suffix` + a multiple of `size` keeps the older part of the boundary window, so the budget
is met exactly). Official task adaptivity: a BERT classifier picks `max` with suffix 32 for QA
prompts, `average` with suffix 16 otherwise; no classifier here: `strategy` and `suffix` are
arguments (default average / 16).

Left out: index sharing across groups of `shared_layers=8` layers and the arithmetic per-group
budget schedule (beta 14): the policy interface scores one layer at a time (every layer scores
its own windows here). Windows are consecutive live slots, which are consecutive positions in a
prefilled cache; the live slots of head 0 define them (equal on every head of a prefill cache).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy, newest_mask, protect, window_scores


@dataclasses.dataclass(frozen=True)
class WindowKV(ScoringPolicy):
    """suffix: observation queries (= always-kept newest tokens); size: tokens per window;
    strategy: 'average' | 'max'."""

    suffix: int = 16
    size: int = 8
    strategy: str = "average"

    def __post_init__(self):
        if self.suffix < 1 or self.size < 1:
            raise ValueError(f"WindowKV: suffix and size must be positive, got {self.suffix}, {self.size}")
        if self.strategy not in ("average", "max"):
            raise ValueError(f"WindowKV: strategy must be 'average' or 'max', got {self.strategy!r}")

    @property
    def observe(self) -> Observe:
        return Observe(window=self.suffix)

    def window_slots(self, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """positions [L, B, Hkv, S] -> (slots [L, B, W, size] clipped, member bool [L, B, W, size],
        window index of each slot [L, B, S] (-1 outside the prefix))."""
        pos0 = positions[:, :, 0]                                               # [L, B, S]
        s = pos0.shape[-1]
        live = pos0 >= 0
        start = jnp.argmax(live, axis=-1).astype(jnp.int32)
        n_prefix = jnp.sum(live, axis=-1).astype(jnp.int32) - self.suffix
        n_win = -(-s // self.size)
        j = jnp.arange(n_win * self.size, dtype=jnp.int32).reshape(n_win, self.size)
        member = j < n_prefix[..., None, None]
        slots = jnp.minimum(start[..., None, None] + j, s - 1)
        off = jnp.arange(s, dtype=jnp.int32) - start[..., None]
        win = jnp.where((off >= 0) & (off < n_prefix[..., None]), off // self.size, -1)
        return slots, member, win

    def score(self, obs: Observation) -> jax.Array:
        a = window_scores(obs, self.suffix)                                     # [L, B, Hq, S]
        l, b, hq, s = a.shape
        slots, member, win = self.window_slots(obs.cache.positions)
        w, size = slots.shape[-2:]
        g = jnp.take_along_axis(a, slots.reshape(l, b, 1, w * size), axis=-1).reshape(l, b, hq, w, size)
        m = member[:, :, None]
        if self.strategy == "average":
            ws = jnp.sum(jnp.where(m, g, 0.0), axis=(2, 4)) / (hq * jnp.maximum(jnp.sum(member, -1), 1))
        else:
            k = max(self.size // 2, 1)
            top = jax.lax.top_k(jnp.where(m, g, -jnp.inf), k)[0]                   # [L, B, Hq, W, k]
            fin = jnp.isfinite(top)
            per_head = jnp.sum(jnp.where(fin, top, 0.0), -1) / jnp.maximum(jnp.sum(fin, -1), 1)
            ws = per_head.mean(axis=2)                                          # [L, B, W]
        tok = jnp.where(win >= 0, jnp.take_along_axis(ws, jnp.maximum(win, 0), axis=-1), -jnp.inf)
        hkv = obs.cache.positions.shape[2]
        tok = jnp.broadcast_to(tok[:, :, None], (l, b, hkv, s))
        return protect(tok, newest_mask(obs.cache.positions, self.suffix))
