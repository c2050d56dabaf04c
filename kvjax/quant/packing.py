"""Bit packing of low-bit codes into uint8 and group-wise asymmetric min-max quantization.

Shared by every KV quantizer in `kvjax.quant` (KIVI, arXiv 2402.02750; KVQuant, arXiv 2401.18079;
QJL, arXiv 2406.03482; GEAR, ZipCache, MiKV, RotateKV reuse it).

Packing is **planar along the last axis** (the contract of `kvjax/quant/LAYOUT.md`): with
`f = 8 // bits` fields per byte and `P = n // f` bytes per row, byte `j` holds element
`j + i * P` in bits `[bits * i, bits * (i + 1))`, i = 0 .. f-1 (LSB first). So every bit-field
of a byte is a contiguous element range and unpacking is `(byte >> (bits * i)) & (2^bits - 1)`.
Supported widths: 1, 2, 4, 8 (planar as above) and 3: a 3-bit code c is split into its low two
bits (packed as a 2-bit plane of n/4 bytes) followed by its high bit (a 1-bit plane of n/8 bytes),
3n/8 bytes in all. The packed row length is `packed_size(n, bits) = n * bits / 8`.

Quantization (asymmetric round-to-nearest without clipping, as in KIVI):
    scale = fp16((max - min) / (2^bits - 1)),  mn = fp16(min)       (statistics per group)
    code  = clip(round((x - mn) / scale), 0, 2^bits - 1)            (round half to even)
    x_hat = code * scale + mn
A group whose max == min (scale 0) gets code 0 and dequantizes to `mn` exactly. Statistics are
stored in float16 (the paper's storage type) and codes are computed against the rounded
statistics, so `x_hat` is exactly what the stored arrays reproduce.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PACK_BITS = (1, 2, 3, 4, 8)
STAT_DTYPE = jnp.float16


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported bit width {bits}: packing supports {PACK_BITS}")


def packed_size(n: int, bits: int) -> int:
    """Bytes per row of `n` codes at `bits` bits; ValueError if `n` does not pack evenly."""
    _check_bits(bits)
    per = 8 if bits == 3 else 8 // bits
    if n % per:
        raise ValueError(f"a row of {n} codes cannot be packed at {bits} bits: {n} is not a multiple of {per}")
    return n * bits // 8


def _pack_planar(codes: jax.Array, bits: int) -> jax.Array:
    f = 8 // bits
    n = codes.shape[-1]
    p = n // f
    c = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (f, p))
    shifts = (jnp.arange(f, dtype=jnp.uint8) * bits)[:, None]
    # fields occupy disjoint bits, so the sum equals the bitwise or
    return jnp.sum(jnp.left_shift(c, shifts), axis=-2, dtype=jnp.uint8)


def _unpack_planar(packed: jax.Array, bits: int) -> jax.Array:
    f = 8 // bits
    shifts = (jnp.arange(f, dtype=jnp.uint8) * bits)[:, None]
    fields = jnp.right_shift(packed[..., None, :], shifts) & jnp.uint8((1 << bits) - 1)
    return fields.reshape(packed.shape[:-1] + (f * packed.shape[-1],))


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Codes `[..., n]` (integers in [0, 2^bits)) -> uint8 `[..., n * bits / 8]`, planar layout.

    Codes are masked to their low `bits` bits (callers quantize with clipping first)."""
    n = codes.shape[-1]
    packed_size(n, bits)
    codes = codes.astype(jnp.uint8) & jnp.uint8((1 << bits) - 1)
    if bits == 8:
        return codes
    if bits == 3:
        return jnp.concatenate([_pack_planar(codes & jnp.uint8(3), 2),
                                _pack_planar(jnp.right_shift(codes, jnp.uint8(2)), 1)], axis=-1)
    return _pack_planar(codes, bits)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """uint8 `[..., n * bits / 8]` -> codes uint8 `[..., n]` (inverse of `pack`, bit-exact)."""
    _check_bits(bits)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed
    if bits == 3:
        m = packed.shape[-1]
        if m % 3:
            raise ValueError(f"a 3-bit packed row has a multiple of 3 bytes, got {m}")
        lo = _unpack_planar(packed[..., : 2 * m // 3], 2)
        hi = _unpack_planar(packed[..., 2 * m // 3:], 1)
        return lo | jnp.left_shift(hi, jnp.uint8(2))
    return _unpack_planar(packed, bits)


def _grouped(x: jax.Array, group: int, axis: int) -> tuple[jax.Array, int]:
    """Split `axis` (size n) into (n // group, group); returns the view and the new group axis."""
    axis = axis % x.ndim
    n = x.shape[axis]
    if group <= 0 or n % group:
        raise ValueError(f"group size {group} must be positive and divide the quantized axis (size {n})")
    return x.reshape(x.shape[:axis] + (n // group, group) + x.shape[axis + 1:]), axis + 1


def quantize(x: jax.Array, bits: int, group: int, axis: int = -1):
    """Group-wise asymmetric min-max quantization of `x` along `axis` in groups of `group`.

    x: `[..., n, ...]` floating, with `n % group == 0` (n = x.shape[axis]).
    returns (codes uint8 shaped like x, scale, mn) where scale and mn are float16 shaped like x
    with `axis` of size `n // group`. E.g. KIVI keys `[b, h, T, d]` with axis=-2 (per channel over
    G tokens) give stats `[b, h, T/G, d]`; values with axis=-1 (per token over G channels) give
    `[b, h, T, d/G]`."""
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}: quantize supports 1, 2, 3, 4, 8")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize expects a floating array, got {x.dtype}")
    xg, gax = _grouped(x.astype(jnp.float32), group, axis)
    lo = jnp.min(xg, axis=gax, keepdims=True)
    hi = jnp.max(xg, axis=gax, keepdims=True)
    levels = (1 << bits) - 1
    mn = lo.astype(STAT_DTYPE)
    scale = ((hi - lo) / levels).astype(STAT_DTYPE)
    s32, m32 = scale.astype(jnp.float32), mn.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.where(s32 > 0, jnp.clip(jnp.round((xg - m32) / safe), 0, levels), 0.0)
    codes = codes.astype(jnp.uint8).reshape(x.shape)
    return codes, jnp.squeeze(scale, gax), jnp.squeeze(mn, gax)


def dequantize(codes: jax.Array, scale: jax.Array, mn: jax.Array, group: int, axis: int = -1,
               dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize`: `codes * scale + mn` with the stats broadcast over each group."""
    axis = axis % codes.ndim
    s = jnp.repeat(scale.astype(jnp.float32), group, axis=axis)
    m = jnp.repeat(mn.astype(jnp.float32), group, axis=axis)
    return (codes.astype(jnp.float32) * s + m).astype(dtype)


def check_finite(name: str, *arrays) -> None:
    """ValueError if any concrete array holds NaN or inf (no-op on tracers: call it outside jit)."""
    for i, a in enumerate(arrays):
        if a is None or isinstance(a, jax.core.Tracer):
            continue
        arr = np.asarray(a)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise ValueError(f"{name}[{i}] holds {bad} NaN/inf values: the KV cache cannot quantize "
                             "non-finite keys/values")
