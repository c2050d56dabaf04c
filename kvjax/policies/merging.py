"""Shared pieces of the merging policies (CAM, D2O, KVMerger): which slots a head kept or evicted,
and the weighted merge of a layer's tokens into its kept slots.

A merging policy selects like any scoring policy (`ScoringPolicy.score` -> top-k per head), then
`ScoringPolicy.merge` returns the kept slots' new keys / values. Here they are written as
`k'_r = sum_s W[r, s] k_s` over the layer's old slots s (W: a [B, Hkv, K, S] weight matrix per
head, the identity on kept slots when nothing is merged), so every merge is one batched matmul
and the cache stays at the budget: K slots per head, merged values in place of the kept ones.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.policies.base import Observation
from kvjax.policies.h2o import H2O
from kvjax.policies.keyformer import newest_per_row


def kept_mask(idx: jax.Array, slots: int) -> jax.Array:
    """[B, Hkv, S] bool: slot kept, from kept indices idx [B, Hkv, K] (-1 = none)."""
    hit = (idx[..., :, None] == jnp.arange(slots)) & (idx[..., :, None] >= 0)   # [B, Hkv, K, S]
    return hit.any(-2)


def one_hot_kept(idx: jax.Array, slots: int) -> jax.Array:
    """[B, Hkv, K, S] float32: row r is the one-hot of kept slot idx[r] (zero rows for -1)."""
    return ((idx[..., :, None] == jnp.arange(slots)) & (idx[..., :, None] >= 0)).astype(jnp.float32)


def evicted_mask(old: kvcache.KVCache, idx: jax.Array) -> jax.Array:
    """[B, Hkv, S] bool: live slots of `old` that selection dropped."""
    return old.valid & ~kept_mask(idx, old.capacity)


def apply_weights(old: kvcache.KVCache, wk: jax.Array, wv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kept slots' keys / values as weighted sums of the old slots: wk, wv [B, Hkv, K, S] ->
    (keys [B, Hkv, K, d], values [B, Hkv, K, dv]) in float32."""
    k = jnp.einsum("bhks,bhsd->bhkd", wk, old.keys.astype(jnp.float32))
    v = jnp.einsum("bhks,bhsd->bhkd", wv, old.values.astype(jnp.float32))
    return k, v


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Pairwise cosine similarity: a [..., M, d], b [..., N, d] -> [..., M, N] (float32)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    nb = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.einsum("...md,...nd->...mn", na, nb)


def nearest_kept(old: kvcache.KVCache, idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each evicted slot's most similar kept key (cosine): (c [B, Hkv, S] its similarity, 0 on
    slots not evicted; row [B, Hkv, S] the kept row r* of idx it is closest to; ev [B, Hkv, S])."""
    s = old.capacity
    ev = evicted_mask(old, idx)
    kept_keys = jnp.take_along_axis(old.keys, jnp.clip(idx, 0, s - 1)[..., None], axis=-2)
    sim = cosine(old.keys, kept_keys)                                             # [B, Hkv, S(e), K(r)]
    sim = jnp.where((idx >= 0)[..., None, :], sim, -jnp.inf)
    return jnp.where(ev, sim.max(-1), 0.0), sim.argmax(-1), ev


def into_rows(row: jax.Array, go: jax.Array, kept: int) -> jax.Array:
    """[B, Hkv, K, S] bool: evicted slot s (go) merges into kept row row[s]."""
    return (jnp.arange(kept)[:, None] == row[..., None, :]) & go[..., None, :]


@dataclasses.dataclass(frozen=True)
class HeavyRecent(H2O):
    """The selection D2O and KVMerger merge after (H2O style): heavy hitters by accumulated attention
    (summed over the GQA group) plus the newest `recent` share of each head's budget (H2O's and
    D2O's 0.1 heavy + 0.1 recent split -> 0.5)."""

    recent: float = 0.5

    def __post_init__(self):
        if not 0 <= self.recent <= 1:
            raise ValueError(f"recent must be a share of the budget in [0, 1], got {self.recent}")

    def score(self, obs: Observation) -> jax.Array:
        return obs.accumulated

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        n_recent = jnp.floor(self.recent * n_keep + 1e-6).astype(jnp.int32)
        return jnp.where(newest_per_row(obs.cache.positions, n_recent), jnp.inf, scores)
