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
Cost: sets are contiguous runs, so pivots, kernel widths and weighted sums are segment reductions
over set ids: every intermediate is [B, Hkv, S] or [B, Hkv, S, d] (the round before built an
S x S same-set matrix per head and a K x S weight matrix).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.policies.merging import HeavyRecent, evicted_mask


def merging_sets(keys: jax.Array, mergeable: jax.Array, eps: float) -> jax.Array:
    """Set id per slot [..., S] (int32): a new set starts at every slot that is not mergeable, whose
    predecessor is not, or whose key has cosine < eps with its predecessor's. keys [..., S, d]."""
    k = keys.astype(jnp.float32)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    adj = jnp.sum(k[..., 1:, :] * k[..., :-1, :], -1)                            # cos(k_{j-1}, k_j)
    join = mergeable[..., 1:] & mergeable[..., :-1] & (adj >= eps)
    start = jnp.concatenate([jnp.ones(join.shape[:-1] + (1,), bool), ~join], -1)
    return (jnp.cumsum(start, -1) - 1).astype(jnp.int32)


def segment_reduce(x: jax.Array, seg: jax.Array, how: str) -> jax.Array:
    """Per-segment sum / max / min of x [..., S] (or [..., S, d]) over segment ids seg [..., S] in [0, S),
    one segment space per leading row: [..., S] (or [..., S, d]) indexed by segment id. O(S) memory."""
    lead = seg.shape[:-1]
    s = seg.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    flat = (seg.reshape(rows, s) + s * jnp.arange(rows)[:, None]).reshape(-1)
    op = {"sum": jax.ops.segment_sum, "max": jax.ops.segment_max, "min": jax.ops.segment_min}[how]
    out = op(x.reshape((rows * s,) + x.shape[seg.ndim:]), flat, num_segments=rows * s)
    return out.reshape(x.shape)


def segment_gather(per_set: jax.Array, seg: jax.Array) -> jax.Array:
    """Each slot's value of its segment: per_set [..., S(, d)] indexed by seg [..., S]."""
    idx = seg if per_set.ndim == seg.ndim else seg[..., None]
    return jnp.take_along_axis(per_set, idx, axis=seg.ndim - 1)


def set_pivots(set_id: jax.Array, scores: jax.Array, mergeable: jax.Array) -> jax.Array:
    """[..., S] slot index of each slot's set pivot (highest score among its set's mergeable
    slots, the first on ties; S for sets without a mergeable slot). Segment reductions: O(S)."""
    s = set_id.shape[-1]
    sc = jnp.where(mergeable, scores.astype(jnp.float32), -jnp.inf)
    best = segment_gather(segment_reduce(sc, set_id, "max"), set_id)
    slot = jnp.broadcast_to(jnp.arange(s), set_id.shape)
    cand = jnp.where(mergeable & (sc >= best), slot, s)
    return segment_gather(segment_reduce(cand, set_id, "min"), set_id)
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
        """Per set (contiguous, so segment reductions over set ids): the evicted mergeable members'
        kernel weights and weighted sums, then each kept pivot's row reads its set's sums. Every
        intermediate is [B, Hkv, S] or [B, Hkv, S, d]: O(S), no slot x slot matrix."""
        s = old.capacity
        mergeable = old.valid & jnp.isfinite(scores)              # the protected recent tokens never merge
        sid = merging_sets(old.keys, mergeable, self.eps)
        piv = set_pivots(sid, scores, mergeable)                                   # [B, Hkv, S]
        member = mergeable & evicted_mask(old, idx)
        kf = old.keys.astype(jnp.float32)
        vf = old.values.astype(jnp.float32)
        kp = jnp.take_along_axis(kf, jnp.clip(piv, 0, s - 1)[..., None], -2)       # each slot's pivot key
        d2 = jnp.where(member, jnp.sum((kp - kf) ** 2, -1), 0.0)
        if self.sigma > 0:
            var = jnp.full(d2.shape, self.sigma ** 2, jnp.float32)
        else:
            n = segment_gather(segment_reduce(member.astype(jnp.float32), sid, "sum"), sid)
            var = segment_gather(segment_reduce(d2, sid, "sum"), sid) / jnp.maximum(n, 1.0)
        w = jnp.where(member, jnp.exp(-d2 / (2 * jnp.maximum(var, 1e-30))), 0.0)   # [B, Hkv, S]
        w_sum = segment_reduce(w, sid, "sum")                                      # per set id
        k_sum = segment_reduce(w[..., None] * kf, sid, "sum")
        v_sum = segment_reduce(w[..., None] * vf, sid, "sum")
        safe = jnp.clip(idx, 0, s - 1)
        is_pivot = (jnp.take_along_axis(piv, safe, -1) == safe) & (idx >= 0)       # [B, Hkv, K]
        row_sid = jnp.take_along_axis(sid, safe, -1)                               # kept row's set id
        ws = jnp.where(is_pivot, jnp.take_along_axis(w_sum, row_sid, -1), 0.0)[..., None]
        add = lambda per_set: jnp.where(is_pivot[..., None], jnp.take_along_axis(per_set, row_sid[..., None], -2), 0.0)
        k0 = jnp.take_along_axis(kf, safe[..., None], -2)
        v0 = jnp.take_along_axis(vf, safe[..., None], -2)
        k = (k0 + add(k_sum)) / (1.0 + ws)                  # the pivot's own kernel weight is exp(0) = 1
        v = (v0 + add(v_sum)) / (1.0 + ws)
        return k, v
