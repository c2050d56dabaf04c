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
    and its geometry. q [b, hq, T, d] post-RoPE; keys [b, hkv, S, d]; starts, lengths [b, hkv].
    A method with column-form verticals has them here as whole blocks (`sparse_pattern` keeps
    them as columns)."""
    geo = _geometry(method, q, keys, starts, lengths)
    return _kv_heads(method.select(q, keys, geo, layer, scale), keys.shape[1]) & geo.live_blocks(), geo


def sparse_pattern(method, q: jax.Array, keys: jax.Array, starts: jax.Array, lengths: jax.Array, layer,
                   scale: float) -> tuple[jax.Array, jax.Array | None, Geometry]:
    """(block mask [b, hkv, nqb, nkb], columns [b, hkv, S] bool or None, geometry): what the
    kernel computes. Columns (MInference's vertical lines in `vertical_form="columns"`) are live
    key slots every query at or after them attends, unioned over each kv head's query heads."""
    if getattr(method, "vertical_form", "blocks") != "columns":
        mask, geo = block_mask(method, q, keys, starts, lengths, layer, scale)
        return mask, None, geo
    geo = _geometry(method, q, keys, starts, lengths)
    blocks, cols = method.select_with_columns(q, keys, geo, layer, scale)
    hkv = keys.shape[1]
    slot = jnp.arange(keys.shape[2], dtype=jnp.int32)
    live = (slot >= geo.starts[..., None]) & (slot < geo.lengths[..., None])
    return _kv_heads(blocks, hkv) & geo.live_blocks(), _kv_heads(cols, hkv) & live, geo


def column_lists(cols: jax.Array, width: int, n_query_blocks: int) -> tuple[jax.Array, jax.Array]:
    """[b, h, S] bool -> the kernel's column lists: (indices [b, h, n_qb, width] int32, the listed
    slots first ascending; counts [b, h, n_qb] int32), the same for every query block (the kernel
    masks each column causally per query). width >= the largest count (a static bound)."""
    order = jnp.argsort(~cols, axis=-1, stable=True)[..., :width].astype(jnp.int32)
    counts = jnp.minimum(cols.sum(-1), width).astype(jnp.int32)
    shape = cols.shape[:2] + (n_query_blocks,)
    return jnp.broadcast_to(order[:, :, None], shape + (width,)), jnp.broadcast_to(counts[..., None], shape)


def column_density(mask: jax.Array, cols: jax.Array, geo: Geometry) -> jax.Array:
    """[b, h, nqb] float32: a query block's columns outside its listed blocks, in blocks (a column
    costs 1 / block_size of a block; counted in every live key block, the diagonal one whole)."""
    nkb, bs = geo.nkb, geo.block_size
    per_block = jnp.pad(cols, ((0, 0), (0, 0), (0, nkb * bs - cols.shape[-1]))).reshape(*cols.shape[:2], nkb, bs)
    per_block = per_block.sum(-1).astype(jnp.float32)                              # [b, h, nkb]
    unlisted = (geo.live_blocks() & ~mask).astype(jnp.float32)                     # [b, h, nqb, nkb]
    return jnp.einsum("bhqk,bhk->bhq", unlisted, per_block) / bs


def kernel_lists(method, q: jax.Array, keys: jax.Array, starts: jax.Array, lengths: jax.Array, layer,
                 scale: float) -> tuple[jax.Array, jax.Array, dict, jax.Array]:
    """The kernel's inputs for a method: (block_indices, block_counts, column keywords
    {column_indices, column_counts} or {}, density [b, hkv, 2] = (listed live blocks + unlisted
    columns / block_size, live blocks))."""
    mask, cols, geo = sparse_pattern(method, q, keys, starts, lengths, layer, scale)
    idx, counts = to_lists(mask)
    density = density_counts(mask, geo)
    if cols is None:
        return idx, counts, {}, density
    width = min(keys.shape[2], (q.shape[1] // keys.shape[1]) * method.max_columns(q.shape[2]))
    columns = dict(zip(("column_indices", "column_counts"), column_lists(cols, width, geo.nqb)))
    return idx, counts, columns, density.at[..., 0].add(column_density(mask, cols, geo).sum(-1))


def _geometry(method, q, keys, starts, lengths) -> Geometry:
    return Geometry(t=q.shape[2], s=keys.shape[2], block_size=method.block_size,
                    starts=starts.astype(jnp.int32), lengths=lengths.astype(jnp.int32))


def _kv_heads(mask: jax.Array, hkv: int) -> jax.Array:
    return mask if mask.shape[1] == hkv else group_union(mask, hkv)


def attend(method, q: jax.Array, cache, query_positions: jax.Array, *, layer=0,
           observe: Observe = Observe(), backend: str = "auto", scale: float | None = None):
    """Block-sparse prefill attention of new queries over a dense cache layer.

    q: [batch, q_heads, T, head_dim] post-RoPE (T > 1); cache: `kvjax.cache.KVCache` of one layer
    (live slots [first live, lengths), this chunk's keys last -- the engine's invariant);
    query_positions: [batch, T] (-1 = padding: zeros out).
    returns (out [batch, q_heads, T, head_dim], observations): the requested window observation
    computed apart from the last `window` queries (dense, as the flash path does) and
    "prefill_density" [batch, kv_heads, 2] (listed live blocks + unlisted columns / block_size,
    live blocks)."""
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
    idx, counts, columns, density = kernel_lists(method, q, cache.keys, starts, cache.lengths, layer, scale)
    sel = decode_impl("block_sparse_prefill", backend)
    impl, interpret = sel if sel is not None else ("reference", False)
    out = pallas_kernels.block_sparse_prefill(q, cache.keys, cache.values, starts, cache.lengths.astype(jnp.int32),
                                              idx, counts, block_size=method.block_size, scale=scale,
                                              impl=impl, interpret=interpret, **columns)
    out = mask_padded_queries(out, query_positions)
    obs = {}
    if observe.window:
        w = min(observe.window, t)
        obs = _attend_xla(q[:, :, t - w:], cache.keys, cache.values, cache.positions, query_positions[:, t - w:],
                          scale, Observe(window=w))[1]
    obs["prefill_density"] = density
    return out, obs
