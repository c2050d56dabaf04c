"""Prefill attention of one layer through `pallas_kernels.block_sparse_prefill`.

`attend(method, q, layer_cache, query_positions, layer=..., observe=..., backend=...)` is what
`models.llama.decoder_layer` calls in place of the cache's own `attend` for a prefill chunk
(several queries) when `generate(..., prefill_attention=...)` is given: the method builds its
block mask from the chunk's queries and the cache's keys, the kernel computes attention over the
listed blocks (element-wise causal / live mask inside them). Decode steps never come here.

Backend: "auto" runs the Triton kernel on gpu, the Mosaic kernel on tpu and the jnp reference
elsewhere; "xla" the reference; "interpret" the GPU kernel in interpret mode; "pallas" the kernel
(error on cpu) -- the names of `kvjax.attention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import _attend_xla, decode_impl, mask_padded_queries
from kvjax.observation import Observe
from kvjax.sparse_prefill.base import Geometry, density_counts, group_union, to_lists


def block_mask(method, q: jax.Array, keys: jax.Array, starts: jax.Array, lengths: jax.Array, layer,
               scale: float) -> tuple[jax.Array, Geometry]:
    """The method's kv-head block mask [b, hkv, nqb, nkb] (union over each kv head's query heads)
    and its geometry. q [b, hq, T, d] post-RoPE; keys [b, hkv, S, d]; starts, lengths [b, hkv]."""
    geo = Geometry(t=q.shape[2], s=keys.shape[2], block_size=method.block_size,
                   starts=starts.astype(jnp.int32), lengths=lengths.astype(jnp.int32))
    mask = method.select(q, keys, geo, layer, scale)
    hkv = keys.shape[1]
    if mask.shape[1] != hkv:
        mask = group_union(mask, hkv)
    return mask & geo.live_blocks(), geo


def attend(method, q: jax.Array, cache, query_positions: jax.Array, *, layer=0,
           observe: Observe = Observe(), backend: str = "auto", scale: float | None = None):
    """Block-sparse prefill attention of new queries over a dense cache layer.

    q: [batch, q_heads, T, head_dim] post-RoPE (T > 1); cache: `kvjax.cache.KVCache` of one layer
    (live slots [first live, lengths), this chunk's keys last -- the engine's invariant);
    query_positions: [batch, T] (-1 = padding: zeros out).
    returns (out [batch, q_heads, T, head_dim], observations): the requested window observation
    computed apart from the last `window` queries (dense, as the flash path does) and
    "prefill_density" [batch, kv_heads, 2] (listed live blocks, live blocks)."""
    import pallas_kernels
    from kvjax import cache as kvcache
    if not isinstance(cache, kvcache.KVCache):
        raise TypeError(f"block-sparse prefill needs the dense KVCache, got {type(cache).__name__} "
                        f"(quantized / packed caches are not supported)")
    if observe.column_sums:
        raise ValueError("block-sparse prefill cannot return column sums (a policy scoring every query, "
                         "e.g. H2O): use the dense prefill for it")
    b, hq, t, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    from kvjax.attention import live_starts
    starts = live_starts(cache.positions, cache.lengths)
    mask, geo = block_mask(method, q, cache.keys, starts, cache.lengths, layer, scale)
    idx, counts = to_lists(mask)
    sel = decode_impl("block_sparse_prefill", backend)
    impl, interpret = sel if sel is not None else ("reference", False)
    out = pallas_kernels.block_sparse_prefill(q, cache.keys, cache.values, starts, cache.lengths.astype(jnp.int32),
                                              idx, counts, block_size=method.block_size, scale=scale,
                                              impl=impl, interpret=interpret)
    out = mask_padded_queries(out, query_positions)
    obs = {}
    if observe.window:
        w = min(observe.window, t)
        obs = _attend_xla(q[:, :, t - w:], cache.keys, cache.values, cache.positions, query_positions[:, t - w:],
                          scale, Observe(window=w))[1]
    obs["prefill_density"] = density_counts(mask, geo)
    return out, obs
