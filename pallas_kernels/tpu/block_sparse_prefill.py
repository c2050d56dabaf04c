"""Block-sparse causal flash-attention prefill over a dense KV cache, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.block_sparse_prefill`; the structure of
`tpu.flash_prefill` (FlashAttention-2 tiling, Dao arXiv 2307.08691) with the key walk driven by
a block list, in the spirit of splash attention's block tables.

Grid (batch, kv heads, query tiles). The g query heads of a kv head share one tile of g * tile_q
rows ([g, tile_q, head_dim] reshaped; tile_q a multiple of 8 dividing block_size), so every K/V
block DMA'd feeds one MXU dot for all heads. starts/lengths and the four loop positions per tile
(`block_lists.loop_bounds`) are scalar-prefetched into SMEM; the tile's sorted block list comes
in as an SMEM block of its BlockSpec (an aligned [8, width] block holding the row, width a
multiple of 128, so the lists need not fit in SMEM whole at long contexts). K and V stay in HBM (`pl.ANY`); the listed blocks are copied by manual
DMA into a two-slot VMEM buffer, the next listed block in flight while one is consumed. The walk
is the dense kernel's three loops over list positions: cut by starts (masked), seen whole
(unmasked), diagonal (masked element-wise, so a query offset need not be block-aligned). A
partial last block (capacity not a multiple of block_size) is copied shifted back in bounds and
masked. Dots take the cache dtype with float32 accumulation; the online softmax is float32.

block_size: a multiple of 8; lane-dense (fast) at multiples of 128.

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

from pallas_kernels import block_lists, reference
from pallas_kernels.tpu import common

NEG_INF = reference.NEG_INF
_NT = (((1,), (1,)), ((), ()))   # x [m, k] . y [n, k] -> [m, n]


def _kernel(rng_ref, lim_ref, *refs, t_len: int, bs: int, cap: int, scale: float, kv_heads: int,
            n_qb: int, per: int, col_block: int):
    if col_block:
        ncol_ref, q_ref, list_ref, k_hbm, v_hbm, col_list_ref, o_ref, kbuf, vbuf, sem, kcol, vcol, csem = refs
    else:
        q_ref, list_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem = refs
    bi, h, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = lax.rem((bi * kv_heads + h) * n_qb + lax.div(ti, per), 8)   # this row in the [8, width] block
    idx_ref = list_ref.at[r]
    first = rng_ref[bi, h, 0]
    length = rng_ref[bi, h, 1]
    p0, p1, p2, p3 = (lim_ref[bi, h, ti, c] for c in range(4))
    g, tq, d = q_ref.shape
    rows = g * tq
    q = q_ref[...].reshape(rows, d)
    tok = ti * tq + lax.rem(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), tq)
    row_last = jnp.minimum(length - t_len + tok, length - 1)

    def block_start(p):
        return jnp.minimum(idx_ref[p] * bs, cap - bs)

    def copies(p, slot):
        start = block_start(p)
        return (pltpu.make_async_copy(k_hbm.at[bi, h, pl.ds(start, bs)], kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[bi, h, pl.ds(start, bs)], vbuf.at[slot], sem.at[1, slot]))

    @pl.when(p0 < p3)
    def _():
        for c in copies(p0, 0):
            c.start()

    def step(p, carry, masked: bool):
        o, m, l = carry
        slot = lax.rem(p - p0, 2)
        common.advance_double_buffer(copies, p, p3, slot)
        kb = kbuf[slot]
        vb = vbuf[slot]
        s = lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            start = block_start(p)
            lo = jnp.maximum(first, idx_ref[p] * bs)
            t = start + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
            valid = (t >= lo) & (t < length) & (t <= row_last)
            s = jnp.where(valid, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            pr = jnp.where(valid, jnp.exp(s - m_new), 0.0)
            tc = start + lax.broadcasted_iota(jnp.int32, (bs, 1), 0)
            live = (tc >= lo) & (tc < length)                     # dead slots may hold NaN
            vb = jnp.where(live, vb.astype(jnp.float32), 0.0).astype(vb.dtype)
        else:
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            pr = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + pr.sum(axis=1, keepdims=True)
        o = alpha * o + jnp.dot(pr.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return o, m_new, l

    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), NEG_INF, jnp.float32),
             jnp.zeros((rows, 1), jnp.float32))
    carry = lax.fori_loop(p0, p1, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(p1, p2, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(p2, p3, functools.partial(step, masked=True), carry)

    def column_step(c, carry):
        """col_block key columns gathered by one-row DMAs into VMEM (sorted; sentinel cap past
        the row's count: a clamped row is copied and masked)."""
        o, m, l = carry
        cols = col_list_ref.at[r]

        def row_copies(e):
            at = jnp.minimum(cols[c * col_block + e], cap - 1)
            return (pltpu.make_async_copy(k_hbm.at[bi, h, pl.ds(at, 1)], kcol.at[pl.ds(e, 1)], csem.at[0]),
                    pltpu.make_async_copy(v_hbm.at[bi, h, pl.ds(at, 1)], vcol.at[pl.ds(e, 1)], csem.at[1]))

        def start(e, x):
            for cp in row_copies(e):
                cp.start()
            return x

        def wait(e, x):
            for cp in row_copies(e):
                cp.wait()
            return x

        lax.fori_loop(0, col_block, start, 0)
        lax.fori_loop(0, col_block, wait, 0)
        e = lax.broadcasted_iota(jnp.int32, (1, col_block), 1)
        slot_row = jnp.full((1, col_block), cap, jnp.int32)
        slot_col = jnp.full((col_block, 1), cap, jnp.int32)
        ec = lax.broadcasted_iota(jnp.int32, (col_block, 1), 0)
        for x in range(col_block):                                 # the chunk's slots as vectors
            sl = cols[c * col_block + x]
            slot_row = jnp.where(e == x, sl, slot_row)
            slot_col = jnp.where(ec == x, sl, slot_col)
        s = lax.dot_general(q, kcol[...], _NT, preferred_element_type=jnp.float32) * scale
        valid = (slot_row < length) & (slot_row <= row_last)       # normalised: >= starts, unlisted
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        pr = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        vb = jnp.where(slot_col < length, vcol[...].astype(jnp.float32), 0.0).astype(vcol.dtype)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + pr.sum(axis=1, keepdims=True)
        o = alpha * o + jnp.dot(pr.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return o, m_new, l

    if col_block:
        n_col = ncol_ref[bi, h, ti]
        carry = lax.fori_loop(0, lax.div(n_col + col_block - 1, col_block), column_step, carry)
    o, _, l = carry
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = o.reshape(g, tq, d).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_rows", "column_block", "interpret"))
def block_sparse_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                         lengths: jax.Array, block_indices: jax.Array, block_counts: jax.Array, *,
                         block_size: int, scale: float | None = None,
                         column_indices: jax.Array | None = None, column_counts: jax.Array | None = None,
                         block_rows: int = 256, column_block: int = 128, interpret=False) -> jax.Array:
    """Block-sparse causal chunked prefill; same contract as `reference.block_sparse_prefill`.

    column_indices / column_counts: the vertical (column-gather) form: the row's columns not in
    a listed block (`block_lists.normalize_columns`) come as an SMEM block like the block list;
    `column_block` (a multiple of 8 dividing 128) of them at a time are gathered by one-row DMAs
    from HBM into VMEM and attended after the blocks.

    block_size: a multiple of 8 (query and key block). block_rows: query rows per program
    (g heads x tile_q tokens; tile_q = the largest multiple of 8 dividing block_size with
    g * tile_q <= max(block_rows, 8 g)). interpret: False, True or a `pltpu.InterpretParams`."""
    g = reference.check_block_sparse(q, keys, values, starts, lengths, block_indices, block_counts,
                                     block_size, column_indices, column_counts)
    b, hkv, cap, d = keys.shape
    t_len = q.shape[2]
    if column_indices is not None and (column_block % 8 or 128 % column_block):
        raise ValueError(f"column_block must be a multiple of 8 dividing 128 for the TPU kernel, got {column_block}")
    if block_size % 8:
        raise ValueError(f"block_size must be a multiple of 8 for the TPU kernel, got {block_size}")
    if keys.dtype != values.dtype or keys.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"keys, values must share a dtype bf16 or fp32, got {keys.dtype}, {values.dtype}")
    scale = d ** -0.5 if scale is None else scale
    if t_len == 0:
        return jnp.zeros(q.shape, q.dtype)
    if cap < block_size:
        pad = ((0, 0), (0, 0), (0, block_size - cap), (0, 0))
        keys, values, cap = jnp.pad(keys, pad), jnp.pad(values, pad), block_size
    nkb = -(-cap // block_size)
    tq = max(x for x in range(8, block_size + 1, 8)
             if block_size % x == 0 and (x == 8 or g * x <= block_rows))
    n_qb = -(-t_len // block_size)
    n_tiles = n_qb * (block_size // tq)
    width = block_indices.shape[-1]
    first = jnp.clip(starts, 0, cap).astype(jnp.int32)
    length = jnp.clip(lengths, 0, cap).astype(jnp.int32)
    width = -(-max(width, 1) // 128) * 128     # lanes of the SMEM list block
    idx = block_lists.normalize(block_indices, block_counts, nkb, width)
    lims = block_lists.loop_bounds(idx, first, length, t_len, block_size, tq)
    t_pad = n_qb * block_size
    qp = q.astype(keys.dtype)
    if t_pad != t_len:
        qp = jnp.pad(qp, ((0, 0), (0, 0), (0, t_pad - t_len), (0, 0)))
    per = block_size // tq
    q_spec = pl.BlockSpec((None, g, tq, d), lambda i, h, j, *_: (i, h, j, 0))
    # rows (batch, kv head, query block) flattened and padded to a multiple of 8: a program gets
    # the aligned [8, width] SMEM block holding its row (Mosaic's (8, 128) block rule)
    n_rows = b * hkv * n_qb
    flat = jnp.pad(idx.reshape(n_rows, width), ((0, -n_rows % 8), (0, 0)), constant_values=nkb)
    row_of = lambda i, h, j: (i * hkv + h) * n_qb + lax.div(j, per)   # lax.div: no sign op
    idx_spec = pl.BlockSpec((8, width), lambda i, h, j, *_: (lax.div(row_of(i, h, j), 8), 0),
                            memory_space=pltpu.SMEM)
    in_specs = [q_spec, idx_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
    scratch = [pltpu.VMEM((2, block_size, d), keys.dtype), pltpu.VMEM((2, block_size, d), values.dtype),
               pltpu.SemaphoreType.DMA((2, 2))]
    prefetch, operands = [jnp.stack([first, length], -1), lims], [qp, flat, keys, values]
    if column_indices is not None:
        width_c = -(-max(column_indices.shape[-1], 1) // 128) * 128
        cols = block_lists.normalize_columns(column_indices, column_counts, idx, first, length, block_size,
                                             cap, width_c)
        prefetch.append(block_lists.column_bounds(cols, length, t_len, block_size, tq))
        operands.append(jnp.pad(cols.reshape(n_rows, width_c), ((0, -n_rows % 8), (0, 0)), constant_values=cap))
        in_specs.append(pl.BlockSpec((8, width_c), lambda i, h, j, *_: (lax.div(row_of(i, h, j), 8), 0),
                                     memory_space=pltpu.SMEM))
        scratch += [pltpu.VMEM((column_block, d), keys.dtype), pltpu.VMEM((column_block, d), values.dtype),
                    pltpu.SemaphoreType.DMA((2,))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, hkv, n_tiles),
        in_specs=in_specs,
        out_specs=q_spec,
        scratch_shapes=scratch,
    )
    out = pl.pallas_call(
        functools.partial(_kernel, t_len=t_len, bs=block_size, cap=cap, scale=scale, kv_heads=hkv,
                          n_qb=n_qb, per=per, col_block=column_block if column_indices is not None else 0),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=common.interpret_params(interpret),
        name="kvjax_block_sparse_prefill_tpu",
    )(*prefetch, *operands)
    return out[:, :, :t_len] if t_pad != t_len else out
