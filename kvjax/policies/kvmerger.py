"""KVMerger (Wang et al., 2024, "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks", arXiv 2407.08454). No public code: written from the paper and the spec
(tagged [unverified]).

Selection: heavy hitters + recent tokens, H2O style (`merging.HeavyRecent`). Merging, per head:

1. Merging sets: consecutive non-recent live slots whose keys are similar,
   a slot joins its predecessor's set while cos(k_{j-1}, k_j) >= eps (greedy and contiguous).
2. Pivot of a set: its highest-scoring (accumulated attention) token, the first on ties.
3. If the pivot is kept, it becomes the Gaussian-kernel weighted merge of itself and the set's
   evicted members E:   w_i = exp(-||k_p - k_i||^2 / (2 sigma^2)) / sum_{j in {p} u E} (same),
   k'_p = sum_i w_i k_i,  v'_p = sum_i w_i v_i.
   Kept members other than the pivot stay as they are; evicted members of a set whose pivot is
   evicted are dropped.
[unverified] choices: the spec grows a set while cos(k_pivot, k_j) >= eps; here adjacent keys are
compared (the pivot is only known once the set is). sigma (paper: a fixed kernel width) defaults to
the set's own scale, sigma^2 = mean_{i in E} ||k_p - k_i||^2 (`sigma` > 0 fixes it). eps = 1
(and above any real similarity) merges nothing: the cache is then exactly the eviction's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.policies.merging import HeavyRecent, apply_weights, evicted_mask, one_hot_kept


def merging_sets(keys: jax.Array, mergeable: jax.Array, eps: float) -> jax.Array:
    """Set id per slot [..., S] (int32): a new set starts at every slot that is not mergeable, whose
    predecessor is not, or whose key has cosine < eps with its predecessor's. keys [..., S, d]."""
    k = keys.astype(jnp.float32)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    adj = jnp.sum(k[..., 1:, :] * k[..., :-1, :], -1)                            # cos(k_{j-1}, k_j)
    join = mergeable[..., 1:] & mergeable[..., :-1] & (adj >= eps)
    start = jnp.concatenate([jnp.ones(join.shape[:-1] + (1,), bool), ~join], -1)
    return (jnp.cumsum(start, -1) - 1).astype(jnp.int32)


def set_pivots(set_id: jax.Array, scores: jax.Array, mergeable: jax.Array) -> jax.Array:
    """[..., S] bool: the slot is its set's pivot (highest score, first on ties; mergeable only)."""
    s = set_id.shape[-1]
    same = (set_id[..., :, None] == set_id[..., None, :]) & mergeable[..., None, :]   # [..., S, S]
    sc = jnp.where(mergeable, scores, -jnp.inf)
    best = jnp.max(jnp.where(same, sc[..., None, :], -jnp.inf), -1)                  # set max per slot
    cand = same & (sc[..., None, :] >= best[..., :, None])
    first = jnp.min(jnp.where(cand, jnp.arange(s), s), -1)                            # pivot slot per slot
    return mergeable & (first == jnp.arange(s))


@dataclasses.dataclass(frozen=True)
class KVMerger(HeavyRecent):
    """eps: key-similarity threshold of a merging set, in [-1, 1] ([unverified] default 0.8; the paper
    tunes it per model); sigma: Gaussian kernel width (0 = the set's RMS distance to its pivot)."""

    eps: float = 0.8
    sigma: float = 0.0

    merges = True

    def __post_init__(self):
        super().__post_init__()
        if not -1 <= self.eps <= 1:
            raise ValueError(f"eps is a cosine similarity in [-1, 1], got {self.eps}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0 = adaptive), got {self.sigma}")

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        s = old.capacity
        mergeable = old.valid & jnp.isfinite(scores)              # the protected recent tokens never merge
        sid = merging_sets(old.keys, mergeable, self.eps)
        pivot = set_pivots(sid, scores, mergeable)
        ev = evicted_mask(old, idx)
        safe = jnp.clip(idx, 0, s - 1)
        p_sid = jnp.take_along_axis(sid, safe, -1)                               # [B, Hkv, K]
        p_is = jnp.take_along_axis(pivot, safe, -1) & (idx >= 0)
        member = (p_sid[..., None] == sid[..., None, :]) & (mergeable & ev)[..., None, :] & p_is[..., None]
        kf = old.keys.astype(jnp.float32)
        kp = jnp.take_along_axis(kf, safe[..., None], -2)                          # [B, Hkv, K, d]
        d2 = (jnp.sum(kp ** 2, -1)[..., None] + jnp.sum(kf ** 2, -1)[..., None, :]
              - 2 * jnp.einsum("bhkd,bhsd->bhks", kp, kf))
        d2 = jnp.maximum(d2, 0.0)
        n = member.sum(-1, keepdims=True)
        if self.sigma > 0:
            var = jnp.full(n.shape, self.sigma ** 2, jnp.float32)
        else:
            var = jnp.sum(jnp.where(member, d2, 0.0), -1, keepdims=True) / jnp.maximum(n, 1)
        w = jnp.where(member, jnp.exp(-d2 / (2 * jnp.maximum(var, 1e-30))), 0.0)
        eye = one_hot_kept(idx, s)
        wt = (eye + w) / (1.0 + w.sum(-1, keepdims=True))     # the pivot's own kernel weight is exp(0) = 1
        return apply_weights(old, wt, wt)
