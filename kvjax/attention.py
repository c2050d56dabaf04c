"""The one attention entry point: queries over whatever a layer's cache holds.

`attend` computes grouped-query attention of new queries over the cache slots, masking empty
slots (position -1) and slots from the future (slot position > query position). The XLA path
below is the reference; a decode step (one query per row, no observations requested) over a
dense cache whose per-head `lengths` are given runs the Pallas dense decode kernel
(`pallas_kernels.dense_decode`) on gpu/tpu. `attend_kivi` does the same for a KIVI cache
(`pallas_kernels.kivi_decode`, gpu/tpu), and `attend_qjl` takes a QJL cache's scores from
`pallas_kernels.qjl_scores`.

Which path runs is a static argument, `backend`, threaded from `generate` / `forward` (CLI
`--attention`) down to every cache's `attend`:

    auto (default)  Pallas kernels on gpu/tpu, XLA elsewhere
    xla             always the XLA reference path
    pallas          the kernels; ValueError on a backend without them (cpu)
    interpret       the GPU kernels in Pallas interpret mode (CPU tests of the dispatch)

Prefill (several queries per row) over a dense cache runs the flash-attention kernel
(`pallas_kernels.flash_prefill`) on gpu/tpu: the engine keeps every head's live slots contiguous,
`[first live, lengths)`, with the new chunk's keys at the end, which is the kernel's mask. Window
observations of a policy are then computed apart, from the last `window` queries only.

"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvjax.observation import Observe

NEG_INF = -1e30


def attention_mask(slot_positions: jax.Array, query_positions: jax.Array, window=None) -> jax.Array:
    """`[batch, kv_heads, queries, slots]` bool: slot is live and not after the query (and, with a
    sliding `window`, less than `window` positions before it).

    slot_positions: `[batch, kv_heads, slots]`; query_positions: `[batch, queries]` (-1 = padding,
    which sees nothing); window: None, an int or a traced int scalar."""
    sp = slot_positions[:, :, None, :]
    qp = query_positions[:, None, :, None]
    mask = (sp >= 0) & (sp <= qp)
    return mask if window is None else mask & (sp > qp - window)


BACKENDS = ("auto", "xla", "pallas", "interpret")


def check_backend(backend: str) -> str:
    """ValueError (one line) for an unknown attention backend name; returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return backend


def decode_impl(kernel: str = "dense_decode", backend: str = "auto") -> tuple[str, bool] | None:
    """(impl, interpret) of the Pallas kernel to use, or None for the XLA path.

    impl is "gpu" or "tpu" (`pallas_kernels.resolve`'s names); kernel: "dense_decode",
    "kivi_decode", "qjl_scores" or "flash_prefill" (a backend without it falls back to XLA);
    backend: "auto" | "xla" | "pallas" | "interpret" (see the module docstring)."""
    mode = check_backend(backend)
    if mode == "xla":
        return None
    import pallas_kernels
    if kernel not in pallas_kernels.KERNELS:
        if mode == "pallas":
            raise ValueError(f"attention backend 'pallas': no Pallas {kernel} kernel exists")
        return None
    if mode == "interpret":
        return "gpu", True
    device = jax.default_backend()
    impl = "gpu" if device in ("gpu", "cuda", "rocm") else "tpu" if device == "tpu" else None
    if impl == "tpu":
        if pallas_kernels.resolve(kernel, None)[1] is False:  # no TPU kernel: reference
            impl = None
    if impl is None and mode == "pallas":
        raise ValueError(f"attention backend 'pallas': no Pallas {kernel} kernel for the {jax.default_backend()!r} "
                         f"device (use 'interpret' to run the GPU kernels interpreted on cpu, or 'auto')")
    return None if impl is None else (impl, False)


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def is_decode_step(q: jax.Array, observe: Observe) -> bool:
    """One query per row and no observation requested (the kernels return only the output)."""
    return q.shape[2] == 1 and not observe.window and not observe.column_sums


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


def mask_padded_queries(out: jax.Array, query_positions: jax.Array) -> jax.Array:
    """out [batch, q_heads, queries, dim]: zeros for queries that are padding (position -1)."""
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
        from kvjax.sharding import per_device
        kw = dict(block_k=_block_k(cap)) if impl == "gpu" else {}
        run = lambda *a: pallas_kernels.dense_decode(*a, scale=scale, impl=impl, interpret=interpret, **kw)
        out = per_device(run, q[:, :, 0], keys, values, lens, starts)   # per device under a mesh
        return out[:, :, None]

    def xla(q, keys, values, lens, starts):
        return _attend_xla(q, keys, values, slot_positions, query_positions, scale, Observe())[0]

    out = lax.cond(ok, kernel, xla, q, keys, values, lens, starts)
    return mask_padded_queries(out, query_positions)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, slot_positions: jax.Array,
           query_positions: jax.Array, *, scale: float | None = None,
           observe: Observe = Observe(), lengths: jax.Array | None = None,
           backend: str = "auto", window=None) -> tuple[jax.Array, dict]:
    """Grouped-query attention over a cache: XLA reference (float32 softmax), or with `lengths`
    the Pallas kernels (dense decode for one query per row, flash prefill for several; see the
    module docstring).

    lengths: optional `[batch, kv_heads]` int32 slots in use per head (the cache's write offset);
    only with it can a kernel run (a decode step checks that the live slots are [first live,
    lengths) in every head and otherwise runs the XLA path; prefill relies on the engine's
    invariant that they are, with this call's keys in the last `queries` live slots).

    q:               [batch, q_heads, queries, head_dim]
    keys:            [batch, kv_heads, slots, head_dim]
    values:          [batch, kv_heads, slots, value_dim]
    slot_positions:  [batch, kv_heads, slots] int32 (-1 = empty)
    query_positions: [batch, queries] int32 (-1 = padding)
    window:          None, or a sliding window (int or traced int scalar; `models.local_attention`):
                     a query at position p sees slots at positions (p - window, p]. One query per
                     row hides the other slots and dispatches as usual; several take the XLA path.
    returns out [batch, q_heads, queries, value_dim] (zeros for queries that see no slot) and a
    dict of observations requested by `observe`:
        "window_probs" [batch, q_heads, window, slots], "column_sums" [batch, q_heads, slots].
    """
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    if hq % hkv:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={hkv}")
    scale = d ** -0.5 if scale is None else scale
    same_kv = keys.dtype == values.dtype and keys.shape[-1] == values.shape[-1]
    if lengths is not None and lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [batch, kv_heads]={(b, hkv)}, got {lengths.shape}")
    if window is not None:
        if t > 1:
            return _attend_xla(q, keys, values, slot_positions, query_positions, scale, observe, window)
        slot_positions = jnp.where(slot_positions > query_positions[:, :, None] - window, slot_positions, -1)
    if lengths is not None and is_decode_step(q, observe):
        sel = decode_impl("dense_decode", backend)
        if sel is not None and dense_kernel_ok(d, keys.dtype, sel[0]) and same_kv:
            return _dense_decode(q, keys, values, slot_positions, query_positions, lengths, scale, *sel), {}
    elif lengths is not None and t > 1 and not observe.column_sums:
        sel = decode_impl("flash_prefill", backend)
        if sel is not None and dense_kernel_ok(d, keys.dtype, sel[0]) and same_kv:
            return _flash_prefill(q, keys, values, slot_positions, query_positions, lengths, scale, observe, *sel)
    return _attend_xla(q, keys, values, slot_positions, query_positions, scale, observe)


def live_starts(slot_positions: jax.Array, lengths: jax.Array) -> jax.Array:
    """[batch, kv_heads] first live slot of every head (`lengths` for an empty head)."""
    live = slot_positions >= 0
    first = jnp.argmax(live, axis=-1).astype(jnp.int32)
    return jnp.where(live.any(axis=-1), first, lengths.astype(jnp.int32)).astype(jnp.int32)


def _flash_prefill(q, keys, values, slot_positions, query_positions, lengths, scale, observe, impl, interpret):
    """Several queries per row through the Pallas flash kernel (live slots [first live, lengths),
    the new queries' own keys in the last t of them: causal on that diagonal). A requested window
    observation is computed apart, from the last `window` queries only (XLA, [b, hq, w, slots])."""
    import pallas_kernels
    t = q.shape[2]
    starts = live_starts(slot_positions, lengths)
    from kvjax.sharding import per_device
    run = lambda *a: pallas_kernels.flash_prefill(*a, scale=scale, impl=impl, interpret=interpret)
    out = per_device(run, q, keys, values, starts, lengths.astype(jnp.int32))   # per device under a mesh
    out = mask_padded_queries(out, query_positions)
    obs = {}
    if observe.window:
        w = min(observe.window, t)
        obs = _attend_xla(q[:, :, t - w:], keys, values, slot_positions, query_positions[:, t - w:], scale,
                          Observe(window=w))[1]
    return out, obs


def _attend_xla(q, keys, values, slot_positions, query_positions, scale, observe, window=None):
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32)) * scale
    return attend_logits(logits, values, slot_positions, query_positions, q.dtype, observe, window)


def attend_logits(logits, values, slot_positions, query_positions, out_dtype,
                  observe: Observe = Observe(), window=None):
    """Masked softmax and value sum from precomputed (scaled) logits
    `[batch, kv_heads, group, queries, slots]`; the rest as `attend`."""
    b, hkv, g, t, _ = logits.shape
    hq = hkv * g
    mask = attention_mask(slot_positions, query_positions, window)[:, :, None]  # [b, hkv, 1, t, s]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with no live slot become all-zero, not uniform
    out = jnp.einsum("bhgts,bhsv->bhgtv", probs, values.astype(jnp.float32))
    out = out.reshape(b, hq, t, -1).astype(out_dtype)
    obs = {}
    if observe.window:
        w = min(observe.window, t)
        obs["window_probs"] = probs[:, :, :, t - w:].reshape(b, hq, w, -1)
    if observe.column_sums:
        obs["column_sums"] = probs.sum(axis=3).reshape(b, hq, -1)
    return out, obs


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
