"""Shared pieces of the Pallas-Mosaic (TPU) kernels: interpret settings, float16 operands as raw bits.

The KIVI scales/mins and the QJL norms are float16 in the cache (kvjax/quant/LAYOUT.md). Mosaic's
float16 support depends on the TPU generation, so the kernels never see a float16 array: the
wrapper bitcasts it to int16 (free, same width: the bytes DMA'd are the cache's own bytes) and the
kernel rebuilds the float32 value with int32 ops (`f16_bits_to_f32`, exact for normal and
subnormal halves). bfloat16 / float32 operands are passed through unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def interpret_params(interpret):
    """`interpret` of a kernel wrapper -> pallas_call's: False (compile for TPU), True (TPU
    interpret mode with default settings) or a `pltpu.InterpretParams` (e.g. detect_races=True)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def as_kernel_operand(x: jax.Array) -> tuple[jax.Array, bool]:
    """(array to hand to the kernel, whether it holds float16 bits as int16)."""
    if x.dtype == jnp.float16:
        return lax.bitcast_convert_type(x, jnp.int16), True
    if x.dtype in (jnp.float32, jnp.bfloat16):
        return x, False
    return x.astype(jnp.float32), False


def stat_pair(scale: jax.Array, mn: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    """A scale/min pair as kernel operands of one kind: (scale, min, float16-bits flag)."""
    if scale.dtype == mn.dtype:
        (s, f16), (m, _) = as_kernel_operand(scale), as_kernel_operand(mn)
        return s, m, f16
    return scale.astype(jnp.float32), mn.astype(jnp.float32), False


def f16_bits_to_f32(h: jax.Array) -> jax.Array:
    """int16/int32 array holding IEEE half bit patterns -> float32 values (inf/NaN not handled).

    normal: (1024 + mantissa) * 2^(exp - 25); subnormal (exp == 0): mantissa * 2^-24."""
    h = h.astype(jnp.int32) & 0xFFFF
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    pow2 = lax.bitcast_convert_type((e + 102) << 23, jnp.float32)      # 2^(e - 25), a normal f32
    normal = (mant | 0x400).astype(jnp.float32) * pow2
    sub = mant.astype(jnp.float32) * (2.0 ** -24)
    v = jnp.where(e == 0, sub, normal)
    return jnp.where((h & 0x8000) != 0, -v, v)


def load_f32(x: jax.Array, f16_bits: bool) -> jax.Array:
    """A loaded kernel operand (see `as_kernel_operand`) as float32."""
    return f16_bits_to_f32(x) if f16_bits else x.astype(jnp.float32)


def advance_double_buffer(copies, j, n_blocks, slot) -> None:
    """Inside block j's loop step: start block j+1's DMAs into the other slot (when j + 1 <
    n_blocks), then wait for block j's. copies(block, slot) -> list of async copy descriptors."""
    @pl.when(j + 1 < n_blocks)
    def _():
        for c in copies(j + 1, 1 - slot):
            c.start()

    for c in copies(j, slot):
        c.wait()
