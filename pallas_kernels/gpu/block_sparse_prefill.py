"""Block-sparse causal flash-attention prefill over a dense KV cache (Pallas-Triton, GPU).

The dense flash prefill (`gpu.flash_prefill`, FlashAttention-2 forward) with the key walk
restricted to listed key blocks: the kernel of FlexPrefill (Lai et al., ICLR'25,
`triton_block_wise_prefill_attention`), MInference's block-sparse pass and streaming heads.
Contract: `pallas_kernels.reference.block_sparse_prefill`.

One program per (kv head, batch, query tile). GQA: the g query heads of a kv head share its
block list, so they share one tile: the [gp, tile_q, head_dim] query block (gp = g rounded up
to a power of two; the wrapper pads the query heads only when g is not one) is reshaped to
gp * tile_q rows (default 128: tile_q = 128 / gp tokens, >= 16), and every K/V block loaded
from the list feeds one [rows, block] dot for all heads. The row's list is normalised by the
wrapper (`block_lists`: sorted, duplicate-free) with four loop positions per tile, so the walk
is three loops like the dense kernel's: blocks cut by `starts` (masked), blocks every row sees
whole (no mask arithmetic), diagonal blocks (masked, causal element-wise: the query offset
lengths - T need not be block-aligned). Online softmax in base 2, float32 running max /
denominator / accumulator; bf16/fp16 inputs use tensor-core dots with float32 accumulation,
float32 inputs IEEE fp32 dots. Query tiles run latest first (longest lists first).
Vertical form (optional column lists, MInference's vertical lines): after the blocks, the row's
remaining columns are walked `column_block` at a time, the K/V rows gathered by slot (a Triton
gather load from the head's cache) and masked causally element-wise.

Shapes: q [batch, q_heads, T, head_dim]; keys, values [batch, kv_heads, S, head_dim];
starts, lengths [batch, kv_heads]; block_indices [batch, kv_heads, ceil(T / block_size), m];
block_counts [batch, kv_heads, ceil(T / block_size)] -> out [batch, q_heads, T, head_dim].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_lists, reference
from pallas_kernels.gpu import common

NEG_INF = common.NEG_INF


def _kernel(q_ref, k_ref, v_ref, idx_ref, lim_ref, rng_ref, *refs, t_len: int, n_tiles: int,
            bs: int, cap: int, qk_scale: float, precision, col_block: int):
    col_ref, ncol_ref, o_ref = refs if col_block else (None, None, refs[0])
    ti = n_tiles - 1 - pl.program_id(2)
    first = rng_ref[0]
    length = rng_ref[1]
    gp, tq, d = q_ref.shape
    rows = gp * tq
    q = q_ref[...].reshape(rows, d)
    tok = ti * tq + lax.rem(lax.iota(jnp.int32, rows), tq)          # row r = (head r // tq, token)
    row_last = jnp.minimum(length - t_len + tok, length - 1)       # padding rows: capped, dropped

    def step(p, carry, masked: bool):
        o, m, l = carry
        j = idx_ref[p]
        if masked:   # a partial last block (cap % bs) is read shifted back in bounds and masked
            start = jnp.minimum(j * bs, cap - bs)
        else:
            start = pl.multiple_of(j * bs, bs)
        kb = k_ref[pl.ds(start, bs), :]
        vb = v_ref[pl.ds(start, bs), :]
        s = plgpu.dot(q, kb, trans_b=True, precision=precision) * qk_scale
        if masked:
            t = start + lax.iota(jnp.int32, bs)
            col = (t >= jnp.maximum(first, j * bs)) & (t < length)
            valid = col[None, :] & (t[None, :] <= row_last[:, None])
            s = jnp.where(valid, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1))
            pr = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
            vb = jnp.where(col[:, None], vb, jnp.zeros_like(vb))   # dead slots may hold NaN
        else:
            m_new = jnp.maximum(m, s.max(axis=1))
            pr = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + pr.sum(axis=1)
        o = alpha[:, None] * o + plgpu.dot(pr.astype(vb.dtype), vb, precision=precision)
        return o, m_new, l

    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    p0, p1, p2, p3 = lim_ref[0], lim_ref[1], lim_ref[2], lim_ref[3]
    carry = lax.fori_loop(p0, p1, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(p1, p2, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(p2, p3, functools.partial(step, masked=True), carry)

    def column_step(c, carry):
        """col_block gathered key columns (sorted, sentinel cap past the row's count)."""
        o, m, l = carry
        cols = col_ref[pl.ds(c * col_block, col_block)]
        at = jnp.minimum(cols, cap - 1)
        kb = k_ref[at, :]
        vb = v_ref[at, :]
        s = plgpu.dot(q, kb, trans_b=True, precision=precision) * qk_scale
        col = cols < length                                        # normalised: >= starts, unlisted
        valid = col[None, :] & (cols[None, :] <= row_last[:, None])
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        pr = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
        vb = jnp.where(col[:, None], vb, jnp.zeros_like(vb))
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + pr.sum(axis=1)
        o = alpha[:, None] * o + plgpu.dot(pr.astype(vb.dtype), vb, precision=precision)
        return o, m_new, l

    if col_block:
        carry = lax.fori_loop(0, pl.cdiv(ncol_ref[0], col_block), column_step, carry)
    o, _, l = carry
    o = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = o.reshape(gp, tq, d).astype(o_ref.dtype)


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and not x & (x - 1)


def default_config(dtype, head_dim: int, block_size: int) -> dict:
    """128 rows per tile (all query heads of a kv head x 128 / gp tokens); 8 warps at head_dim
    >= 128 (4 below); 2 stages for 128-key blocks at head_dim >= 128 (K+V+Q tiles: 96 KB a
    stage), else 3. float32 (interpret / tests): 64 rows, 4 warps, 2 stages."""
    if jnp.dtype(dtype) == jnp.float32:
        return dict(block_rows=64, num_warps=4, num_stages=2)
    stages = 2 if block_size * head_dim >= 128 * 128 else 3
    return dict(block_rows=128, num_warps=8 if head_dim >= 128 else 4, num_stages=stages)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_rows", "num_warps",
                                             "num_stages", "column_block", "interpret"))
def block_sparse_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                         lengths: jax.Array, block_indices: jax.Array, block_counts: jax.Array, *,
                         block_size: int, scale: float | None = None,
                         column_indices: jax.Array | None = None, column_counts: jax.Array | None = None,
                         block_rows: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, column_block: int = 64,
                         interpret: bool = False) -> jax.Array:
    """Block-sparse causal chunked prefill; same contract as `reference.block_sparse_prefill`.

    block_size: tokens per query block and per key block (power of two >= 16).
    column_indices / column_counts: the vertical (column-gather) form; the row's columns not
    inside a listed block are walked after its blocks, `column_block` (power of two >= 16) at a
    time, each K/V row gathered by its slot (`block_lists.normalize_columns`).
    block_rows: query rows per program (query heads x tokens; default `default_config`); the
    token count per tile is block_rows / gp, clamped to [16, block_size]. The cache is never
    copied when S >= block_size (a partial last block is read shifted back in bounds)."""
    g = reference.check_block_sparse(q, keys, values, starts, lengths, block_indices, block_counts,
                                     block_size, column_indices, column_counts)
    b, hkv, cap, d = keys.shape
    t_len = q.shape[2]
    if column_indices is not None and not _pow2_at_least_16(column_block):
        raise ValueError(f"column_block must be a power of two >= 16 for the GPU kernel, got {column_block}")
    if not _pow2_at_least_16(d):
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if not _pow2_at_least_16(block_size):
        raise ValueError(f"block_size must be a power of two >= 16 for the GPU kernel, got {block_size}")
    if keys.dtype != values.dtype or keys.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"keys, values must share a float dtype (bf16/fp16/fp32), got "
                         f"{keys.dtype}, {values.dtype}")
    cfg = default_config(keys.dtype, d, block_size)
    block_rows = cfg["block_rows"] if block_rows is None else block_rows
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    scale = d ** -0.5 if scale is None else scale
    if t_len == 0:
        return jnp.zeros(q.shape, q.dtype)
    if cap < block_size:  # a cache smaller than one block: pad (copies < block_size slots a head)
        pad = ((0, 0), (0, 0), (0, block_size - cap), (0, 0))
        keys, values, cap = jnp.pad(keys, pad), jnp.pad(values, pad), block_size
    nkb = pl.cdiv(cap, block_size)
    gp = common.next_pow2(g)
    tq = min(block_size, max(16, block_rows // gp))
    n_qb = pl.cdiv(t_len, block_size)
    n_tiles = n_qb * (block_size // tq)
    width = common.next_pow2(max(block_indices.shape[-1], 1))
    first = jnp.clip(starts, 0, cap).astype(jnp.int32)
    length = jnp.clip(lengths, 0, cap).astype(jnp.int32)
    idx = block_lists.normalize(block_indices, block_counts, nkb, width)
    lims = block_lists.loop_bounds(idx, first, length, t_len, block_size, tq)
    qp = q.astype(keys.dtype).reshape(b, hkv, g, t_len, d)
    t_pad = n_qb * block_size
    if gp != g or t_pad != t_len:
        qp = jnp.pad(qp, ((0, 0), (0, 0), (0, gp - g), (0, t_pad - t_len), (0, 0)))
    qp = qp.reshape(b, hkv * gp, t_pad, d)
    rng = jnp.stack([first, length], -1)
    prec = (lax.Precision.HIGHEST, lax.Precision.HIGHEST) if keys.dtype == jnp.float32 else None
    per = block_size // tq
    extra_specs, extra = [], ()
    if column_indices is not None:
        cb = column_block
        width_c = -(-max(column_indices.shape[-1], 1) // cb) * cb
        cols = block_lists.normalize_columns(column_indices, column_counts, idx, first, length, block_size,
                                             cap, width_c)
        extra = (cols, block_lists.column_bounds(cols, length, t_len, block_size, tq))
        extra_specs = [pl.BlockSpec((None, None, None, width_c), lambda h, i, j: (i, h, (n_tiles - 1 - j) // per, 0)),
                       pl.BlockSpec((None, None, 1), lambda h, i, j: (i, h, n_tiles - 1 - j))]
    kernel = functools.partial(_kernel, t_len=t_len, n_tiles=n_tiles, bs=block_size, cap=cap,
                               qk_scale=scale * math.log2(math.e), precision=prec,
                               col_block=column_block if column_indices is not None else 0)
    q_map = lambda h, i, j: (i, h, n_tiles - 1 - j, 0)
    out = pl.pallas_call(
        kernel,
        grid=(hkv, b, n_tiles),
        in_specs=[
            pl.BlockSpec((None, gp, tq, d), q_map),
            pl.BlockSpec((None, None, cap, d), lambda h, i, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda h, i, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, None, width), lambda h, i, j: (i, h, (n_tiles - 1 - j) // per, 0)),
            pl.BlockSpec((None, None, None, 4), lambda h, i, j: (i, h, n_tiles - 1 - j, 0)),
            pl.BlockSpec((None, None, 2), lambda h, i, j: (i, h, 0)),
            *extra_specs,
        ],
        out_specs=pl.BlockSpec((None, gp, tq, d), q_map),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_block_sparse_prefill",
    )(qp, keys, values, idx, lims, rng, *extra)
    out = out.reshape(b, hkv, gp, t_pad, d)[:, :, :g, :t_len]
    return out.reshape(b, hkv * g, t_len, d)
