"""NSA selected-block attention forward in FSA's block-outer order (Pallas-Mosaic, TPU).

The TPU twin of `pallas_kernels.gpu.nsa_select_fsa` (same worklist, partials and online merge,
shared from there): one program per (batch, kv head, chunk of `block_q` tokens that selected one
key block). The chunk's block id is scalar-prefetched into SMEM and picks the K/V block in the
BlockSpec index map, so Pallas pipelines the next chunk's K/V DMA behind this one's compute; the
g heads each run a [block_q, block] float32 dot (natural exp; the partial's max is handed to the
merge in base 2). Validated in TPU interpret mode on CPU (no TPU run yet).

Same contract as `pallas_kernels.tpu.nsa_select.nsa_select` (block_size and block_q multiples
of 8; return_lse gives the natural log-sum-exp, as there).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gpu.nsa_select import check_select
from pallas_kernels.gpu.nsa_select_fsa import merge_chunks, pad_keys, worklists
from pallas_kernels.tpu.common import interpret_params
from pallas_kernels.tpu.nsa_select_bwd import check_tpu_blocks

NEG_INF = -1e30
LOG2E = math.log2(math.e)


def _kernel(blk_ref, win_ref, tok_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block: int, groups: int):
    j = blk_ref[pl.program_id(0), pl.program_id(1), pl.program_id(2)]
    window = win_ref[0]
    kpos = jnp.maximum(j, 0) * block + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    tok = tok_ref[...]                                                             # [block_q, 1] positions
    mask = (kpos <= tok) & (tok >= 0) & (j >= 0)
    mask = mask & ((window == 0) | (kpos > tok - window))
    kb, vb = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    for gg in range(groups):
        s = lax.dot_general(q_ref[gg].astype(jnp.float32), kb, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
        s = jnp.where(mask, s, NEG_INF)
        m = s.max(axis=1, keepdims=True)
        p = jnp.where(mask, jnp.exp(s - m), 0.0)
        o_ref[gg] = jnp.dot(p, vb, preferred_element_type=jnp.float32)
        m_ref[gg] = m * LOG2E
        l_ref[gg] = p.sum(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_q", "interpret", "return_lse"))
def nsa_select_block_outer(q, k, v, indices, counts, *, block_size: int = 64, scale: float | None = None,
                           block_q: int = 64, interpret=False, return_lse: bool = False, window: int = 0):
    """Selected-block attention forward, block-outer (FSA). return_lse: also the natural
    log-sum-exp [batch, q_heads, seq] float32; window > 0: the sliding-window bound (runtime scalar)."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    check_tpu_blocks(block_size, block_q)
    scale = d ** -0.5 if scale is None else scale
    k, v = pad_keys(k, block_size), pad_keys(v, block_size)
    chunk_block, chunk_tok, pos, q_tiles = worklists(q, indices, counts, k.shape[2] // block_size, block_q, scale,
                                                     q.dtype)
    c = chunk_block.shape[-1]
    chunk = lambda *blk: pl.BlockSpec((None, None, None) + blk, lambda i, h, s, *_: (i, h, s) + (0,) * len(blk))
    key_block = pl.BlockSpec((None, None, block_size, d), lambda i, h, s, blk, _: (i, h, jnp.maximum(blk[i, h, s], 0), 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, c),
        in_specs=[chunk(block_q, 1), chunk(g, block_q, d), key_block, key_block],
        out_specs=[chunk(g, block_q, d), chunk(g, block_q, 1), chunk(g, block_q, 1)],
    )
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block=block_size, groups=g),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, c, g, block_q, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, c, g, block_q, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, c, g, block_q, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="kvjax_nsa_select_block_outer_tpu",
    )(chunk_block, jnp.asarray(window, jnp.int32).reshape(1), chunk_tok[..., None], q_tiles, k, v)
    out, lse2 = merge_chunks(o, m[..., 0], l[..., 0], pos)
    return (out.astype(q.dtype), lse2 / LOG2E) if return_lse else out.astype(q.dtype)
