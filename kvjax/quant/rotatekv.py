"""RotateKV: 2-bit KV cache quantization with outlier-aware (Walsh-Hadamard) rotations.

Su et al., "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware
Adaptive Rotations", arXiv 2501.16383 (code: ZunhaiSu/RotateKV). Spec:
shared/methods/quantization_and_sparse_attention.md §5 (RotateKV) and §11 ("RotateKV needs an
inverse FWHT before RoPE").

* Keys are rotated **pre-RoPE** with a grouped-head fast Walsh-Hadamard transform: the keys of
  `head_group` consecutive kv-heads form one vector of head_group * d entries, transformed by the
  orthonormal Sylvester Hadamard H / sqrt(n) in O(n log n) (`fwht`). (With head_group = 4 and
  d = 128 that is the paper's 512-point transform; H_{g d} = H_g (x) H_d already mixes within every
  head, so the per-head Hadamard that RotateKV fuses into k_proj is subsumed.)
* Values are rotated per head by H_d / sqrt(d) (RotateKV fuses it into v_proj / o_proj; here it is
  applied to the cached values and undone after dequantization, which is the same linear map).
* Both are quantized **per token**, group = head_dim (one head), asymmetric min-max RTN, 2 bits,
  clip ratio 1 (no clipping), float16 scale and min, codes planar-packed into uint8.
* Decoding: dequantize, undo the transform (the normalised H is its own inverse), then apply RoPE
  at each slot's position (the model passes `rope` to `attend`).
* Attention sinks: RotateKV keeps the tokens holding the 20 largest |hidden-state| entries
  ("massive activations", PIVOT_TOKEN = 20) in fp16. The cache protocol does not expose hidden
  states, so this implementation keeps the **first `sink_tokens` tokens** in full precision (where
  massive activations sit in practice: the first token and the first delimiters). Approximation.
* Not implemented: RotateKV's calibrated channel reordering (it needs an offline calibration set).

Layout per layer slice (stacked cache: leading `layers` axis; C = capacity, S = sink_tokens):

    k_codes, v_codes [B, H, C, d*bits/8] uint8          slot t at row t (padding included)
    k_scale, k_min, v_scale, v_min [B, H, C, d/G] f16
    k_sink [B, H, S, d]   exact pre-RoPE keys of the tokens at positions 0..S-1 (cache dtype), index =
                          position;  v_sink [B, H, S, d]. Their quantized rows exist too but are
                          replaced by the sink copies at dequantization. (Sinks are chosen by position,
                          not by slot, so left padding does not take their place.)
    lengths, pos_offset [B, H] int32                   position of slot t = t + pos_offset

Bad input -> ValueError: bits not in {2, 4, 8}, G not dividing head_dim, head_dim or head_group not
a power of two, head_group not dividing kv_heads, missing pre-RoPE keys or rope, NaN/inf (eager).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import tree_bytes
from kvjax.quant import packing

ROTATEKV_BITS = (2, 4, 8)
NO_POSITION = -(2 ** 30)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class RotateKVConfig:
    """RotateKV hyperparameters (paper code defaults: 2 bits, group = one head (None), head_group_num 4;
    `sink_tokens` replaces the massive-activation pivot detection, see the module docstring)."""

    bits: int = 2
    group: Optional[int] = None
    head_group: int = 4
    sink_tokens: int = 4

    def group_size(self, head_dim: int) -> int:
        return head_dim if self.group is None else self.group

    def validate(self, head_dim: int, kv_heads: int) -> None:
        if self.bits not in ROTATEKV_BITS:
            raise ValueError(f"RotateKV bits={self.bits} is not supported: choose one of {ROTATEKV_BITS}")
        g = self.group_size(head_dim)
        if g <= 0 or head_dim % g:
            raise ValueError(f"RotateKV group size {g} must be positive and divide head_dim={head_dim}")
        if not _pow2(head_dim):
            raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two head_dim, got {head_dim}")
        if not _pow2(self.head_group) or kv_heads % self.head_group:
            raise ValueError(f"head_group={self.head_group} must be a power of two dividing kv_heads={kv_heads} "
                             "(e.g. head_group=1 for a model with 3 kv-heads)")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")


# ----------------------------------------------------------------------------- Walsh-Hadamard

def fwht(x: jax.Array, normalize: bool = True) -> jax.Array:
    """Fast Walsh-Hadamard transform along the last axis (length n, a power of two), Sylvester
    (natural) order: returns x @ H_n (H_n symmetric, entries +-1), divided by sqrt(n) if `normalize`.
    n log2 n additions: log2 n butterfly stages (a, b) -> (a + b, a - b)."""
    n = x.shape[-1]
    if not _pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        y = y.reshape(lead + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    y = y.reshape(lead + (n,))
    return y / np.sqrt(n) if normalize else y


def rotate_keys(k: jax.Array, head_group: int) -> jax.Array:
    """Grouped-head FWHT of keys `[..., kv_heads, seq, d]` over `head_group` consecutive heads
    (normalised; applying it twice is the identity)."""
    *lead, h, t, d = k.shape
    lead = tuple(lead)
    if h % head_group:
        raise ValueError(f"head_group={head_group} does not divide kv_heads={h}")
    nl = len(lead)
    x = k.reshape(lead + (h // head_group, head_group, t, d))
    perm = tuple(range(nl)) + (nl, nl + 2, nl + 1, nl + 3)                 # [..., H/hg, t, hg, d]
    x = fwht(x.transpose(perm).reshape(lead + (h // head_group, t, head_group * d)))
    x = x.reshape(lead + (h // head_group, t, head_group, d)).transpose(perm)
    return x.reshape(k.shape)


def rotate_values(v: jax.Array) -> jax.Array:
    """Per-head FWHT of values `[..., d]` (normalised, self-inverse)."""
    return fwht(v)


# ----------------------------------------------------------------------------- pure quantizers

def quantize(x: jax.Array, bits: int, group: int):
    """Per-token asymmetric RTN of (already rotated) `x [..., T, d]` in groups of `group` channels
    -> (codes uint8 [..., T, d*bits/8], scale, min f16 [..., T, d/group])."""
    packing.check_finite("RotateKV keys/values", x)
    codes, scale, mn = packing.quantize(x, bits, group, axis=-1)
    return packing.pack(codes, bits), scale, mn


def dequantize_rows(codes, scale, mn, bits: int, group: int) -> jax.Array:
    return packing.dequantize(packing.unpack(codes, bits), scale, mn, group, axis=-1)


def quantize_dequantize(keys_pre_rope: jax.Array, values: jax.Array, cfg: RotateKVConfig):
    """Round trip of `[batch, kv_heads, T, d]` pre-RoPE keys and values through RotateKV's storage
    (without sinks): rotate, quantize per token, dequantize, rotate back -> (k_hat, v_hat)."""
    d = keys_pre_rope.shape[-1]
    cfg.validate(d, keys_pre_rope.shape[1])
    g = cfg.group_size(d)
    kc = quantize(rotate_keys(keys_pre_rope.astype(jnp.float32), cfg.head_group), cfg.bits, g)
    vc = quantize(rotate_values(values.astype(jnp.float32)), cfg.bits, g)
    k_hat = rotate_keys(dequantize_rows(*kc, cfg.bits, g), cfg.head_group)
    v_hat = rotate_values(dequantize_rows(*vc, cfg.bits, g))
    return k_hat, v_hat


def bytes_per_token(head_dim: int, bits: int, group: int) -> int:
    """Codes + f16 scale and min per token per kv-head, K and V together."""
    return 2 * (head_dim * bits // 8 + 2 * 2 * (head_dim // group))


# ----------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class RotateKVCache:
    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    k_sink: jax.Array
    v_sink: jax.Array
    lengths: jax.Array
    pos_offset: jax.Array
    config: RotateKVConfig = RotateKVConfig()

    @property
    def head_dim(self) -> int:
        return self.k_sink.shape[-1]

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[-2]

    def memory_bytes(self) -> int:
        """Bytes of every array held: codes, scales, mins, fp sink tokens, counters."""
        return tree_bytes(self)

    @property
    def positions(self) -> jax.Array:
        t = jnp.arange(self.capacity, dtype=jnp.int32)
        pos = t + self.pos_offset[..., None]
        return jnp.where((t < self.lengths[..., None]) & (pos >= 0), pos, -1).astype(jnp.int32)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "RotateKVCache":
        """keys_pre_rope (required), values `[batch, kv_heads, new, d]`; post-RoPE keys are unused."""
        if keys_pre_rope is None:
            raise ValueError("RotateKV quantizes pre-RoPE keys: append needs keys_pre_rope")
        return append(self, keys_pre_rope, values, positions)

    def resize(self, capacity: int) -> "RotateKVCache":
        """Same tokens, `capacity` slots (grow for decode room; shrinking below the longest row is an error)."""
        return resize(self, capacity)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        if rope is None:
            raise ValueError("RotateKV stores pre-RoPE keys: attend needs the model's rope function")
        from kvjax.attention import attend
        k, v = dequantize(self)
        pos = self.positions
        k = rope(k, jnp.maximum(pos, 0))
        return attend(q, k, v, pos, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(
    RotateKVCache, data_fields=["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_sink",
                                "v_sink", "lengths", "pos_offset"], meta_fields=["config"])


def init_rotatekv_cache(cfg: RotateKVConfig, n_layers: int, batch: int, kv_heads: int, capacity: int,
                        head_dim: int, dtype=jnp.float32) -> RotateKVCache:
    """Empty RotateKV cache stacked over layers (`capacity` tokens per (batch, kv-head))."""
    cfg.validate(head_dim, kv_heads)
    if min(n_layers, batch, kv_heads, capacity, head_dim) <= 0:
        raise ValueError("cache dimensions must be positive")
    s = cfg.sink_tokens
    cq = capacity
    g = cfg.group_size(head_dim)
    lead = (n_layers, batch, kv_heads)
    z = lambda *sh, dt=jnp.float16: jnp.zeros(lead + sh, dt)
    pb = packing.packed_size(head_dim, cfg.bits)
    return RotateKVCache(
        k_codes=z(cq, pb, dt=jnp.uint8), k_scale=z(cq, head_dim // g), k_min=z(cq, head_dim // g),
        v_codes=z(cq, pb, dt=jnp.uint8), v_scale=z(cq, head_dim // g), v_min=z(cq, head_dim // g),
        k_sink=z(s, head_dim, dt=dtype), v_sink=z(s, head_dim, dt=dtype),
        lengths=z(dt=jnp.int32), pos_offset=jnp.full(lead, NO_POSITION, jnp.int32), config=cfg)


def _update_offset(offset, length, positions):
    n = positions.shape[-1]
    slot = length[..., None] + jnp.arange(n, dtype=jnp.int32)
    pos = positions[:, None, :].astype(jnp.int32)
    cand = jnp.where(pos >= 0, pos - slot, NO_POSITION)
    return jnp.where(jnp.any(pos >= 0, axis=-1), jnp.max(cand, -1), offset).astype(jnp.int32)


def append(layer: RotateKVCache, keys_pre_rope, values, positions) -> RotateKVCache:
    """Append pre-RoPE keys and values `[batch, kv_heads, new, d]` to one layer (pure). Every slot is
    rotated and quantized at its row; tokens at positions 0..S-1 are also kept exactly in the fp sink
    buffer (index = position). Writes past the capacity are dropped (callers size the cache)."""
    if keys_pre_rope.shape != values.shape or keys_pre_rope.ndim != 4 or keys_pre_rope.shape[-1] != layer.head_dim:
        raise ValueError(f"keys {keys_pre_rope.shape} / values {values.shape} must be [batch, kv_heads, new, "
                         f"{layer.head_dim}]")
    cfg = layer.config
    d = layer.head_dim
    g = cfg.group_size(d)
    packing.check_finite("RotateKV append keys/values", keys_pre_rope, values)
    n = keys_pre_rope.shape[-2]
    s = layer.k_sink.shape[-2]
    kc, ks, km = quantize(rotate_keys(keys_pre_rope.astype(jnp.float32), cfg.head_group), cfg.bits, g)
    vc, vs, vm = quantize(rotate_values(values.astype(jnp.float32)), cfg.bits, g)
    qrow = layer.lengths[..., None] + jnp.arange(n, dtype=jnp.int32)         # [B, H, n]
    big = jnp.int32(np.iinfo(np.int32).max)
    pos = jnp.broadcast_to(positions[:, None, :], qrow.shape).astype(jnp.int32)
    srow = jnp.where((pos >= 0) & (pos < s), pos, big)

    def put(dst, rows, src):
        return jax.vmap(jax.vmap(lambda a, r, u: a.at[r].set(u.astype(a.dtype), mode="drop")))(dst, rows, src)

    return dataclasses.replace(
        layer,
        k_codes=put(layer.k_codes, qrow, kc), k_scale=put(layer.k_scale, qrow, ks), k_min=put(layer.k_min, qrow, km),
        v_codes=put(layer.v_codes, qrow, vc), v_scale=put(layer.v_scale, qrow, vs), v_min=put(layer.v_min, qrow, vm),
        k_sink=put(layer.k_sink, srow, keys_pre_rope), v_sink=put(layer.v_sink, srow, values),
        lengths=layer.lengths + n, pos_offset=_update_offset(layer.pos_offset, layer.lengths, positions))


def dequantize(layer: RotateKVCache, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Dense **pre-RoPE** keys and values `[batch, kv_heads, capacity, d]` in slot order (dequantized,
    un-rotated rows; the rows of positions 0..S-1 replaced by the exact sink copies); slots past
    `lengths` are masked by `positions`."""
    cfg = layer.config
    g = cfg.group_size(layer.head_dim)
    k = rotate_keys(dequantize_rows(layer.k_codes, layer.k_scale, layer.k_min, cfg.bits, g), cfg.head_group)
    v = rotate_values(dequantize_rows(layer.v_codes, layer.v_scale, layer.v_min, cfg.bits, g))
    s = layer.k_sink.shape[-2]
    if s:
        pos = layer.positions
        is_sink = ((pos >= 0) & (pos < s))[..., None]
        idx = jnp.clip(pos, 0, s - 1)
        take = lambda buf: jnp.take_along_axis(buf.astype(jnp.float32), idx[..., None], axis=-2)
        k = jnp.where(is_sink, take(layer.k_sink), k)
        v = jnp.where(is_sink, take(layer.v_sink), v)
    return k.astype(dtype), v.astype(dtype)


def resize(cache: RotateKVCache, capacity: int) -> RotateKVCache:
    """Grow or shrink the quantized rows to `capacity` slots; ValueError if a row holds more tokens."""
    if capacity == cache.capacity:
        return cache
    longest = int(jnp.max(cache.lengths))
    if capacity < longest:
        raise ValueError(f"cannot shrink the RotateKV cache to {capacity} slots: a row holds {longest} tokens")
    cq = capacity

    def fit(x):
        n = x.shape[-2]
        if cq <= n:
            return x[..., :cq, :]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, cq - n), (0, 0)])

    return dataclasses.replace(cache, k_codes=fit(cache.k_codes), k_scale=fit(cache.k_scale), k_min=fit(cache.k_min),
                               v_codes=fit(cache.v_codes), v_scale=fit(cache.v_scale), v_min=fit(cache.v_min))
