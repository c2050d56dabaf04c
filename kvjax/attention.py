"""The one attention entry point: queries over whatever a layer's cache holds.

`attend` computes grouped-query attention of new queries over the cache slots, masking empty
slots (position -1) and slots from the future (slot position > query position). The XLA path
below is the reference; a decode step (one query per row, no observations requested) over a
dense cache whose per-head `lengths` are given runs the Pallas dense decode kernel
(`pallas_kernels.dense_decode`) on gpu/tpu. `attend_kivi` does the same for a KIVI cache
(`pallas_kernels.kivi_decode`, gpu/tpu), and `attend_qjl` takes a QJL cache's scores from
`pallas_kernels.qjl_scores`.

Which path runs is decided at trace time by `decode_impl()`, from the backend and the
environment variable `KVJAX_ATTENTION` (read when a function is traced, so set it before the
first call, or call `jax.clear_caches()` after changing it):

    auto (default)  Pallas kernel on gpu/tpu, XLA elsewhere
    xla             always the XLA reference path
    pallas          the kernel; ValueError on a backend without one (cpu)
    interpret       the GPU kernel in Pallas interpret mode (CPU tests of the dispatch)

`attention_name(cache, compression)` names the decode path generate's stats report.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionStats:
    """What a policy may observe from one layer's attention (all optional, static flags).

    window: return probabilities of the last `window` queries over the cache slots.
    column_sums: return the sum over all new queries of the probabilities (H2O's score).
    """

    window: int = 0
    column_sums: bool = False


def attention_mask(slot_positions: jax.Array, query_positions: jax.Array) -> jax.Array:
    """`[batch, kv_heads, queries, slots]` bool: slot is live and not after the query.

    slot_positions: `[batch, kv_heads, slots]`; query_positions: `[batch, queries]` (-1 = padding,
    which sees nothing)."""
    sp = slot_positions[:, :, None, :]
    qp = query_positions[:, None, :, None]
    return (sp >= 0) & (sp <= qp)


ATTENTION_ENV = "KVJAX_ATTENTION"
ATTENTION_MODES = ("auto", "xla", "pallas", "interpret")


def attention_mode() -> str:
    """The `KVJAX_ATTENTION` setting (default "auto"); ValueError for an unknown value."""
    mode = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if mode not in ATTENTION_MODES:
        raise ValueError(f"{ATTENTION_ENV}={mode!r}; expected one of {ATTENTION_MODES}")
    return mode


def decode_impl(kernel: str = "dense_decode") -> tuple[str, bool] | None:
    """(impl, interpret) of the Pallas kernel a decode step uses, or None for the XLA path.

    impl is "gpu" or "tpu" (`pallas_kernels.resolve`'s names); kernel: "dense_decode" or
    "kivi_decode" or "qjl_scores" (a backend without that kernel falls back to XLA)."""
    mode = attention_mode()
    if mode == "xla":
        return None
    if mode == "interpret":
        return "gpu", True
    backend = jax.default_backend()
    impl = "gpu" if backend in ("gpu", "cuda", "rocm") else "tpu" if backend == "tpu" else None
    if impl == "tpu":
        import pallas_kernels
        if pallas_kernels.resolve(kernel, None)[1] is False:  # no TPU kernel: reference
            impl = None
    if impl is None and mode == "pallas":
        raise ValueError(f"{ATTENTION_ENV}=pallas: no Pallas {kernel} kernel for backend {backend!r} "
                         f"(use {ATTENTION_ENV}=interpret on cpu)")
    return None if impl is None else (impl, False)


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def is_decode_step(q: jax.Array, stats: AttentionStats) -> bool:
    """One query per row and no observation requested (the kernels return only the output)."""
    return q.shape[2] == 1 and not stats.window and not stats.column_sums


def dense_kernel_ok(head_dim: int, dtype, impl: str) -> bool:
    """Static constraints of the dense decode kernels (GPU: power-of-two head_dim >= 16)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return False
    return _pow2(head_dim) and head_dim >= 16 if impl == "gpu" else head_dim % 8 == 0


def kivi_kernel_ok(k_bits: int, v_bits: int, group: int, residual: int, head_dim: int,
                   impl: str = "gpu") -> bool:
    """Static constraints of the KIVI kernels. Both: 2/4 bits, group dividing head_dim.
    GPU: power-of-two head_dim and group >= 16, residual % group == 0, >= 16 bytes per packed
    row (a tensor-core dot). TPU: group a multiple of 8 (aligned tiles)."""
    if not (k_bits in (2, 4) and v_bits in (2, 4) and group > 0 and head_dim % group == 0):
        return False
    if impl == "tpu":
        return group % 8 == 0
    return (_pow2(head_dim) and _pow2(group) and group >= 16 and residual % group == 0
            and min(head_dim * k_bits // 8, head_dim * v_bits // 8) >= 16)


def _block_k(capacity: int) -> int:
    """Largest GPU tile (64, 32 or 16 tokens) dividing the capacity, so the kernel never pads
    (= copies) the cache; 64 (with padding) when none does."""
    for bk in (64, 32, 16):
        if capacity % bk == 0:
            return bk
    return 64


def _mask_padded_queries(out: jax.Array, query_positions: jax.Array) -> jax.Array:
    """out [batch, q_heads, 1, dim]: zeros for rows whose query is padding (position -1)."""
    return jnp.where((query_positions >= 0)[:, None, :, None], out, jnp.zeros_like(out))


def contiguous_live(slot_positions: jax.Array, lengths: jax.Array, query_position: jax.Array):
    """Can a [starts, lengths) kernel stand in for the position mask?

    slot_positions [batch, kv_heads, slots] (-1 = empty), lengths [batch, kv_heads],
    query_position [batch] -> (ok: scalar bool, starts [batch, kv_heads] int32): ok when in every
    head the live slots are exactly [starts, lengths) (starts = first live slot; an empty head
    gets starts = lengths) and no live slot is after the query."""
    cap = slot_positions.shape[-1]
    live = slot_positions >= 0
    t = jnp.arange(cap, dtype=jnp.int32)
    first = jnp.argmax(live, axis=-1).astype(jnp.int32)
    lens = lengths.astype(jnp.int32)
    starts = jnp.where(live.any(axis=-1), first, lens).astype(jnp.int32)
    in_range = (t >= starts[..., None]) & (t < lens[..., None])
    causal = jnp.where(live, slot_positions, -1) <= query_position[:, None, None]
    ok = jnp.all(live == in_range) & jnp.all(causal) & jnp.all(lens <= cap)
    return ok, starts


def _dense_decode(q, keys, values, slot_positions, query_positions, lengths, scale, impl, interpret):
    """Decode step through the Pallas dense kernel; `lax.cond` falls back to the XLA path unless
    every head's live slots are exactly [starts, lengths) and none is after the query."""
    import pallas_kernels
    cap = keys.shape[2]
    ok, starts = contiguous_live(slot_positions, lengths, query_positions[:, 0])
    lens = lengths.astype(jnp.int32)

    def kernel(q, keys, values, lens, starts):
        kw = dict(block_k=_block_k(cap)) if impl == "gpu" else {}
        out = pallas_kernels.dense_decode(q[:, :, 0], keys, values, lens, starts, scale=scale,
                                          impl=impl, interpret=interpret, **kw)
        return out[:, :, None]

    def xla(q, keys, values, lens, starts):
        return _attend_xla(q, keys, values, slot_positions, query_positions, scale, AttentionStats())[0]

    out = lax.cond(ok, kernel, xla, q, keys, values, lens, starts)
    return _mask_padded_queries(out, query_positions)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, slot_positions: jax.Array,
           query_positions: jax.Array, *, scale: float | None = None,
           stats: AttentionStats = AttentionStats(),
           lengths: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Grouped-query attention over a cache (XLA reference, float32 softmax, or in decode the
    Pallas dense kernel -- see the module docstring).

    lengths: optional `[batch, kv_heads]` int32 slots in use per head (the cache's write offset);
    only with it can a decode step use the kernel (live slots must then be [first live, lengths)
    in every head, else the XLA path runs).

    q:               [batch, q_heads, queries, head_dim]
    keys:            [batch, kv_heads, slots, head_dim]
    values:          [batch, kv_heads, slots, value_dim]
    slot_positions:  [batch, kv_heads, slots] int32 (-1 = empty)
    query_positions: [batch, queries] int32 (-1 = padding)
    returns out [batch, q_heads, queries, value_dim] (zeros for queries that see no slot) and a
    dict of observations requested by `stats`:
        "window_probs" [batch, q_heads, window, slots], "column_sums" [batch, q_heads, slots].
    """
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    if hq % hkv:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={hkv}")
    scale = d ** -0.5 if scale is None else scale
    if lengths is not None and is_decode_step(q, stats):
        sel = decode_impl("dense_decode")
        if sel is not None and dense_kernel_ok(d, keys.dtype, sel[0]) and keys.dtype == values.dtype \
                and keys.shape[-1] == values.shape[-1]:
            if lengths.shape != (b, hkv):
                raise ValueError(f"lengths must be [batch, kv_heads]={(b, hkv)}, got {lengths.shape}")
            return _dense_decode(q, keys, values, slot_positions, query_positions, lengths, scale, *sel), {}
    return _attend_xla(q, keys, values, slot_positions, query_positions, scale, stats)


def _attend_xla(q, keys, values, slot_positions, query_positions, scale, stats):
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32)) * scale
    return attend_logits(logits, values, slot_positions, query_positions, q.dtype, stats)


def attend_logits(logits, values, slot_positions, query_positions, out_dtype,
                  stats: AttentionStats = AttentionStats()):
    """Masked softmax and value sum from precomputed (scaled) logits
    `[batch, kv_heads, group, queries, slots]`; the rest as `attend`."""
    b, hkv, g, t, _ = logits.shape
    hq = hkv * g
    mask = attention_mask(slot_positions, query_positions)[:, :, None]  # [b, hkv, 1, t, s]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with no live slot become all-zero, not uniform
    out = jnp.einsum("bhgts,bhsv->bhgtv", probs, values.astype(jnp.float32))
    out = out.reshape(b, hq, t, -1).astype(out_dtype)
    obs = {}
    if stats.window:
        w = min(stats.window, t)
        obs["window_probs"] = probs[:, :, :, t - w:].reshape(b, hq, w, -1)
    if stats.column_sums:
        obs["column_sums"] = probs.sum(axis=3).reshape(b, hq, -1)
    return out, obs


def attend_kivi(layer, q: jax.Array, query_positions: jax.Array, stats: AttentionStats):
    """Decode step over one layer of a `kvjax.quant.kivi.KIVICache` through the fused Pallas KIVI
    kernel, or None when the XLA path must run (not a decode step, no kernel for the backend, or
    the cache's bits/group/head_dim outside the kernel's constraints).

    Left padding: slot t holds position t + pos_offset, masked when negative, so the live slots
    are [max(-pos_offset, 0), lengths) -- always contiguous (KIVI does no eviction)."""
    if not is_decode_step(q, stats):
        return None
    sel = decode_impl("kivi_decode")
    if sel is None or not kivi_kernel_ok(layer.k_bits, layer.v_bits, layer.group, layer.residual,
                                         layer.head_dim, sel[0]):
        return None
    import pallas_kernels
    impl, interpret = sel
    starts = jnp.clip(-layer.pos_offset, 0, layer.lengths).astype(jnp.int32)
    out = pallas_kernels.kivi_decode(
        q[:, :, 0], layer.k_codes, layer.k_scale, layer.k_min, layer.v_codes, layer.v_scale,
        layer.v_min, layer.k_resid, layer.v_resid, layer.k_len, layer.v_len, layer.lengths, starts,
        bits=layer.k_bits, v_bits=layer.v_bits, group_size=layer.group, impl=impl, interpret=interpret)
    return _mask_padded_queries(out[:, :, None], query_positions), {}


def qjl_kernel_ok(cfg, impl: str) -> bool:
    """Static constraints for routing a QJL cache's decode scores to `pallas_kernels.qjl_scores`:
    the outlier sketch is the full sketch (m_out = m: one column order serves both sign sets, see
    `attend_qjl`); GPU: m/8 a power of two >= 16, power-of-two group >= 16."""
    m = cfg.sketch_dim
    if cfg.outlier_sketch_dim != m:
        return False
    if impl == "tpu":
        return m % 8 == 0
    return _pow2(m // 8) and m // 8 >= 16 and _pow2(cfg.group) and cfg.group >= 16


def _planar_sketch_columns(m: int):
    """Kernel column 8j + i (bit i of byte j, `reference.qjl_scores`) -> the sketch column that the
    cache's planar 1-bit packing (`kvjax.quant.packing`: bit i of byte j = element j + i*m/8) put there."""
    import numpy as np
    j, i = np.divmod(np.arange(m), 8)
    return j + i * (m // 8)


def attend_qjl(layer, q: jax.Array, query_positions: jax.Array, stats: AttentionStats):
    """Decode step over one layer of a `kvjax.quant.qjl.QJLCache` with the sketched keys' scores
    from the Pallas QJL kernel (the fp key buffer, softmax and the 2-bit values stay in XLA), or
    None when the XLA path must run (not a decode step, no kernel, or the config outside its
    constraints)."""
    if not is_decode_step(q, stats):
        return None
    sel = decode_impl("qjl_scores")
    cfg = layer.cfg
    if sel is None or not qjl_kernel_ok(cfg, sel[0]):
        return None
    import pallas_kernels
    from kvjax.quant.qjl import dequantize_values
    impl, interpret = sel
    b, hq, _, d = q.shape
    hkv = layer.lengths.shape[1]
    g = hq // hkv
    sketch = layer.sketch[:, _planar_sketch_columns(cfg.sketch_dim)]
    scores = pallas_kernels.qjl_scores(
        q[:, :, 0], layer.k_sign, layer.k_out_sign, layer.k_norm, layer.k_out_norm,
        layer.k_out_idx.astype(jnp.int32), sketch, layer.k_len, group_size=cfg.group, impl=impl,
        interpret=interpret).reshape(b, hkv, g, -1)                          # [b, hkv, g, C]
    cap = scores.shape[-1]
    qg = q[:, :, 0].reshape(b, hkv, g, d).astype(jnp.float32)
    tail = jnp.einsum("bhgd,bhrd->bhgr", qg, layer.k_resid.astype(jnp.float32))  # fp key buffer
    t = jnp.arange(cap, dtype=jnp.int32)
    ridx = jnp.clip(t - layer.k_len[..., None], 0, layer.k_resid.shape[2] - 1)   # [b, hkv, C]
    tail = jnp.take_along_axis(tail, jnp.broadcast_to(ridx[:, :, None], (b, hkv, g, cap)), axis=-1)
    logits = jnp.where(t < layer.k_len[:, :, None, None], scores, tail) * d ** -0.5
    return attend_logits(logits[:, :, :, None], dequantize_values(layer), layer.positions,
                         query_positions, q.dtype, stats)


def attention_name(cache, compression=None) -> str:
    """What generate's decode steps run, for its stats: "pallas-gpu:dense_decode" etc., or
    "xla-reference". Mirrors the trace-time dispatch of `attend` / `attend_kivi`.

    cache: the (stacked) cache generate decodes over; compression: its Compression or None
    (decode-time policies that observe attention keep the XLA path)."""
    from kvjax.cache import KVCache
    from kvjax.quant.kivi import KIVICache
    from kvjax.quant.qjl import QJLCache
    if compression is not None and getattr(compression, "when", None) == "decode":
        obs = compression.decode_observe
        if obs.window or obs.column_sums:
            return "xla-reference (decode observes attention)"
    if isinstance(cache, KVCache):
        sel = decode_impl("dense_decode")
        if sel is None or not dense_kernel_ok(cache.keys.shape[-1], cache.keys.dtype, sel[0]):
            return "xla-reference"
        name, fallback = "dense_decode", " (XLA if a head's live slots are not contiguous)"
    elif isinstance(cache, KIVICache):
        sel = decode_impl("kivi_decode")
        if sel is None or not kivi_kernel_ok(cache.k_bits, cache.v_bits, cache.group, cache.residual,
                                             cache.head_dim, sel[0]):
            return "xla-reference"
        name, fallback = "kivi_decode", ""
    elif isinstance(cache, QJLCache):
        sel = decode_impl("qjl_scores")
        if sel is None or not qjl_kernel_ok(cache.cfg, sel[0]):
            return "xla-reference"
        name, fallback = "qjl_scores", " (scores of sketched keys; fp buffer, softmax, values in XLA)"
    else:
        return "xla-reference"
    impl, interpret = sel
    return f"pallas-{impl}{'-interpret' if interpret else ''}:{name} decode{fallback}, xla prefill"
