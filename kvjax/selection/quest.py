"""Quest (Tang et al., ICML'24, mit-han-lab/Quest): query-aware page selection.

Metadata per page of `page_size` (16) slots: the element-wise min m and max M of its live keys
([batch, kv_heads, pages, d], the keys' dtype) and its live-slot count ([batch, kv_heads, pages]
int32), updated by scatter-min/max on every append. The page score is the upper bound of q.k over
the page,

    score(page) = sum_c max(q_c m_c, q_c M_c),

taken per query head and maxed over the heads of a GQA group (one page set per kv head, an upper
bound for every head that shares it; the Quest paper is MHA). The top `budget // page_size - 1`
pages are attended together with the page holding the newest token (always, recomputed every
step). Empty pages never score. The first `dense_layers=2` layers stay dense.

Composes with KIVI (`kvjax.selection.quantized`): page min/max of the full-precision keys when the
prefill's dense cache is given, else of the dequantized keys; the selected pages are gathered and
dequantized for attention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.selection.base import SelectorBase, neg_inf_topk, scatter_slots


@dataclasses.dataclass(frozen=True)
class Quest(SelectorBase):
    """budget: attended tokens per kv head (pages = budget // page_size, the newest page included)."""

    budget: int = 1024
    page_size: int = 16
    interval: int = 1
    dense_layers: int = 2
    quantized_ok = True          # selects over a KIVI layer too (kvjax.selection.quantized)

    def __post_init__(self):
        super().__post_init__()
        if self.budget < 2 * self.page_size:
            raise ValueError(f"Quest: budget {self.budget} must hold at least two pages of {self.page_size} tokens")

    def n_select(self, capacity: int) -> int:
        """Query-selected pages (the newest page is forced apart)."""
        return min(self.budget // self.page_size - 1, capacity // self.page_size)

    def tokens_read(self, capacity: int) -> int:
        return min((self.n_select(capacity) + 1) * self.page_size, capacity)

    def meta_read_bytes(self, meta, kv) -> int:
        return kvcache.tree_bytes(meta)

    def init_meta(self, kv: kvcache.KVCache, config=None):
        """(kmin, kmax [b, h, pages, d], live [b, h, pages]) from the cache's live slots."""
        b, h, cap, d = kv.keys.shape
        p = self.page_size
        k = kv.keys.reshape(b, h, cap // p, p, d)
        live = (kv.positions >= 0).reshape(b, h, cap // p, p)
        big = jnp.asarray(jnp.inf, kv.keys.dtype)
        kmin = jnp.min(jnp.where(live[..., None], k, big), axis=3)
        kmax = jnp.max(jnp.where(live[..., None], k, -big), axis=3)
        return kmin, kmax, jnp.sum(live, axis=-1).astype(jnp.int32)

    def append_meta(self, meta, kv, keys, positions, keys_pre_rope=None):
        """Scatter-min/max the new keys [b, h, new, d] (positions [b, new]) into their pages."""
        kmin, kmax, live = meta
        slots = scatter_slots(kv, keys.shape[2])
        ok = (positions[:, None, :] >= 0) & (slots < kv.capacity)                 # [b, h, new]
        page = jnp.minimum(slots // self.page_size, kmin.shape[2] - 1)
        big = jnp.asarray(jnp.inf, kmin.dtype)
        k = keys.astype(kmin.dtype)
        lo = jnp.where(ok[..., None], k, big)
        hi = jnp.where(ok[..., None], k, -big)
        upd = jax.vmap(jax.vmap(lambda buf, pg, u, op: op(buf, pg, u), in_axes=(0, 0, 0, None)),
                       in_axes=(0, 0, 0, None))
        kmin = upd(kmin, page, lo, lambda b, p, u: b.at[p].min(u))
        kmax = upd(kmax, page, hi, lambda b, p, u: b.at[p].max(u))
        live = upd(live, page, ok.astype(jnp.int32), lambda b, p, u: b.at[p].add(u))
        return kmin, kmax, live

    def page_scores(self, meta, q: jax.Array) -> jax.Array:
        """q [b, q_heads, 1, d] -> [b, kv_heads, pages] float32 upper bounds (-inf: empty page)."""
        kmin, kmax, live = meta
        b, h, n, d = kmin.shape
        qg = q[:, :, 0].reshape(b, h, -1, d).astype(jnp.float32)
        has = live > 0
        lo = jnp.where(has[..., None], kmin.astype(jnp.float32), 0.0)
        hi = jnp.where(has[..., None], kmax.astype(jnp.float32), 0.0)
        ub = jnp.maximum(qg[:, :, :, None, :] * lo[:, :, None], qg[:, :, :, None, :] * hi[:, :, None]).sum(-1)
        return jnp.where(has, jnp.max(ub, axis=2), -jnp.inf)

    def newest_page(self, kv: kvcache.KVCache) -> jax.Array:
        """[b, h] the page of the newest token (the last written slot)."""
        return jnp.maximum(kv.lengths - 1, 0) // self.page_size

    def select(self, meta, kv, q, query_positions):
        scores = self.page_scores(meta, q)
        last = self.newest_page(kv)
        pages = jnp.arange(scores.shape[-1], dtype=jnp.int32)
        scores = jnp.where(pages == last[..., None], -jnp.inf, scores)         # forced apart
        return neg_inf_topk(scores, self.n_select(kv.capacity))

    def forced(self, meta, kv):
        return self.newest_page(kv)[..., None].astype(jnp.int32), (kv.lengths > 0)[..., None]
