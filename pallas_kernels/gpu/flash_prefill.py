"""Causal flash-attention prefill over a dense KV cache (Pallas-Triton, GPU).

FlashAttention-2 forward (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", arXiv 2307.08691) for chunked prefill: a chunk of T queries attends over the
layer's cache, which already holds the chunk's own keys at slots [lengths - T, lengths). Query i
of a head sees the slots starts <= s <= lengths - T + i (all live context, causal in the chunk).

One program per (query head, batch, query block): the [block_q, head_dim] query tile stays in
registers while an online softmax (base 2, float32 running max/denominator/accumulator) walks
the key blocks of its live range only -- from starts // block_k up to the block holding its last
query's diagonal -- so a 32K cache with an early chunk costs what is live, never the dead
capacity. The walk is three loops: the (at most one) block cut by `starts`, the blocks every
row of the tile fully sees (no mask arithmetic), and the diagonal blocks (masked). Query heads
of one kv head are adjacent in the launch grid (their K/V tiles are shared in L2); query blocks
go heaviest (latest in the chunk) first for a short causal tail. bf16/fp16 inputs use tensor-core
dots with float32 accumulation; float32 inputs use IEEE fp32 dots (Precision.HIGHEST, not TF32).

Shapes: q [batch, q_heads, T, head_dim]; keys, values [batch, kv_heads, S, head_dim];
starts, lengths [batch, kv_heads] int32 -> out [batch, q_heads, T, head_dim] in q.dtype.
Contract: `pallas_kernels.reference.flash_prefill`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels.gpu import common

NEG_INF = common.NEG_INF


def _kernel(q_ref, k_ref, v_ref, rng_ref, o_ref, *, t_len: int, n_qblocks: int, block_k: int,
            cap: int, qk_scale: float, precision):
    qb = n_qblocks - 1 - pl.program_id(2)          # heaviest query block first
    first = rng_ref[0]                             # starts, clamped to [0, cap]
    length = rng_ref[1]                            # lengths, clamped to [0, cap]
    q = q_ref[...]
    bq, d = q.shape
    i0 = qb * bq
    # last slot each row sees (rows past T are padding: capped at length - 1, output dropped)
    row_last = jnp.minimum(length - t_len + i0 + lax.iota(jnp.int32, bq), length - 1)
    q_last = jnp.minimum(i0 + bq, t_len) - 1       # last real query of the tile
    end = length - t_len + q_last + 1              # one past the last slot any row sees
    lo = first // block_k
    hi = jnp.where(end > first, pl.cdiv(jnp.maximum(end, 0), block_k), lo)
    full_lo = pl.cdiv(first, block_k)              # first block entirely >= starts
    full_hi = jnp.maximum(length - t_len + i0 + 1, 0) // block_k  # blocks seen whole by row i0
    a = jnp.clip(full_lo, lo, hi)
    b = jnp.clip(full_hi, a, hi)

    def step(j, carry, masked: bool):
        o, m, l = carry
        if masked and cap % block_k:
            start = jnp.minimum(j * block_k, cap - block_k)   # last partial block: shift back in bounds
        else:
            start = pl.multiple_of(j * block_k, block_k)
        kb = k_ref[pl.ds(start, block_k), :]
        vb = v_ref[pl.ds(start, block_k), :]
        s = plgpu.dot(q, kb, trans_b=True, precision=precision) * qk_scale
        if masked:
            t = start + lax.iota(jnp.int32, block_k)
            col = (t >= jnp.maximum(first, j * block_k)) & (t < length)
            valid = col[None, :] & (t[None, :] <= row_last[:, None])
            s = jnp.where(valid, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
            vb = jnp.where(col[:, None], vb, jnp.zeros_like(vb))   # dead slots may hold NaN
        else:
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + p.sum(axis=1)
        o = alpha[:, None] * o + plgpu.dot(p.astype(vb.dtype), vb, precision=precision)
        return o, m_new, l

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    o, _, l = lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)
    o_ref[...] = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and not x & (x - 1)


def default_config(dtype, head_dim: int) -> dict:
    """Tile defaults. bf16/fp16: 128 queries x 64 keys, 8 warps for head_dim >= 128 (4 below),
    3 stages: the Triton FA2 Hopper configuration (K+V tiles of 3 stages + the Q tile take 128 KB
    of shared memory at head_dim 128; a [128, 128] float32 accumulator over 8 warps is 64
    registers a thread). head_dim 256 halves the query tile and keeps 2 stages (160 KB).
    float32 operands are twice as wide: 64 x 32 (32 x 32 at head_dim 256), 4 warps, 2 stages."""
    if jnp.dtype(dtype) == jnp.float32:
        return dict(block_q=64 if head_dim < 256 else 32, block_k=32, num_warps=4, num_stages=2)
    if head_dim >= 256:
        return dict(block_q=64, block_k=64, num_warps=8, num_stages=2)
    return dict(block_q=128, block_k=64, num_warps=8 if head_dim >= 128 else 4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def flash_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                  lengths: jax.Array, *, scale: float | None = None, block_q: int | None = None,
                  block_k: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal chunked-prefill attention; same contract as `reference.flash_prefill`.

    block_q / block_k: query rows / key slots per tile (powers of two >= 16; None: see
    `default_config`). block_q is lowered to the chunk length rounded up to a power of two
    (>= 16); a chunk that is not a multiple of block_q is padded (a copy of q only). Any capacity
    works without copying the cache: the last partial key block is read shifted back in bounds
    and masked (a cache smaller than 16 slots is padded)."""
    g = reference.check_prefill(q, keys, values, starts, lengths)
    b, hkv, cap, d = keys.shape
    t_len = q.shape[2]
    if not _pow2_at_least_16(d):
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if keys.dtype != values.dtype or keys.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"keys, values must share a float dtype (bf16/fp16/fp32), got "
                         f"{keys.dtype}, {values.dtype}")
    cfg = default_config(keys.dtype, d)
    block_q = cfg["block_q"] if block_q is None else block_q
    block_k = cfg["block_k"] if block_k is None else block_k
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    for name, x in (("block_q", block_q), ("block_k", block_k)):
        if not _pow2_at_least_16(x):
            raise ValueError(f"{name} must be a power of two >= 16, got {x}")
    scale = d ** -0.5 if scale is None else scale
    if t_len == 0:
        return jnp.zeros(q.shape, q.dtype)
    if cap < 16:  # a tiny cache: pad to one 16-slot block (copies at most 15 slots per head)
        pad = ((0, 0), (0, 0), (0, 16 - cap), (0, 0))
        keys, values, cap = jnp.pad(keys, pad), jnp.pad(values, pad), 16
    block_k = min(block_k, 1 << (cap.bit_length() - 1))         # <= cap: every read in bounds
    block_q = min(block_q, common.next_pow2(max(t_len, 16)))
    n_qb = pl.cdiv(t_len, block_q)
    qp = q.astype(keys.dtype)
    if n_qb * block_q != t_len:
        qp = jnp.pad(qp, ((0, 0), (0, 0), (0, n_qb * block_q - t_len), (0, 0)))
    rng = jnp.stack([jnp.clip(starts, 0, cap), jnp.clip(lengths, 0, cap)], -1).astype(jnp.int32)
    prec = (lax.Precision.HIGHEST, lax.Precision.HIGHEST) if keys.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, t_len=t_len, n_qblocks=n_qb, block_k=block_k, cap=cap,
                               qk_scale=scale * math.log2(math.e), precision=prec)
    hq = hkv * g
    q_map = lambda h, i, j: (i, h, n_qb - 1 - j, 0)
    out = pl.pallas_call(
        kernel,
        grid=(hq, b, n_qb),   # x: query heads (adjacent heads share a kv head), z: query blocks
        in_specs=[
            pl.BlockSpec((None, None, block_q, d), q_map),
            pl.BlockSpec((None, None, cap, d), lambda h, i, j: (i, h // g, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda h, i, j: (i, h // g, 0, 0)),
            pl.BlockSpec((None, None, 2), lambda h, i, j: (i, h // g, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_flash_prefill",
    )(qp, keys, values, rng)
    return out[:, :, :t_len] if n_qb * block_q != t_len else out
