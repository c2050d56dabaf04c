"""EMS (Li et al., 2024, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression
Based on Global-Local Importance", arXiv 2412.08521). No public code: written from the paper's
summary and the spec (tagged [unverified]).

Score (Global-Local), per kv head, for live slot j of a prompt whose newest position is P:

    global_j = acc_j / (P - pos_j + 1)            accumulated attention over the queries that can
                                                   see j (removes the causal bias toward old tokens)
    local_j  = (1/w) sum_{i in window} A_ij        mean attention of the last w queries
    score_j  = global_j + local_j                  (GQA: summed over the group, as H2O's state)

The window's own tokens are always kept. Per head, evict-then-merge of the low-score tokens E:

    c_e = max_{r kept} cos(k_e, k_r),  r*(e) its argmax
    redundant head:  mean_{e in E} c_e >= head_threshold   -> every e merges into its class centre
                     k_r <- mean({k_r} u {k_e : r*(e) = r})  (same for v)
    sparse head:     the evicted tokens go to the "zero class" (dropped)

EMS's zero class is what lets all heads run with one shape; here every head keeps exactly its
budget of slots anyway. [unverified] choices: the sum of global and local, the head rule (mean
nearest-centre similarity vs `head_threshold`, default 0.5) and the plain mean into centres.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy, group_reduce, newest_mask, protect, window_scores
from kvjax.policies.h2o import H2O
from kvjax.policies.merging import apply_weights, into_rows, nearest_kept, one_hot_kept


def global_local(acc: jax.Array, local: jax.Array, positions: jax.Array) -> jax.Array:
    """[L, B, Hkv, S] EMS score from the accumulated attention acc, the window mean attention
    local (both [L, B, Hkv, S]) and slot positions (-1 = empty)."""
    seen = positions.max(-1, keepdims=True) - positions + 1
    return jnp.where(positions >= 0, acc / jnp.maximum(seen, 1) + local, 0.0)


@dataclasses.dataclass(frozen=True)
class EMS(ScoringPolicy):
    """window: local observation queries (always kept) [unverified] 32; head_threshold: mean
    nearest-centre cosine above which a head merges its evicted tokens (in [-1, 1]; 1 = never)."""

    window: int = 32
    head_threshold: float = 0.5

    accumulates = True
    merges = True

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if not -1 <= self.head_threshold <= 1:
            raise ValueError(f"head_threshold is a cosine similarity in [-1, 1], got {self.head_threshold}")

    @property
    def observe(self) -> Observe:
        return Observe(window=self.window)

    def accumulate(self, obs: Observation) -> jax.Array:
        return H2O().accumulate(obs)

    def score(self, obs: Observation) -> jax.Array:
        hkv = obs.cache.keys.shape[2]
        local = group_reduce(window_scores(obs, self.window), hkv, "mean") * (
            obs.window_probs.shape[2] // hkv) / min(self.window, obs.window_probs.shape[-2])
        s = global_local(obs.accumulated, local, obs.cache.positions)
        return protect(s, newest_mask(obs.cache.positions, self.window))

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        c, row, ev = nearest_kept(old, idx)                                        # [B, Hkv, S]
        mean_c = jnp.sum(c, -1) / jnp.maximum(ev.sum(-1), 1)                       # [B, Hkv]
        go = ev & (mean_c >= self.head_threshold)[..., None]
        into = into_rows(row, go, idx.shape[-1]).astype(jnp.float32)               # [B, Hkv, K, S]
        eye = one_hot_kept(idx, old.capacity)
        w = (eye + into) / (1.0 + into.sum(-1, keepdims=True))
        return apply_weights(old, w, w)
