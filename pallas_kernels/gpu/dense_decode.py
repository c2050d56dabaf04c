"""Split-K flash-decoding over a dense bf16/fp16 KV cache (Pallas-Triton, GPU).

FlashDecoding (Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023):
the KV length of each (batch, kv-head) is cut into `num_splits` contiguous ranges handled by
separate programs, each doing an online softmax over `block_k`-token tiles; a small XLA combine
merges the splits. The g query heads of one kv-head form one [16+, head_dim] tile (GQA), so
the q.K^T and p.V products run on the tensor cores. Splits are sized by each head's own
length, so ragged heads (eviction) spread their live tokens over all splits and never read
slots past their length.

Shapes: q [batch, q_heads, head_dim]; k, v [batch, kv_heads, capacity, head_dim];
lengths [batch, kv_heads] int32, optional starts [batch, kv_heads] (slots
[starts, lengths) are live) -> out [batch, q_heads, head_dim].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels.gpu import common


def _kernel(q_ref, k_ref, v_ref, len_ref, o_ref, m_ref, l_ref, *, block_k: int, num_splits: int,
            g: int, precision=None):
    split = pl.program_id(2)
    length = len_ref[0]
    first = len_ref[1]
    b0 = jnp.minimum(first, length) // block_k
    n_blocks = pl.cdiv(length, block_k) - b0
    per = pl.cdiv(n_blocks, num_splits)
    lo = b0 + split * per
    hi = jnp.minimum(lo + per, b0 + n_blocks)
    q = q_ref[...]
    gp, d = q.shape

    def body(j, carry):
        o, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        kb = k_ref[pl.ds(start, block_k), :]
        vb = v_ref[pl.ds(start, block_k), :]
        t = start + lax.iota(jnp.int32, block_k)
        valid = (t < length) & (t >= first)
        s = plgpu.dot(q, kb, trans_b=True, precision=precision)
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        vb = jnp.where(valid[:, None], vb, jnp.zeros_like(vb))
        o = alpha[:, None] * o + plgpu.dot(p.astype(vb.dtype), vb, precision=precision)
        return o, m, l

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = lax.fori_loop(lo, hi, body, init)
    common.store_rows(o_ref, o, g)
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def dense_decode(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                 starts: jax.Array | None = None, *,
                 scale: float | None = None, block_k: int = 64, num_splits: int | None = None,
                 num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """Split-K decode attention; same contract as `pallas_kernels.reference.dense_decode`.

    block_k: tokens per tile (power of two >= 16; capacity is padded to a multiple of it if
    needed, which copies the cache -- allocate capacity as a multiple of block_k).
    num_splits: KV splits per (batch, kv-head); default fills ~2 waves of programs on an H100."""
    g = reference.check_dense(q, k, v, lengths)
    b, hkv, cap, d = k.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if k.dtype != v.dtype or k.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"k, v must share a float dtype (bf16/fp16/fp32), got {k.dtype}, {v.dtype}")
    scale = d ** -0.5 if scale is None else scale
    block_k = min(block_k, common.next_pow2(max(cap, 16)))
    if cap % block_k:
        pad = -cap % block_k
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        cap += pad
    gp = common.padded_heads(g)
    qg = common.group_queries(q, hkv, scale, k.dtype, gp)
    splits = common.choose_splits(b, hkv, cap // block_k, num_splits)
    st = reference._starts(starts, lengths)
    lens = jnp.stack([jnp.minimum(lengths, cap), jnp.maximum(st, 0)], axis=-1).astype(jnp.int32)
    # float32 caches: IEEE fp32 dots (Triton's default for fp32 is TF32, ~1e-3 relative error)
    prec = (lax.Precision.HIGHEST, lax.Precision.HIGHEST) if k.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_k=block_k, num_splits=splits, g=g, precision=prec)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, 2), lambda i, h, s: (i, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_dense_decode",
    )(qg, k, v, lens)
    return common.combine_splits(o, m, l, g).astype(q.dtype)
