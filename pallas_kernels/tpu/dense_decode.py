"""Decode attention over a dense KV cache, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.dense_decode` (FlashDecoding-style online softmax,
Dao et al. 2023; structure after JAX's TPU paged-attention kernel): grid (batch, kv_heads); the
per-(batch, kv-head) lengths and starts are scalar-prefetched into SMEM, K and V stay in HBM
(`pl.ANY`) and are streamed in `block_k`-token blocks by manual DMA into a two-slot VMEM buffer:
the copy of block j+1 is issued before block j is consumed (double buffering), and only blocks
inside [starts, lengths) are ever copied, so ragged/evicted heads cost what they hold. The g query
heads of a kv-head form one [g, head_dim] tile for the MXU.

Not yet: split-K across TensorCores (megacore) and prefetch of the next head's first block
across grid steps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference
from pallas_kernels.tpu import common

NEG_INF = reference.NEG_INF


def _kernel(len_ref, start_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem, *, block_k: int):
    b = pl.program_id(0)
    h = pl.program_id(1)
    length = len_ref[b, h]
    first = start_ref[b, h]
    b0 = jnp.minimum(first, length) // block_k
    nb = pl.cdiv(length, block_k)
    q = q_ref[...].astype(jnp.float32)
    g, d = q.shape

    def copies(j, slot):
        start = pl.multiple_of(j * block_k, block_k)
        return (pltpu.make_async_copy(k_hbm.at[b, h, pl.ds(start, block_k)], kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[b, h, pl.ds(start, block_k)], vbuf.at[slot], sem.at[1, slot]))

    @pl.when(b0 < nb)
    def _():
        for c in copies(b0, 0):
            c.start()

    def body(j, carry):
        o, m, l = carry
        slot = (j - b0) % 2

        common.advance_double_buffer(copies, j, nb, slot)
        kb = kbuf[slot].astype(jnp.float32)
        vb = vbuf[slot].astype(jnp.float32)
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        t = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        valid = (t < length) & (t >= first)
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l = alpha * l + p.sum(axis=1, keepdims=True)
        vb = jnp.where(valid.reshape(block_k, 1), vb, 0.0)
        o = alpha * o + jnp.dot(p, vb, preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((g, d), jnp.float32), jnp.full((g, 1), NEG_INF, jnp.float32),
            jnp.zeros((g, 1), jnp.float32))
    o, m, l = lax.fori_loop(b0, nb, body, init)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "interpret"))
def dense_decode(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                 starts: jax.Array | None = None, *, scale: float | None = None,
                 block_k: int = 256, interpret: bool = False) -> jax.Array:
    """Double-buffered decode attention; same contract as `reference.dense_decode`.

    block_k: tokens per DMA block (multiple of 16); capacity is padded to a multiple of it if
    needed (a copy -- allocate capacity as a multiple of block_k)."""
    g = reference.check_dense(q, k, v, lengths)
    b, hkv, cap, d = k.shape
    if block_k <= 0 or block_k % 16:
        raise ValueError(f"block_k must be a positive multiple of 16, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    block_k = min(block_k, -(-cap // 16) * 16)
    if cap % block_k:
        pad = -cap % block_k
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        cap += pad
    st = jnp.maximum(reference._starts(starts, lengths), 0).astype(jnp.int32)
    lens = jnp.clip(lengths, 0, cap).astype(jnp.int32)
    qg = (q.reshape(b, hkv, g, d).astype(jnp.float32) * scale).astype(q.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, g, d), lambda i, h, *_: (i, h, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, None, g, d), lambda i, h, *_: (i, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, block_k, d), k.dtype), pltpu.VMEM((2, block_k, d), v.dtype),
                        pltpu.SemaphoreType.DMA((2, 2))],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="kvjax_dense_decode_tpu",
    )(lens, st, qg, k, v)
    return out.reshape(b, hkv * g, d)
