"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization with a full-precision residual.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750 (code: jy-yuan/KIVI). Spec: shared/methods/quantization_and_sparse_attention.md §1.

Quantizer (see `kvjax.quant.packing`): asymmetric min-max round-to-nearest with float16 scale and
min, no clipping. **Keys are quantized per channel** over groups of G consecutive tokens (post-RoPE,
as in KIVI); **values per token** over groups of G consecutive channels.

Residual windows (they differ between K and V, exactly as in KIVI):
  * keys keep a full-precision tail of 0..R-1 tokens; when it reaches R tokens the whole R-block is
    quantized at once (R % G == 0, so groups never straddle a flush). A prefill of T tokens leaves
    T mod R keys in the tail.
  * values keep a sliding window of the R most recent tokens; a token is quantized when it leaves
    the window (decode quantizes the oldest one per step; a prefill of T tokens quantizes T - R).

Layout (the packed contract of `kvjax/quant/LAYOUT.md`; every array has a leading `layers` axis in
the stacked cache, absent in the per-layer slice that the model's `lax.scan` hands to `append` and
`attend`; Cq = capacity rounded up to a multiple of G):

    k_codes  [batch, kv_heads, Cq, head_dim*k_bits/8] uint8   planar-packed along head_dim
    k_scale, k_min [batch, kv_heads, Cq/G, head_dim]  float16 per channel, per G-token group
    v_codes  [batch, kv_heads, Cq, head_dim*v_bits/8] uint8
    v_scale, v_min [batch, kv_heads, Cq, head_dim/G]  float16 per token, per G-channel group
    k_resid, v_resid [batch, kv_heads, R, head_dim]   cache dtype
    k_len, v_len, lengths [batch, kv_heads] int32     tokens in k_codes / v_codes / in total
    pos_offset [batch, kv_heads] int32                position of slot t is t + pos_offset

Token t of a row lives in `k_codes[t]` if t < k_len else `k_resid[t - k_len]` (values likewise).
Positions are not stored per slot (KIVI does no eviction): each append must continue a contiguous
position range (padding tokens, position -1, may precede it: they get negative positions and are
never attended). Padding tokens are quantized along with real ones (they take part in a key group's
min/max but are masked out of attention).

Protocol order. The model appends first and attends second, so the queries of a call see the cache
state *after* this call's tokens were stored: tokens that were flushed to codes by this append are
seen quantized. In decode (one token) this differs from KIVI's order (attend, then flush) only for
the token that completes an R-block (its own key is seen quantized) and for the value leaving the
window in this step. The engine's prefill (`kvjax.generate.prefill`, `quantize_after_prefill`)
runs the prompt through a dense cache and appends it here afterwards, as KIVI's prefill does (the
prompt attends in full precision); with `dense_first=False` every prompt chunk is appended first
and attends to earlier tokens as the cache holds them (the "fake-quant" evaluation used by
KVQuant's perplexity numbers).

Bad input: bits outside {2, 4, 8}, G not dividing head_dim, R not a multiple of G -> ValueError at
`init_kivi_cache`/`KIVIConfig`. NaN/inf keys or values cannot be detected inside `jit` (the model
runs `append` under `lax.scan`); the pure functions `quantize_keys`/`quantize_values` and `append`
raise ValueError when they are called eagerly with concrete non-finite arrays, and
`check_prefill_inputs` is the entry check for the prompt's K/V before a jitted prefill.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from kvjax.attention import attend, decode_impl, is_decode_step, kivi_kernel_ok, mask_padded_queries
from kvjax.cache import tree_bytes
from kvjax.observation import Observe
from kvjax.quant import packing

KIVI_BITS = (2, 4, 8)
NO_POSITION = -(2 ** 30)  # pos_offset before any real token arrived: every slot has a negative position


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
    """KIVI hyperparameters (defaults: the paper's LongBench setting, 2 bits, G = 32, R = 128)."""

    k_bits: int = 2
    v_bits: int = 2
    group: int = 32
    residual: int = 128

    def validate(self, head_dim: int) -> None:
        for name, b in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if b not in KIVI_BITS:
                raise ValueError(f"KIVI {name}={b} is not supported: choose one of {KIVI_BITS}")
        if self.group <= 0 or head_dim % self.group:
            raise ValueError(f"KIVI group size {self.group} must be positive and divide head_dim={head_dim}")
        if self.residual <= 0 or self.residual % self.group:
            raise ValueError(f"KIVI residual length {self.residual} must be a positive multiple of the group "
                             f"size {self.group} (key tails are flushed in whole R-token blocks)")


def bytes_per_token(head_dim: int, k_bits: int, v_bits: int, group: int, stat_bytes: int = 2) -> float:
    """Spec accounting per token per kv-head: codes + scale + min (residuals excluded).

    K = d*k_bits/8 + 2*stat_bytes*d/G (per-channel stats amortised over G tokens),
    V = d*v_bits/8 + 2*stat_bytes*d/G. d=128, G=32, 2 bits -> 48 + 48 = 96 B."""
    return (head_dim * k_bits / 8 + 2 * stat_bytes * head_dim / group
            + head_dim * v_bits / 8 + 2 * stat_bytes * head_dim / group)


# ----------------------------------------------------------------------------- pure quantizers

def quantize_keys(keys: jax.Array, bits: int, group: int):
    """Per-channel key quantization over G-token groups.

    keys [..., T, d] (T % G == 0) -> (codes uint8 [..., T, d*bits/8] packed along d,
    scale, min float16 [..., T/G, d])."""
    packing.check_finite("keys", keys)
    codes, scale, mn = packing.quantize(keys, bits, group, axis=-2)
    return packing.pack(codes, bits), scale, mn


def dequantize_keys(codes: jax.Array, scale: jax.Array, mn: jax.Array, bits: int, group: int,
                    dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_keys` -> [..., T, d]."""
    return packing.dequantize(packing.unpack(codes, bits), scale, mn, group, axis=-2, dtype=dtype)


def quantize_values(values: jax.Array, bits: int, group: int):
    """Per-token value quantization over G-channel groups.

    values [..., T, d] (d % G == 0) -> (codes uint8 [..., T, d*bits/8], scale, min float16 [..., T, d/G])."""
    packing.check_finite("values", values)
    codes, scale, mn = packing.quantize(values, bits, group, axis=-1)
    return packing.pack(codes, bits), scale, mn


def dequantize_values(codes: jax.Array, scale: jax.Array, mn: jax.Array, bits: int, group: int,
                      dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_values` -> [..., T, d]."""
    return packing.dequantize(packing.unpack(codes, bits), scale, mn, group, axis=-1, dtype=dtype)


def check_prefill_inputs(keys, values) -> None:
    """Entry check for concrete prompt K/V (outside jit): ValueError on NaN/inf."""
    packing.check_finite("prefill keys/values", keys, values)


# ----------------------------------------------------------------------------- buffer helpers
# These are written for one (batch, kv-head) row and vmapped; `n` (new tokens) is static.

def _merge_tail(tail: jax.Array, tail_len: jax.Array, new: jax.Array, extra: int) -> jax.Array:
    """[R, d] tail holding `tail_len` rows + new [n, d] -> [R + n + extra, d] with new at tail_len."""
    r, d = tail.shape
    buf = jnp.concatenate([tail.astype(jnp.float32), jnp.zeros((new.shape[0] + extra, d), jnp.float32)])
    return jax.lax.dynamic_update_slice(buf, new.astype(jnp.float32), (tail_len, 0))


def _window(buf: jax.Array, start: jax.Array, count: jax.Array, r: int) -> jax.Array:
    """Rows [start, start + count) of buf as an [R, d] window, zero past `count`."""
    win = jax.lax.dynamic_slice(buf, (start, 0), (r, buf.shape[1]))
    return jnp.where((jnp.arange(r) < count)[:, None], win, 0.0)


def _scatter_rows(dst: jax.Array, rows: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
    """dst[start + i] = rows[i] for i < count (others dropped)."""
    i = jnp.arange(rows.shape[0])
    idx = jnp.where(i < count, start + i, dst.shape[0])  # out of range -> dropped
    return dst.at[idx].set(rows.astype(dst.dtype), mode="drop")


def flush_blocks(tail: jax.Array, tail_len: jax.Array, new: jax.Array, block: int):
    """Append `new [n, d]` to a tail of `tail_len` rows and cut off whole `block`-row blocks.

    returns (blocks [NB*block, d] float32 (the first `n_flush` rows are real), n_flush (a multiple of
    block), new_tail [block, d], new_tail_len), with NB = (block - 1 + n) // block static."""
    n = new.shape[0]
    nb_max = (block - 1 + n) // block
    extra = max(nb_max * block + block - (block + n), 0)
    buf = _merge_tail(tail, tail_len, new, extra)
    m = tail_len + n
    n_flush = (m // block) * block
    return buf[: nb_max * block], n_flush, _window(buf, n_flush, m - n_flush, block), m - n_flush


def slide_window(window: jax.Array, win_len: jax.Array, new: jax.Array, r: int):
    """Append `new [n, d]` to a sliding window holding `win_len` (<= R) rows; rows leaving it come out.

    returns (leaving [n, d] float32 (the first `n_out` rows are real, oldest first), n_out,
    new_window [R, d], new_win_len)."""
    n = new.shape[0]
    buf = _merge_tail(window, win_len, new, 0)
    m = win_len + n
    n_out = jnp.maximum(m - r, 0)
    return buf[:n], n_out, _window(buf, n_out, m - n_out, r), m - n_out


def update_pos_offset(offset: jax.Array, length: jax.Array, positions: jax.Array) -> jax.Array:
    """New `pos_offset [batch, kv_heads]` after appending tokens with `positions [batch, n]` at slot
    `length [batch, kv_heads]` (contiguous positions assumed; padding -1 leaves it unchanged)."""
    n = positions.shape[-1]
    slot = length[..., None] + jnp.arange(n, dtype=jnp.int32)             # [b, h, n]
    pos = positions[:, None, :].astype(jnp.int32)
    cand = jnp.where(pos >= 0, pos - slot, NO_POSITION)
    best = jnp.max(cand, axis=-1)
    return jnp.where(jnp.any(pos >= 0, axis=-1), best, offset).astype(jnp.int32)


def slot_positions(lengths: jax.Array, pos_offset: jax.Array, capacity: int) -> jax.Array:
    """`[..., capacity]` int32 position of every slot (-1 for empty or padding slots)."""
    t = jnp.arange(capacity, dtype=jnp.int32)
    pos = t + pos_offset[..., None]
    return jnp.where((t < lengths[..., None]) & (pos >= 0), pos, -1).astype(jnp.int32)


def merge_resid(deq: jax.Array, resid: jax.Array, n_quant: jax.Array) -> jax.Array:
    """Dense `[..., C, d]`: slot t < n_quant from `deq`, else `resid[t - n_quant]` (clipped)."""
    c, r = deq.shape[-2], resid.shape[-2]
    t = jnp.arange(c, dtype=jnp.int32)
    ridx = jnp.clip(t - n_quant[..., None], 0, r - 1)
    from_resid = jnp.take_along_axis(resid.astype(jnp.float32), ridx[..., None], axis=-2)
    return jnp.where((t < n_quant[..., None])[..., None], deq.astype(jnp.float32), from_resid)



def attend_kivi(layer, q: jax.Array, query_positions: jax.Array, observe: Observe, backend: str = "auto"):
    """Decode step over one layer of a `kvjax.quant.kivi.KIVICache` through the fused Pallas KIVI
    kernel, or None when the XLA path must run (not a decode step, no kernel for the backend, or
    the cache's bits/group/head_dim outside the kernel's constraints).

    Left padding: slot t holds position t + pos_offset, masked when negative, so the live slots
    are [max(-pos_offset, 0), lengths) -- always contiguous (KIVI does no eviction)."""
    if not is_decode_step(q, observe):
        return None
    sel = decode_impl("kivi_decode", backend)
    if sel is None or not kivi_kernel_ok(layer.k_bits, layer.v_bits, layer.group, layer.residual,
                                         layer.head_dim, sel[0]):
        return None
    impl, interpret = sel
    starts = jnp.clip(-layer.pos_offset, 0, layer.lengths).astype(jnp.int32)
    from kvjax.sharding import per_device
    run = lambda *a: pallas_kernels.kivi_decode(*a, bits=layer.k_bits, v_bits=layer.v_bits, group_size=layer.group,
                                                impl=impl, interpret=interpret)
    out = per_device(run,   # per device under a mesh (jax.shard_map)
                     q[:, :, 0], layer.k_codes, layer.k_scale, layer.k_min, layer.v_codes, layer.v_scale,
                     layer.v_min, layer.k_resid, layer.v_resid, layer.k_len, layer.v_len, layer.lengths, starts)
    return mask_padded_queries(out[:, :, None], query_positions), {}


# ----------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class KIVICache:
    """Packed KIVI cache (layout in the module docstring); stacked over layers on axis 0."""

    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    k_resid: jax.Array
    v_resid: jax.Array
    k_len: jax.Array
    v_len: jax.Array
    lengths: jax.Array
    pos_offset: jax.Array
    k_bits: int = 2
    v_bits: int = 2
    group: int = 32
    residual: int = 128
    # KIVI's prefill attends in full precision and quantizes the prompt afterwards: the engine's
    # prefill may run the prompt through a dense cache, then `append` it here (kvjax.generate.prefill)
    quantize_after_prefill: typing.ClassVar[bool] = True

    @property
    def config(self) -> KIVIConfig:
        return KIVIConfig(self.k_bits, self.v_bits, self.group, self.residual)

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.k_resid.shape[-1]

    @property
    def positions(self) -> jax.Array:
        """`[..., kv_heads, capacity]` int32 slot positions (-1 = empty/padding), like KVCache."""
        return slot_positions(self.lengths, self.pos_offset, self.capacity)

    def memory_bytes(self) -> int:
        """Bytes of every array held: codes + scales + mins + residuals + lengths/offsets."""
        return tree_bytes(self)

    def quantized_bytes(self) -> int:
        """Bytes of codes + scales + mins only (the spec's per-token accounting)."""
        return tree_bytes((self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min))

    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope: Optional[jax.Array] = None) -> "KIVICache":
        """keys (post-RoPE), values `[batch, kv_heads, new, d]`; positions `[batch, new]`."""
        return append(self, keys, values, positions)

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q `[batch, q_heads, new, d]` (post-RoPE) -> (out, observations); XLA reference path:
        dequantize to dense K/V, then `kvjax.attention.attend`. A decode step runs the fused Pallas
        KIVI kernel instead where `kvjax.attention.attend_kivi` says it applies (gpu)."""
        fused = attend_kivi(self, q, query_positions, observe, backend)
        if fused is not None:
            return fused
        # prefill (or a decode step the fused kernel cannot take): dequantized K/V in the cache's
        # fp dtype; its live slots are [max(-pos_offset, 0), lengths), so the flash/dense kernels apply
        k, v = dequantize(self, self.k_resid.dtype)
        return attend(q, k, v, self.positions, query_positions, observe=observe, backend=backend,
                      lengths=self.lengths)

    def resize(self, capacity: int) -> "KIVICache":
        return resize(self, capacity)


jax.tree_util.register_dataclass(
    KIVICache,
    data_fields=["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid",
                 "k_len", "v_len", "lengths", "pos_offset"],
    meta_fields=["k_bits", "v_bits", "group", "residual"])


def quantized_capacity(capacity: int, group: int) -> int:
    return -(-capacity // group) * group


def init_kivi_cache(config, batch: int, capacity: int, bits: int = 2, group: int = 32, residual: int = 128,
                    dtype=jnp.float32, k_bits: Optional[int] = None, v_bits: Optional[int] = None) -> KIVICache:
    """Empty KIVI cache for a `models.config.ModelConfig`, stacked over its layers.

    capacity: tokens per (batch, kv-head) (rounded up to a multiple of `group`); bits: both K and V
    unless `k_bits`/`v_bits` are given; dtype: of the full-precision residuals."""
    kcfg = KIVIConfig(k_bits or bits, v_bits or bits, group, residual)
    return init_kivi_cache_from(kcfg, config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim, dtype)


def init_kivi_cache_from(kcfg: KIVIConfig, n_layers: int, batch: int, kv_heads: int, capacity: int,
                         head_dim: int, dtype=jnp.float32) -> KIVICache:
    """Same as `init_kivi_cache` with explicit shapes."""
    kcfg.validate(head_dim)
    if min(n_layers, batch, kv_heads, capacity, head_dim) <= 0:
        raise ValueError(f"cache dimensions must be positive, got layers={n_layers} batch={batch} "
                         f"kv_heads={kv_heads} capacity={capacity} head_dim={head_dim}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"residual dtype must be floating, got {dtype}")
    g, r = kcfg.group, kcfg.residual
    cq = quantized_capacity(capacity, g)
    lead = (n_layers, batch, kv_heads)
    z = lambda *s, dt=jnp.float16: jnp.zeros(lead + s, dt)
    return KIVICache(
        k_codes=z(cq, packing.packed_size(head_dim, kcfg.k_bits), dt=jnp.uint8),
        k_scale=z(cq // g, head_dim), k_min=z(cq // g, head_dim),
        v_codes=z(cq, packing.packed_size(head_dim, kcfg.v_bits), dt=jnp.uint8),
        v_scale=z(cq, head_dim // g), v_min=z(cq, head_dim // g),
        k_resid=z(r, head_dim, dt=dtype), v_resid=z(r, head_dim, dt=dtype),
        k_len=z(dt=jnp.int32), v_len=z(dt=jnp.int32), lengths=z(dt=jnp.int32),
        pos_offset=jnp.full(lead, NO_POSITION, jnp.int32),
        k_bits=kcfg.k_bits, v_bits=kcfg.v_bits, group=g, residual=r)


def append(layer: KIVICache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KIVICache:
    """Append new tokens to one layer's KIVI cache (pure; the per-layer slice, no layers axis).

    keys, values: `[batch, kv_heads, new, d]`; positions `[batch, new]` (-1 = padding).
    Keys enter the fp tail and whole R-blocks are flushed to per-channel codes; values enter the
    R-token window and the tokens pushed out of it are quantized per token. Writes past the
    capacity are dropped (callers size the cache)."""
    if keys.shape != values.shape or keys.ndim != 4:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must both be [batch, kv_heads, new, d]")
    if keys.shape[-1] != layer.head_dim or keys.shape[:2] != layer.lengths.shape:
        raise ValueError(f"new K/V {keys.shape} do not match the cache [batch, kv_heads]={layer.lengths.shape}, "
                         f"head_dim={layer.head_dim}")
    packing.check_finite("append keys/values", keys, values)
    return _append(layer, keys, values, positions)


@jax.jit
def _append(layer: KIVICache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KIVICache:
    if keys.shape[-2] == 1:
        return _append_one(layer, keys, values, positions)
    return _append_rows(layer, keys, values, positions)


def _append_rows(layer: KIVICache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KIVICache:
    """The general append (any number of new tokens), written per (batch, kv-head) row and vmapped."""
    kb, vb, g, r = layer.k_bits, layer.v_bits, layer.group, layer.residual

    def row(kc, ks, km, vc, vs, vm, kr, vr, klen, vlen, length, knew, vnew):
        # keys: fp tail -> whole R-blocks
        blocks, n_flush, tail, _ = flush_blocks(kr, length - klen, knew, r)
        codes, scale, mn = packing.quantize(blocks, kb, g, axis=0)
        kc = _scatter_rows(kc, packing.pack(codes, kb), klen, n_flush)
        ks = _scatter_rows(ks, scale, klen // g, n_flush // g)
        km = _scatter_rows(km, mn, klen // g, n_flush // g)
        # values: sliding window; the rows that leave it are quantized per token
        leaving, n_out, win, _ = slide_window(vr, length - vlen, vnew, r)
        codes, scale, mn = packing.quantize(leaving, vb, g, axis=-1)
        vc = _scatter_rows(vc, packing.pack(codes, vb), vlen, n_out)
        vs = _scatter_rows(vs, scale, vlen, n_out)
        vm = _scatter_rows(vm, mn, vlen, n_out)
        return (kc, ks, km, vc, vs, vm, tail.astype(kr.dtype), win.astype(vr.dtype),
                klen + n_flush, vlen + n_out)

    f = jax.vmap(jax.vmap(row))
    kc, ks, km, vc, vs, vm, kr, vr, klen, vlen = f(
        layer.k_codes, layer.k_scale, layer.k_min, layer.v_codes, layer.v_scale, layer.v_min,
        layer.k_resid, layer.v_resid, layer.k_len, layer.v_len, layer.lengths, keys, values)
    n = keys.shape[-2]
    return dataclasses.replace(
        layer, k_codes=kc, k_scale=ks, k_min=km, v_codes=vc, v_scale=vs, v_min=vm, k_resid=kr, v_resid=vr,
        k_len=klen.astype(jnp.int32), v_len=vlen.astype(jnp.int32), lengths=layer.lengths + n,
        pos_offset=update_pos_offset(layer.pos_offset, layer.lengths, positions))


def _append_one(layer: KIVICache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KIVICache:
    """`_append` for one new token (a decode step), with the same result and few kernels: the key
    enters its tail slot by a select over the [R] tail; the R-block flush runs under a `lax.cond`
    only in the steps where some row's tail is full (once every R steps per row); the value leaving
    the window is quantized per token and scattered into one code row per (batch, kv-head) in place
    (out of range = dropped for rows whose window is not full yet)."""
    kb, vb, g, r = layer.k_bits, layer.v_bits, layer.group, layer.residual
    rows = jnp.arange(r, dtype=jnp.int32)[:, None]                       # [R, 1]
    # keys: write into the tail at its fill level; flush the rows whose tail is now full
    fill = (layer.lengths - layer.k_len)[..., None, None]                # [b, h, 1, 1]
    k_tail = jnp.where(rows == fill, keys.astype(layer.k_resid.dtype), layer.k_resid)
    full = (layer.lengths - layer.k_len + 1) == r                        # [b, h]

    def flush(arrays):
        kc, ks, km = arrays
        codes, scale, mn = packing.quantize(k_tail, kb, g, axis=-2)      # [b, h, R, .], [b, h, R/G, d]
        b, h = full.shape
        bi, hi = jnp.meshgrid(jnp.arange(b), jnp.arange(h), indexing="ij")
        at = lambda base, n: jnp.where(full, base, kc.shape[-2] * 2)[..., None] + jnp.arange(n)
        kc = kc.at[bi[..., None], hi[..., None], at(layer.k_len, r)].set(packing.pack(codes, kb), mode="drop")
        ks = ks.at[bi[..., None], hi[..., None], at(layer.k_len // g, r // g)].set(scale, mode="drop")
        km = km.at[bi[..., None], hi[..., None], at(layer.k_len // g, r // g)].set(mn, mode="drop")
        return kc, ks, km

    kc, ks, km = jax.lax.cond(jnp.any(full), flush, lambda a: a, (layer.k_codes, layer.k_scale, layer.k_min))
    k_len = jnp.where(full, layer.k_len + r, layer.k_len)
    k_tail = jnp.where(full[..., None, None], jnp.zeros((), k_tail.dtype), k_tail)   # a flushed tail is empty
    # values: a sliding window of R; when it is full the oldest row leaves and is quantized per token
    wfill = (layer.lengths - layer.v_len)[..., None, None]               # [b, h, 1, 1]
    vnew = values.astype(layer.v_resid.dtype)
    leaves = (layer.lengths - layer.v_len) == r                          # [b, h]
    shifted = jnp.concatenate([layer.v_resid[..., 1:, :], vnew], axis=-2)
    v_win = jnp.where(leaves[..., None, None], shifted, jnp.where(rows == wfill, vnew, layer.v_resid))
    codes, scale, mn = packing.quantize(layer.v_resid[..., 0, :], vb, g, axis=-1)   # [b, h, d], [b, h, d/G]
    b, h = leaves.shape
    bi, hi = jnp.meshgrid(jnp.arange(b), jnp.arange(h), indexing="ij")
    at = jnp.where(leaves, layer.v_len, layer.v_codes.shape[-2] * 2)
    vc = layer.v_codes.at[bi, hi, at].set(packing.pack(codes, vb), mode="drop")
    vs = layer.v_scale.at[bi, hi, at].set(scale, mode="drop")
    vm = layer.v_min.at[bi, hi, at].set(mn, mode="drop")
    v_len = jnp.where(leaves, layer.v_len + 1, layer.v_len)
    return dataclasses.replace(
        layer, k_codes=kc, k_scale=ks, k_min=km, v_codes=vc, v_scale=vs, v_min=vm, k_resid=k_tail, v_resid=v_win,
        k_len=k_len.astype(jnp.int32), v_len=v_len.astype(jnp.int32), lengths=layer.lengths + 1,
        pos_offset=update_pos_offset(layer.pos_offset, layer.lengths, positions))


def dequantize(layer: KIVICache, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Dense keys, values `[..., kv_heads, capacity, d]` of what the cache holds (codes merged with the
    residuals; slots past `lengths` hold unspecified values and are masked by `positions`)."""
    kq = dequantize_keys(layer.k_codes, layer.k_scale, layer.k_min, layer.k_bits, layer.group)
    vq = dequantize_values(layer.v_codes, layer.v_scale, layer.v_min, layer.v_bits, layer.group)
    k = merge_resid(kq, layer.k_resid, layer.k_len)
    v = merge_resid(vq, layer.v_resid, layer.v_len)
    return k.astype(dtype), v.astype(dtype)


def resize(cache: KIVICache, capacity: int) -> KIVICache:
    """Same contents, new capacity (rounded up to a multiple of G). Shrinking below the longest
    row is an error."""
    cq = quantized_capacity(capacity, cache.group)
    cur = cache.capacity
    if cq < cur:
        longest = int(jnp.max(cache.lengths))
        if cq < longest:
            raise ValueError(f"cannot shrink KIVI cache to {cq} slots: a head holds {longest} tokens")
        cut = lambda x, n: x[..., :n, :]
        return dataclasses.replace(cache, k_codes=cut(cache.k_codes, cq), v_codes=cut(cache.v_codes, cq),
                                   v_scale=cut(cache.v_scale, cq), v_min=cut(cache.v_min, cq),
                                   k_scale=cut(cache.k_scale, cq // cache.group),
                                   k_min=cut(cache.k_min, cq // cache.group))

    def grow(x, n):
        widths = [(0, 0)] * (x.ndim - 2) + [(0, n - x.shape[-2]), (0, 0)]
        return jnp.pad(x, widths)

    g = cache.group
    return dataclasses.replace(cache, k_codes=grow(cache.k_codes, cq), v_codes=grow(cache.v_codes, cq),
                               v_scale=grow(cache.v_scale, cq), v_min=grow(cache.v_min, cq),
                               k_scale=grow(cache.k_scale, cq // g), k_min=grow(cache.k_min, cq // g))


def from_dense(dense, kcfg: KIVIConfig, capacity: Optional[int] = None, dtype=jnp.float32) -> KIVICache:
    """Quantize a filled dense `kvjax.cache.KVCache` (stacked over layers, slots in token order,
    e.g. right after a full-precision prefill) into a KIVI cache of `capacity` tokens (default: the
    dense capacity). This is KIVI's own prefill rule: attention over the prompt ran in full precision,
    then the first T - T mod R keys and the first T - R values are quantized.

    Rows must be unevicted (slot t holds the row's t-th appended token, padding first)."""
    n_layers, batch, heads, cap, d = dense.keys.shape
    capacity = cap if capacity is None else capacity
    cache = init_kivi_cache_from(kcfg, n_layers, batch, heads, capacity, d, dtype)
    return append_dense(cache, dense)


def append_dense(cache, dense):
    """Append every layer of a dense cache's live prefix to `cache` (any quantized cache class of
    kvjax.quant with the append protocol). Uses the slots [0, max length) of the dense cache; slots
    past a row's length are appended as padding (position -1)."""
    t = int(jnp.max(dense.lengths))
    pos = dense.positions[:, :, 0, :t]                               # [L, b, t] (same for every head)
    keys, values = dense.keys[..., :t, :], dense.values[..., :t, :]
    packing.check_finite("dense keys/values", keys, values)
    return _append_layers(cache, keys, values, pos)


@jax.jit
def _append_layers(cache, keys, values, pos):
    return jax.vmap(lambda c, k, v, p: c.append(k, v, p))(cache, keys, values, pos)
