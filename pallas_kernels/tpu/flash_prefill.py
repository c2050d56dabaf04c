"""Causal flash-attention prefill over a dense KV cache, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.flash_prefill` (FlashAttention-2 tiling: Dao,
arXiv 2307.08691): a chunk of T queries over the layer's cache, which already holds the chunk's
keys at slots [lengths - T, lengths); query i sees slots starts <= s <= lengths - T + i.

Grid (batch, q_heads, query blocks). starts/lengths are scalar-prefetched into SMEM; the
[block_q, head_dim] query tile comes in through its BlockSpec, K and V stay in HBM (`pl.ANY`) and
are streamed in `block_k`-slot blocks by manual DMA into a two-slot VMEM buffer (block j+1 is in
flight while block j is consumed, as in `tpu.dense_decode`). Only the blocks of the tile's live
range are copied: from starts // block_k up to the block of its last query's diagonal, so an early
chunk in a long cache never touches the dead capacity. The walk is three loops sharing one buffer
sequence: the block cut by starts (masked), the blocks every row fully sees (no mask arithmetic),
the diagonal blocks (masked). Dots take the cache dtype (bf16 on the MXU) with float32
accumulation; the online softmax is float32.

Tiles: block_q a multiple of 8 (sublanes), block_k a multiple of 128 (lanes of the [block_q,
block_k] logits). block_k is lowered to the largest multiple of 128 dividing the capacity; a
capacity that is not a multiple of 128 is padded (a copy of the cache: allocate capacities as
multiples of 128).

Not measured on a TPU (none available when written); validated in TPU interpret mode and lowered
to Mosaic on CPU only.
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
_NT = (((1,), (1,)), ((), ()))   # x [m, k] . y [n, k] -> [m, n]


def _kernel(len_ref, st_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem, *, t_len: int,
            block_k: int, group: int, scale: float):
    bi, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = lax.div(h, group)
    length = len_ref[bi, hk]
    first = st_ref[bi, hk]
    bk = block_k
    q = q_ref[...]
    bq, d = q.shape
    i0 = qi * bq
    end = length - t_len + jnp.minimum(i0 + bq, t_len)           # one past the last slot seen
    lo = lax.div(first, bk)
    hi = jnp.where(end > first, lax.div(end + bk - 1, bk), lo)
    full_lo = lax.div(first + bk - 1, bk)                         # first block entirely >= starts
    full_hi = lax.div(jnp.maximum(length - t_len + i0 + 1, 0), bk)  # blocks row i0 sees whole
    a = jnp.clip(full_lo, lo, hi)
    b = jnp.clip(full_hi, a, hi)
    # last slot of each row (padding rows past T are capped at length - 1; their output is dropped)
    row_last = jnp.minimum(length - t_len + i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0),
                           length - 1)

    def copies(j, slot):
        start = pl.multiple_of(j * bk, bk)
        return (pltpu.make_async_copy(k_hbm.at[bi, hk, pl.ds(start, bk)], kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[bi, hk, pl.ds(start, bk)], vbuf.at[slot], sem.at[1, slot]))

    @pl.when(lo < hi)
    def _():
        for c in copies(lo, 0):
            c.start()

    def step(j, carry, masked: bool):
        o, m, l = carry
        slot = lax.rem(j - lo, 2)
        common.advance_double_buffer(copies, j, hi, slot)
        kb = kbuf[slot]
        vb = vbuf[slot]
        s = lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            t = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            valid = (t >= first) & (t <= row_last)
            s = jnp.where(valid, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
            tc = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
            live = (tc >= first) & (tc < length)                  # dead slots may hold NaN
            vb = jnp.where(live, vb.astype(jnp.float32), 0.0).astype(vb.dtype)
        else:
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1, keepdims=True)
        o = alpha * o + jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return o, m_new, l

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), NEG_INF, jnp.float32),
             jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    o, _, l = lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def flash_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                  lengths: jax.Array, *, scale: float | None = None, block_q: int = 256,
                  block_k: int = 512, interpret=False) -> jax.Array:
    """Causal chunked-prefill attention; same contract as `reference.flash_prefill`.

    block_q: query rows per tile (multiple of 8; lowered to the chunk rounded up to 8; a chunk
    that is not a multiple of it is padded, a copy of q only). block_k: slots per DMA block
    (multiple of 128; lowered to the largest multiple of 128 dividing the capacity).
    Defaults 256 x 512: the MXU-sized tiles of JAX's TPU splash attention; VMEM holds 2 x 2 x
    512 x head_dim cache rows plus the [256, 512] float32 logits (~1 MB at head_dim 128).
    interpret: False, True or a `pltpu.InterpretParams` (TPU interpret mode on CPU)."""
    g = reference.check_prefill(q, keys, values, starts, lengths)
    b, hkv, cap, d = keys.shape
    t_len = q.shape[2]
    if block_q <= 0 or block_q % 8:
        raise ValueError(f"block_q must be a positive multiple of 8, got {block_q}")
    if block_k <= 0 or block_k % 128:
        raise ValueError(f"block_k must be a positive multiple of 128, got {block_k}")
    if keys.dtype != values.dtype or keys.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"keys, values must share a dtype bf16 or fp32, got {keys.dtype}, {values.dtype}")
    scale = d ** -0.5 if scale is None else scale
    if t_len == 0:
        return jnp.zeros(q.shape, q.dtype)
    if cap % 128:
        pad = ((0, 0), (0, 0), (0, -cap % 128), (0, 0))
        keys, values = jnp.pad(keys, pad), jnp.pad(values, pad)
        cap = keys.shape[2]
    block_k = max(x for x in range(128, min(block_k, cap) + 1, 128) if cap % x == 0)
    block_q = min(block_q, -(-t_len // 8) * 8)
    n_qb = -(-t_len // block_q)
    qp = q.astype(keys.dtype)
    if n_qb * block_q != t_len:
        qp = jnp.pad(qp, ((0, 0), (0, 0), (0, n_qb * block_q - t_len), (0, 0)))
    lens = jnp.clip(lengths, 0, cap).astype(jnp.int32)
    st = jnp.clip(starts, 0, cap).astype(jnp.int32)
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda i, h, j, *_: (i, h, j, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv * g, n_qb),
        in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((2, block_k, d), keys.dtype), pltpu.VMEM((2, block_k, d), values.dtype),
                        pltpu.SemaphoreType.DMA((2, 2))],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, t_len=t_len, block_k=block_k, group=g, scale=scale),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=common.interpret_params(interpret),
        name="kvjax_flash_prefill_tpu",
    )(lens, st, qp, keys, values)
    return out[:, :, :t_len] if n_qb * block_q != t_len else out
