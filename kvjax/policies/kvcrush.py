"""KVCrush (Jha et al., Intel, 2025, "KVCrush: Key value cache size-reduction using similarity in
head-behaviour", arXiv 2503.00022). No public code: written from the paper's summary and the spec
(tagged [unverified]).

A base selection (SnapKV's window attention here) keeps `1 - share` of each head's budget; the
other `share` goes to representatives of the tokens it dropped, chosen by head behaviour:

1. Signature: token j's binary vector over the layer's kv heads, bit h = j is in head h's base
   selection (its top n_base = n_keep - n_rep tokens).
2. Distance: Hamming distance of the signature to an anchor vector (alternating 0101..., one of
   the paper's anchors [unverified]), shared by all heads of the layer.
3. Buckets, per head: the head's dropped live tokens sorted by (distance, slot), cut into n_rep
   consecutive buckets of (nearly) equal size; each bucket's first token is kept.
   Candidate rank r (0-based, of n_cand) starts a bucket iff floor(r n_rep / n_cand) differs from
   floor((r-1) n_rep / n_cand) (all candidates are kept if n_cand <= n_rep).

n_rep = floor(share * n_keep) ([unverified] share 0.25; the paper spends 25-50% of the budget).
Representatives are protected (+inf) so `select` keeps exactly them plus the base top n_base.
[unverified] choices: signatures over kv heads (the engine's scores are per kv head; the paper's
are over attention heads), the anchor, and first-of-bucket representatives.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation
from kvjax.policies.snapkv import SnapKV


def top_mask(scores: jax.Array, valid: jax.Array, n: jax.Array) -> jax.Array:
    """[L, B, Hkv, S] bool: slot is among its head's top `n [B]` live slots (ties: older first)."""
    s = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return valid & (rank < n[None, :, None, None])


def representatives(base: jax.Array, valid: jax.Array, n_rep: jax.Array) -> jax.Array:
    """[L, B, Hkv, S] bool: the bucket representatives among each head's dropped live slots.

    base: the base selection [L, B, Hkv, S] (also the signature bits); n_rep [B]."""
    hkv, s = base.shape[-2:]
    anchor = (jnp.arange(hkv) % 2 == 1)[:, None]                                   # 0101...
    dist = jnp.sum(base != anchor, axis=-2, keepdims=True)                         # [L, B, 1, S]
    cand = valid & ~base
    key = jnp.where(cand, dist * s + jnp.arange(s), hkv * s + s)                   # (distance, slot)
    rank = jnp.argsort(jnp.argsort(key, axis=-1), axis=-1)                         # candidate rank
    n_cand = cand.sum(-1, keepdims=True)
    m = n_rep[None, :, None, None]
    starts = (rank * m) // jnp.maximum(n_cand, 1) != ((rank - 1) * m) // jnp.maximum(n_cand, 1)
    return cand & jnp.where(n_cand <= m, True, starts)


@dataclasses.dataclass(frozen=True)
class KVCrush(SnapKV):
    """SnapKV base (window 64, kernel 5, avg); share: budget share of the bucket representatives."""

    share: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.share < 1:
            raise ValueError(f"share is the budget share of representatives, in [0, 1), got {self.share}")

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        valid = obs.cache.positions >= 0
        n_rep = jnp.floor(self.share * n_keep + 1e-6).astype(jnp.int32)
        base = top_mask(scores, valid, n_keep - n_rep)
        return jnp.where(representatives(base, valid, n_rep), jnp.inf, scores)
