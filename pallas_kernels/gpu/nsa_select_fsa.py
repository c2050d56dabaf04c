"""NSA selected-block attention forward in FSA's block-outer order (Pallas-Triton, GPU).

For small GQA groups (g < 8) NSA's token-outer kernel (`nsa_select`) pads the g query heads of a
token to a 16-row dot, wasting 1 - g/16 of every MMA, and reloads each K/V block once per token
that selected it. FSA (Relaxed-System-Lab/Flash-Sparse-Attention, spec §6) inverts the loop:

1. worklist (XLA, `block_worklist`): the (token, slot) pairs of every live selection, sorted by
   key block; each block's token list is padded to a multiple of `block_q` and cut into chunks of
   `block_q` tokens, one per program (static bound: ceil(T*n / block_q) + n_blocks chunks).
   The chunk's query rows are gathered into a contiguous [g, block_q, D] tile.
2. kernel: one program per (batch, kv head, chunk) loads its key block's K/V once and, for each of
   the g heads, runs a full [block_q, block] dot (M = block_q tokens, not g), the causal (and
   window) mask, and writes the block's unnormalised partial output with its base-2 row max m and
   sum l. No atomics: every (token, slot) partial has its own row.
3. reduction (`merge_partials`): per token, an online merge over its n selected blocks (running
   max, rescaled sum and output, slot by slot) -> the output and the base-2 log-sum-exp.

Same contract as `pallas_kernels.gpu.nsa_select.nsa_select` (and its reference
`models.nsa.selected_attention`): q [batch, q_heads, seq, D] (RoPE'd, positions 0..seq-1); k, v
[batch, kv_heads, seq, D]; indices [batch, kv_heads, seq, n] int32 (distinct per token; entries
past `counts` and -1 ignored); counts [batch, kv_heads, seq] -> out [batch, q_heads, seq, D].
Costs (as FSA's): partial buffers of n x the output (float32), the worklist sort, and the gathered
query tile copy (n x q; for g = 4 and 64-token blocks far less than the n x K/V block reloads
of the token-outer order).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common
from pallas_kernels.gpu.nsa_select import check_select


def n_chunks(seq: int, n: int, n_blocks: int, block_q: int) -> int:
    """Static bound on the chunks of `block_worklist`: sum_j ceil(c_j / block_q) <= T*n/block_q + n_blocks."""
    return -(-seq * n // block_q) + n_blocks


def block_worklist(indices, counts, n_blocks: int, block_q: int):
    """Invert the per-token selections of one (batch, kv head) into per-block token chunks.

    indices [seq, n], counts [seq] -> (chunk_block [C] int32 (-1: an empty chunk), chunk_tok
    [C, block_q] int32 (-1: padding), pos [seq, n] int32: the row of the pair (token, slot) in
    the chunks flattened to [C * block_q] (-1: a dead slot)). C = `n_chunks`."""
    t, n = indices.shape
    c = n_chunks(t, n, n_blocks, block_q)
    live = (jnp.arange(n) < counts[:, None]) & (indices >= 0) & (indices < n_blocks)
    blk = jnp.where(live, indices, n_blocks).reshape(-1)                            # [P]; n_blocks = dead
    order = jnp.argsort(blk, stable=True)
    blk_s = blk[order]
    per = jnp.zeros((n_blocks + 1,), jnp.int32).at[blk].add(1)[:n_blocks]           # pairs per block
    padded = -(-per // block_q) * block_q
    start = jnp.cumsum(per) - per                                                   # in the sorted pairs
    offset = jnp.cumsum(padded) - padded                                            # in the padded chunks
    live_s = blk_s < n_blocks
    j = jnp.minimum(blk_s, n_blocks - 1)
    row = jnp.where(live_s, offset[j] + jnp.arange(t * n) - start[j], c * block_q)  # out of range: dropped
    chunk_tok = jnp.full((c * block_q,), -1, jnp.int32).at[row].set((order // n).astype(jnp.int32), mode="drop")
    pos = jnp.full((t * n,), -1, jnp.int32).at[order].set(jnp.where(live_s, row, -1)).reshape(t, n)
    ends = jnp.cumsum(padded)
    chunk_block = jnp.searchsorted(ends, jnp.arange(c) * block_q, side="right").astype(jnp.int32)
    chunk_block = jnp.where(chunk_block < n_blocks, chunk_block, -1)
    return chunk_block, chunk_tok.reshape(c, block_q), pos


def merge_partials(o, m, l):
    """Online reduction over a token's selected blocks: o [..., n, D], m / l [..., n] (base-2 row
    max and sum of each block's unnormalised partial; l = 0 for an empty slot) -> (out [..., D],
    lse [...]: base 2, 0 for a token without keys), folding the slots in order."""
    n = o.shape[-2]

    def fold(j, carry):
        acc, mx, sm = carry
        mj, lj, oj = m[..., j], l[..., j], o[..., j, :]
        new = jnp.maximum(mx, jnp.where(lj > 0, mj, common.NEG_INF))
        a, b = jnp.exp2(mx - new), jnp.where(lj > 0, jnp.exp2(mj - new), 0.0)
        return a[..., None] * acc + b[..., None] * oj, new, a * sm + b * lj

    init = (jnp.zeros(o.shape[:-2] + o.shape[-1:], jnp.float32), jnp.full(m.shape[:-1], common.NEG_INF, jnp.float32),
            jnp.zeros(m.shape[:-1], jnp.float32))
    acc, mx, sm = lax.fori_loop(0, n, fold, init)
    ok = sm > 0
    out = jnp.where(ok[..., None], acc / jnp.where(ok, sm, 1.0)[..., None], 0.0)
    return out, jnp.where(ok, mx + jnp.log2(jnp.where(ok, sm, 1.0)), 0.0)


def pad_keys(x, block_size: int):
    """[b, h, t, D] -> [b, h, ceil(t / block_size) * block_size, D] (zero rows after the sequence)."""
    extra = -x.shape[2] % block_size
    return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else x


def worklists(q, indices, counts, n_blocks: int, block_q: int, q_scale: float, dtype):
    """The block-outer work of all (batch, kv head)s: (chunk_block [b, hkv, C], chunk_tok [b, hkv,
    C, block_q], pos [b, hkv, t, n] (`block_worklist`), q_tiles [b, hkv, C, g, block_q, D]: the
    chunks' query rows * q_scale in `dtype`)."""
    b, hkv, t, n = indices.shape
    g, d = q.shape[1] // hkv, q.shape[3]
    cnt = jnp.clip(counts.astype(jnp.int32), 0, n)
    work = jax.vmap(jax.vmap(lambda i, c: block_worklist(i, c, n_blocks, block_q)))
    chunk_block, chunk_tok, pos = work(indices.astype(jnp.int32), cnt)
    c = chunk_block.shape[-1]
    qg = (q.reshape(b, hkv, g, t, d).astype(jnp.float32) * q_scale).astype(dtype)
    rows = jnp.maximum(chunk_tok, 0).reshape(b, hkv, 1, c * block_q, 1)
    q_tiles = jnp.take_along_axis(qg, rows, axis=3).reshape(b, hkv, g, c, block_q, d).transpose(0, 1, 3, 2, 4, 5)
    return chunk_block, chunk_tok, pos, q_tiles


def merge_chunks(o, m, l, pos):
    """The kernels' chunk partials o [b, hkv, C, g, block_q, D], m / l [b, hkv, C, g, block_q]
    (base 2) -> every token's slots (pos [b, hkv, t, n]; a dead slot counts l = 0), merged:
    (out [b, hkv * g, t, D] float32, lse [b, hkv * g, t] base 2)."""
    b, hkv, c, g, bq, d = o.shape
    t, n = pos.shape[2:]
    flat = lambda x: jnp.moveaxis(x, 3, 2).reshape((b, hkv, g, c * bq) + x.shape[5:])
    at = jnp.maximum(pos, 0).reshape(b, hkv, 1, t * n)
    dead = (pos < 0).reshape(b, hkv, 1, t, n)
    o_p = jnp.take_along_axis(flat(o), at[..., None], axis=3).reshape(b, hkv, g, t, n, d)
    m_p = jnp.take_along_axis(flat(m), at, axis=3).reshape(b, hkv, g, t, n)
    l_p = jnp.where(dead, 0.0, jnp.take_along_axis(flat(l), at, axis=3).reshape(b, hkv, g, t, n))
    out, lse = merge_partials(o_p, m_p, l_p)
    return out.reshape(b, hkv * g, t, d), lse.reshape(b, hkv * g, t)


def _kernel(meta_ref, tok_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block: int, groups: int):
    j, window = meta_ref[0], meta_ref[1]                        # key block (-1: none); window (0: none)
    start = pl.multiple_of(jnp.maximum(j, 0) * block, block)
    kb = k_ref[pl.ds(start, block), :]
    vb = v_ref[pl.ds(start, block), :]
    tok = tok_ref[...]                                                              # [block_q] positions
    kpos = start + lax.iota(jnp.int32, block)
    mask = (kpos[None, :] <= tok[:, None]) & (tok[:, None] >= 0) & (j >= 0)
    mask = mask & ((window == 0) | (kpos[None, :] > tok[:, None] - window))   # the sliding window's bound
    for gg in range(groups):                                    # g < 8 heads: each a full [block_q, block] dot
        s = jnp.where(mask, plgpu.dot(q_ref[gg], kb, trans_b=True), common.NEG_INF)
        m = s.max(axis=1)
        p = jnp.where(mask, jnp.exp2(s - m[:, None]), 0.0)
        o_ref[gg] = plgpu.dot(p.astype(vb.dtype), vb)
        m_ref[gg] = m
        l_ref[gg] = p.sum(axis=1)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_q", "num_warps", "num_stages",
                                             "interpret", "return_lse"))
def nsa_select_block_outer(q, k, v, indices, counts, *, block_size: int = 64, scale: float | None = None,
                           block_q: int = 64, num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
                           return_lse: bool = False, window: int = 0):
    """Selected-block attention forward, block-outer (FSA); the contract of `nsa_select`
    (block_size, block_q and head_dim powers of two >= 16). return_lse: also the base-2
    log-sum-exp [batch, q_heads, seq] float32; window > 0: the sliding-window branch's bound (a
    runtime scalar: the selection and window branches share one compiled kernel)."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    for name, val in (("head_dim", d), ("block_size", block_size), ("block_q", block_q)):
        if val & (val - 1) or val < 16:
            raise ValueError(f"{name} must be a power of two >= 16 for the GPU kernel, got {val}")
    scale = d ** -0.5 if scale is None else scale
    k, v = pad_keys(k, block_size), pad_keys(v, block_size)
    tp = k.shape[2]
    chunk_block, chunk_tok, pos, q_tiles = worklists(q, indices, counts, tp // block_size, block_q,
                                                     scale * common.LOG2E, k.dtype)
    c = chunk_block.shape[-1]
    chunk = lambda *blk: pl.BlockSpec((None, None, None) + blk, lambda i, h, s: (i, h, s) + (0,) * len(blk))
    full = pl.BlockSpec((None, None, tp, d), lambda i, h, s: (i, h, 0, 0))
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block=block_size, groups=g),
        grid=(b, hkv, c),
        in_specs=[chunk(2), chunk(block_q), chunk(g, block_q, d), full, full],
        out_specs=[chunk(g, block_q, d), chunk(g, block_q), chunk(g, block_q)],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, c, g, block_q, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, c, g, block_q), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, c, g, block_q), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_nsa_select_block_outer",
    )(jnp.stack([chunk_block, jnp.broadcast_to(jnp.asarray(window, jnp.int32), chunk_block.shape)], -1),
      chunk_tok, q_tiles, k, v)
    out, lse = merge_chunks(o, m, l, pos)
    return (out.astype(q.dtype), lse) if return_lse else out.astype(q.dtype)
