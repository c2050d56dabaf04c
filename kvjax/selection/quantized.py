"""Selection over a quantized cache (issue 22 / issue 17 item 3): Quest pages and LouisKV units over
a KIVI layer (`kvjax.quant.kivi.KIVICache`).

- Metadata (Quest's per-page min/max, LouisKV's clusters and unit sums) is built when the layer is
  wrapped, from full-precision keys when they are given (`wrap(..., source=)`: the dense cache the
  prompt was prefilled into before KIVI quantized it; then every selection equals the unquantized
  cache's) else from the KIVI keys dequantized (what attention sees). Tokens appended during decode
  update it from their full-precision keys, before the cache quantizes them.
- A decode step dequantizes only the selected slots: each selected slot's packed key codes with the
  scale / min of its G-token channel group, its value codes with its per-token scales, or the
  full-precision residual row (slot >= k_len / v_len), in the cache's residual dtype as KIVI's own
  dense path does, then attends over them with `pallas_kernels.sparse_decode`'s XLA reference (the
  gathered rows as a compact cache). There is no sparse kernel that reads KIVI codes (the fused
  `kivi_decode` kernel reads every slot), so the whole step runs in XLA whatever `backend` says.

Other selectors (TokenSelect, ShadowKV, A2ATS, DELTA) and other quantized caches are refused by
`check_quantized` with the reason.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.quant import packing
from kvjax.quant.kivi import KIVICache, dequantize


def is_quantized(kv) -> bool:
    return isinstance(kv, KIVICache)


def check_quantized(selector, kv) -> None:
    """TypeError when `selector` cannot select over the quantized layer `kv` (and why)."""
    name = type(selector).__name__
    if not isinstance(kv, KIVICache):
        raise TypeError(
            f"{name} selects over a dense KVCache or a KIVICache layer, got {type(kv).__name__}: only KIVI's "
            "layout (per-slot codes, per-group stats, a full-precision residual, no eviction) has a gather of "
            "selected slots here; use a dense cache or KIVI with selection")
    if not getattr(selector, "quantized_ok", False):
        raise TypeError(
            f"{name} cannot select over a KIVICache: its metadata or attention needs what KIVI does not keep "
            "(pre-RoPE keys, low-rank factors, codebooks over full-precision keys, or dense attention in its "
            "selecting layers); Quest and LouisKV compose with KIVI")


def dense_view(layer: KIVICache, source: kvcache.KVCache | None = None) -> kvcache.KVCache:
    """A dense KVCache [b, h, capacity, d] with the KIVI layer's positions and lengths, for building
    metadata: the full-precision `source` keys/values (same slots; a capacity up to the KIVI one,
    which is rounded up to its group), else the layer dequantized."""
    if source is not None:
        b, h, cap = layer.positions.shape
        if source.keys.shape[:2] != (b, h) or source.capacity > cap:
            raise ValueError(f"source cache slots {source.keys.shape[:3]} do not fit the KIVI layer's {(b, h, cap)}: "
                             "give the dense layer the prompt was prefilled into (slot t = the t-th token)")
        grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)))   # KIVI rounds up to G
        return kvcache.KVCache(keys=grow(source.keys), values=grow(source.values), positions=layer.positions,
                               lengths=layer.lengths)
    k, v = dequantize(layer, layer.k_resid.dtype)
    return kvcache.KVCache(keys=k, values=v, positions=layer.positions, lengths=layer.lengths)


def gather_dequantized(layer: KIVICache, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys, values [b, h, n, d] (the residual dtype) of the slots [b, h, n] (in [0, capacity)),
    dequantized from their codes or taken from the residual: equal to `kivi.dequantize(layer)`
    at those slots, without dequantizing the others."""
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=2)
    g = layer.group
    kq = packing.dequantize(packing.unpack(take(layer.k_codes, slots), layer.k_bits),
                            take(layer.k_scale, slots // g), take(layer.k_min, slots // g), 1, axis=-2)
    vq = packing.dequantize(packing.unpack(take(layer.v_codes, slots), layer.v_bits),
                            take(layer.v_scale, slots), take(layer.v_min, slots), g, axis=-1)

    def merge(deq, resid, n_quant):
        r = resid.shape[2]
        row = take(resid.astype(jnp.float32), jnp.clip(slots - n_quant[..., None], 0, r - 1))
        return jnp.where((slots < n_quant[..., None])[..., None], deq, row).astype(layer.k_resid.dtype)

    return merge(kq, layer.k_resid, layer.k_len), merge(vq, layer.v_resid, layer.v_len)


def sparse_attend_quantized(q: jax.Array, layer: KIVICache, indices: jax.Array, valid: jax.Array, page_size: int,
                            backend: str = "auto") -> jax.Array:
    """One decode query per row over the selected pages / slots of a KIVI layer.

    q [b, q_heads, 1, d]; indices, valid [b, kv_heads, n] (pages when page_size > 1) ->
    out [b, q_heads, 1, d]. Pages become their live slots below `lengths`; the selected slots are
    gathered + dequantized and attended as a compact cache of n * page_size rows (XLA; `backend`
    is accepted for the SelectiveCache call and not used)."""
    from kvjax.selection.base import compact, sparse_attend
    from pallas_kernels.reference import sparse_slots
    if page_size > 1:
        idx, counts = compact(indices, valid)
        slots, valid = sparse_slots(idx, counts, layer.lengths, page_size, layer.capacity)
    else:
        slots = jnp.clip(indices, 0, layer.capacity - 1)
    valid = valid & (jnp.take_along_axis(layer.positions, slots, axis=-1) >= 0)
    k, v = gather_dequantized(layer, slots)
    n = slots.shape[-1]
    rows = kvcache.KVCache(keys=k, values=v, positions=jnp.where(valid, 0, -1).astype(jnp.int32),
                           lengths=jnp.full(slots.shape[:2], n, jnp.int32))
    order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), slots.shape)
    return sparse_attend(q, rows, order, valid, 1, "xla")    # the reference: no kernel reads KIVI codes


def slot_bytes(layer: KIVICache) -> float:
    """Bytes per slot of the layer (codes + stats + the residual windows, amortised over the capacity)."""
    b, h, cap = layer.positions.shape
    return layer.memory_bytes() / (b * h * cap)


__all__ = ["check_quantized", "dense_view", "gather_dequantized", "is_quantized", "sparse_attend_quantized",
           "slot_bytes"]
