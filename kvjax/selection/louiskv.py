"""LouisKV (Wu et al., arXiv 2510.11292, ICLR'26): retrieval at semantic boundaries over clustered
prompt KV and segmented generated KV.

Spec (`quantization_and_sparse_attention.md` §9, abstract level; no public code): critical KVs show
temporal locality, so retrieval runs only at **semantic boundaries**; the prompt KV is grouped into
semantic **clusters** and the generated KV into contiguous **segments**, and these are the
retrieval units. The spec gives no numbers: every default below is ours **[unverified]**.

- Units: when the layer is wrapped (after the prefill) the live prompt keys of each (batch,
  kv-head) are clustered by `kmeans_iters` Lloyd iterations (squared Euclidean distance on the
  stored post-RoPE keys), ceil(n_prompt / cluster_size) clusters initialised at evenly spaced
  prompt tokens. Every `segment_size` tokens generated after that form one segment. A unit's
  centroid is the mean of its keys (a running sum + count, updated on append), so q . centroid is
  the unit's mean logit.
- Boundary trigger: the layer retrieves again when the cosine between the step's query (all query
  heads of the layer, concatenated) and the query of the last retrieval falls below `threshold`
  (the first decode step always retrieves); otherwise the last selection is reused.
- Retrieval: unit score = max over the GQA group of q_h . centroid; every candidate token takes
  its unit's score and the top `budget - n_local` tokens are selected (whole units best first; the
  last one may be cut at the budget, older tokens first). The newest `n_local` tokens are always
  attended (recomputed every step: the tokens generated since the last retrieval).

Selects over the dense engine cache or a KIVI cache (`kvjax.selection.quantized`: clusters of the
full-precision or the dequantized prompt keys; the selected tokens gathered and dequantized).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.selection.base import (SelectorBase, cosine_reuse, middle_candidates, neg_inf_topk, scatter_slots,
                                  sink_and_local)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LouisMeta:
    """unit [b, h, capacity] int32: the unit of each slot (-1: none); sums [b, h, units, d] float32
    and counts [b, h, units] int32 of the unit keys (units = clusters, then segments); prompt_end
    [b, h] int32: the first slot after the clustered prompt."""

    unit: jax.Array
    sums: jax.Array
    counts: jax.Array
    prompt_end: jax.Array


def kmeans_units(keys: jax.Array, live: jax.Array, n_clusters: int, cluster_size: int, iters: int) -> jax.Array:
    """Cluster ids [b, h, S] (-1: not live) of the live keys [b, h, S, d] (float32).

    Per row: k = ceil(n_live / cluster_size) clusters (at most n_clusters) initialised at the live
    tokens of rank floor(j n_live / k), then `iters` Lloyd steps (assign to the nearest centroid by
    squared distance, ties to the lower id; recenter on the members' mean, an empty cluster keeps
    its centroid)."""
    n = jnp.sum(live, axis=-1)                                                      # [b, h]
    k = jnp.clip(-(-n // cluster_size), 1, n_clusters)
    j = jnp.arange(n_clusters)
    active = j < k[..., None]                                                       # [b, h, C]
    rank = jnp.cumsum(live, axis=-1) - 1                                            # rank among live slots
    want = (j * n[..., None]) // k[..., None]                                       # [b, h, C]
    hit = live[..., None, :] & (rank[..., None, :] == want[..., None])              # [b, h, C, S]
    cent = jnp.einsum("bhcs,bhsd->bhcd", hit.astype(jnp.float32), keys)

    def assign(cent):
        d2 = (jnp.sum(cent ** 2, -1)[..., None, :] - 2 * jnp.einsum("bhsd,bhcd->bhsc", keys, cent))
        d2 = jnp.where(active[..., None, :], d2, jnp.inf)
        return jnp.argmin(d2, axis=-1)                                              # [b, h, S]

    def lloyd(_, cent):
        onehot = (assign(cent)[..., None] == j) & live[..., None]                  # [b, h, S, C]
        cnt = jnp.sum(onehot, axis=2)
        tot = jnp.einsum("bhsc,bhsd->bhcd", onehot.astype(jnp.float32), keys)
        return jnp.where((cnt > 0)[..., None], tot / jnp.maximum(cnt, 1)[..., None], cent)

    cent = jax.lax.fori_loop(0, iters, lloyd, cent)
    return jnp.where(live, assign(cent), -1).astype(jnp.int32)


def unit_sums(keys: jax.Array, unit: jax.Array, n_units: int) -> tuple[jax.Array, jax.Array]:
    """(sums [b, h, U, d] float32, counts [b, h, U] int32) of the keys [b, h, S, d] per unit id."""
    onehot = unit[..., None] == jnp.arange(n_units)
    return (jnp.einsum("bhsu,bhsd->bhud", onehot.astype(jnp.float32), keys.astype(jnp.float32)),
            jnp.sum(onehot, axis=2).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class LouisKV(SelectorBase):
    """budget: attended tokens per kv head (n_local newest + the retrieved units' tokens)."""

    budget: int = 1024
    n_local: int = 64
    threshold: float = 0.8
    cluster_size: int = 16
    segment_size: int = 16
    kmeans_iters: int = 8
    page_size: int = 1
    interval: int = 1
    dense_layers: int = 0
    quantized_ok = True          # selects over a KIVI layer too (kvjax.selection.quantized)

    def __post_init__(self):
        super().__post_init__()
        if self.page_size != 1:
            raise ValueError("LouisKV selects tokens of its units: page_size must be 1")
        if not 1 <= self.n_local < self.budget:
            raise ValueError(f"LouisKV: need 1 <= n_local < budget, got n_local={self.n_local}, budget={self.budget}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"LouisKV: threshold is a cosine in [-1, 1], got {self.threshold}")
        for name in ("cluster_size", "segment_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"LouisKV: {name} must be >= 1, got {getattr(self, name)}")
        if self.kmeans_iters < 0:
            raise ValueError(f"LouisKV: kmeans_iters must be >= 0, got {self.kmeans_iters}")

    @classmethod
    def from_budget(cls, budget: int, **kw) -> "LouisKV":
        kw.setdefault("n_local", max(1, min(64, budget // 8)))
        return cls(budget=budget, **kw)

    @property
    def always_fresh(self) -> bool:
        return False

    def reuse(self, state, fingerprint):
        """No semantic boundary: the query is still similar to the one of the last retrieval."""
        return cosine_reuse(state, fingerprint, self.threshold)

    def n_select(self, capacity: int) -> int:
        return min(self.budget - self.n_local, capacity)

    def n_units(self, capacity: int) -> tuple[int, int]:
        """(clusters, segments) the metadata has rows for."""
        return math.ceil(capacity / self.cluster_size), math.ceil(capacity / self.segment_size)

    def meta_read_bytes(self, meta, kv) -> int:
        """A retrieval reads the unit sums and counts, and the slot -> unit map."""
        return kvcache.tree_bytes(meta)

    def init_meta(self, kv: kvcache.KVCache, config=None) -> LouisMeta:
        n_c, n_s = self.n_units(kv.capacity)
        keys = kv.keys.astype(jnp.float32)
        live = kv.positions >= 0
        unit = kmeans_units(keys, live, n_c, self.cluster_size, self.kmeans_iters)
        sums, counts = unit_sums(keys, unit, n_c + n_s)
        return LouisMeta(unit=unit, sums=sums, counts=counts, prompt_end=kv.lengths.astype(jnp.int32))

    def append_meta(self, meta: LouisMeta, kv, keys, positions, keys_pre_rope=None) -> LouisMeta:
        """New tokens join the segment of their slot: (slot - prompt_end) // segment_size."""
        n_c, n_s = self.n_units(kv.capacity)
        slots = scatter_slots(kv, keys.shape[2])                                    # [b, h, new]
        ok = (positions[:, None, :] >= 0) & (slots < kv.capacity)
        seg = n_c + jnp.minimum((slots - meta.prompt_end[..., None]) // self.segment_size, n_s - 1)
        u = jnp.where(ok, seg, -1).astype(jnp.int32)
        add_s, add_c = unit_sums(keys, u, n_c + n_s)
        b_i = jnp.arange(slots.shape[0])[:, None, None]
        h_i = jnp.arange(slots.shape[1])[None, :, None]
        unit = meta.unit.at[b_i, h_i, jnp.where(ok, slots, kv.capacity)].set(u, mode="drop")
        return dataclasses.replace(meta, unit=unit, sums=meta.sums + add_s, counts=meta.counts + add_c)

    def unit_scores(self, meta: LouisMeta, q: jax.Array) -> jax.Array:
        """q [b, q_heads, 1, d] -> [b, kv_heads, units] max over the group of q . centroid (-inf: empty)."""
        b, h, n, d = meta.sums.shape
        qg = q[:, :, 0].reshape(b, h, -1, d).astype(jnp.float32)
        cent = meta.sums / jnp.maximum(meta.counts, 1)[..., None]
        s = jnp.max(jnp.einsum("bhgd,bhud->bhgu", qg, cent), axis=2)
        return jnp.where(meta.counts > 0, s, -jnp.inf)

    def select(self, meta: LouisMeta, kv, q, query_positions):
        us = self.unit_scores(meta, q)
        tok = jnp.take_along_axis(us, jnp.clip(meta.unit, 0, None), axis=-1)
        cand = middle_candidates(kv, 0, self.n_local) & (meta.unit >= 0)
        return neg_inf_topk(jnp.where(cand, tok, -jnp.inf), self.n_select(kv.capacity))

    def forced(self, meta, kv):
        """The newest n_local live tokens."""
        return sink_and_local(kv, 0, self.n_local)


__all__ = ["LouisKV", "LouisMeta", "kmeans_units", "unit_sums"]
