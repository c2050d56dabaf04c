"""NSA selected-block attention forward (Pallas-Mosaic, TPU), token-outer order.

Same contract as `pallas_kernels.gpu.nsa_select` / `models.nsa.selected_attention`. One program
per (batch, kv head, query token) holds the g query heads of the group ([g, D] in VMEM); the
token's block ids and count are scalar-prefetched into SMEM, and each selected block of
`block_size` keys/values is one DMA from HBM (`pl.ANY`) into a two-slot VMEM buffer: block j+1
is in flight while block j is consumed. Causal mask on the query's own block; float32 online
softmax. Validated in TPU interpret mode on CPU (no TPU run yet).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gpu.nsa_select import check_select
from pallas_kernels.tpu.common import advance_double_buffer, interpret_params

NEG_INF = -1e30


def _kernel(idx_ref, cnt_ref, q_ref, k_hbm, v_hbm, o_ref, *rest, block: int, with_lse: bool = False,
            window: int = 0):
    lse_ref, (kbuf, vbuf, sem) = (rest[0], rest[1:]) if with_lse else (None, rest)
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = cnt_ref[b, h, t]
    n = idx_ref.shape[3]
    n_pages = k_hbm.shape[2] // block
    q = q_ref[...].astype(jnp.float32)
    g, d = q.shape

    def copies(j, slot):
        page = jnp.clip(idx_ref[b, h, t, jnp.minimum(j, n - 1)], 0, n_pages - 1)
        src = pl.ds(page * block, block)
        return (pltpu.make_async_copy(k_hbm.at[b, h, src], kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[b, h, src], vbuf.at[slot], sem.at[1, slot]))

    @pl.when(count > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    r = lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def body(j, carry):
        o, m, l = carry
        slot = j % 2
        advance_double_buffer(copies, j, count, slot)
        page = jnp.clip(idx_ref[b, h, t, jnp.minimum(j, n - 1)], 0, n_pages - 1)
        valid = page * block + r <= t
        if window:
            valid = valid & (page * block + r > t - window)
        kb = kbuf[slot].astype(jnp.float32)
        vb = vbuf[slot].astype(jnp.float32)
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l = alpha * l + p.sum(axis=1, keepdims=True)
        o = alpha * o + jnp.dot(p, jnp.where(valid.reshape(block, 1), vb, 0.0), preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((g, d), jnp.float32), jnp.full((g, 1), NEG_INF, jnp.float32), jnp.zeros((g, 1), jnp.float32))
    o, m, l = lax.fori_loop(0, count, body, init)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
    if lse_ref is not None:     # natural log-sum-exp of the scaled logits (0 for a row without keys)
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "interpret", "return_lse", "window"))
def nsa_select(q, k, v, indices, counts, *, block_size: int = 64, scale: float | None = None,
               interpret=False, return_lse: bool = False, window: int = 0):
    """Selected-block attention forward (block_size a multiple of 8). return_lse: also the
    natural log-sum-exp of the logits * scale [batch, q_heads, seq] float32 (for the backward).
    window > 0: keys at positions <= query - window are masked too."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    if block_size % 8:
        raise ValueError(f"block_size must be a multiple of 8 for the TPU kernel, got {block_size}")
    scale = d ** -0.5 if scale is None else scale
    qg = (q.reshape(b, hkv, g, t, d).transpose(0, 1, 3, 2, 4).astype(jnp.float32) * scale).astype(q.dtype)
    tp = -(-t // block_size) * block_size
    if tp > t:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    n = indices.shape[-1]
    cnt = jnp.clip(counts.astype(jnp.int32), 0, n)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, t),
        in_specs=[
            pl.BlockSpec((None, None, None, g, d), lambda i, h, s, *_: (i, h, s, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[pl.BlockSpec((None, None, None, g, d), lambda i, h, s, *_: (i, h, s, 0, 0))]
        + ([pl.BlockSpec((None, None, None, g, 1), lambda i, h, s, *_: (i, h, s, 0, 0))] if return_lse else []),
        scratch_shapes=[pltpu.VMEM((2, block_size, d), k.dtype), pltpu.VMEM((2, block_size, d), v.dtype),
                        pltpu.SemaphoreType.DMA((2, 2))],
    )
    res = pl.pallas_call(
        functools.partial(_kernel, block=block_size, with_lse=return_lse, window=window),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, t, g, d), q.dtype)]
        + ([jax.ShapeDtypeStruct((b, hkv, t, g, 1), jnp.float32)] if return_lse else []),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="kvjax_nsa_select_tpu",
    )(indices.astype(jnp.int32), cnt, qg, k, v)
    out = res[0].transpose(0, 1, 3, 2, 4).reshape(b, hkv * g, t, d)
    if return_lse:
        return out, res[1][..., 0].transpose(0, 1, 3, 2).reshape(b, hkv * g, t)
    return out
