"""Token-sparse decode attention, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.sparse_decode` (Quest-style token selection,
Tang et al., arXiv 2406.10774). The selected slot indices and per-head counts are
scalar-prefetched into SMEM; for each block of `block_k` selected tokens the kernel issues one
row DMA per token from HBM (`pl.ANY`) into a two-slot VMEM buffer, and the next block's rows are
in flight while the current block is consumed (double buffering). Only `counts` rows are read,
so time follows the number of selected tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference

NEG_INF = reference.NEG_INF


def _kernel(idx_ref, cnt_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem, *, block_k: int):
    b = pl.program_id(0)
    h = pl.program_id(1)
    count = cnt_ref[b, h]
    nb = pl.cdiv(count, block_k)
    cap = k_hbm.shape[2]
    q = q_ref[...].astype(jnp.float32)
    g, d = q.shape

    def row_copies(j, slot, r):
        n = j * block_k + r
        src = jnp.clip(idx_ref[b, h, jnp.minimum(n, idx_ref.shape[2] - 1)], 0, cap - 1)
        return (pltpu.make_async_copy(k_hbm.at[b, h, pl.ds(src, 1)], kbuf.at[slot, pl.ds(r, 1)], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[b, h, pl.ds(src, 1)], vbuf.at[slot, pl.ds(r, 1)], sem.at[1, slot]))

    def start_block(j, slot):
        def issue(r, c):
            for cp in row_copies(j, slot, r):
                cp.start()
            return c
        lax.fori_loop(0, block_k, issue, 0)

    def wait_block(j, slot):
        def wait(r, c):
            for cp in row_copies(j, slot, r):
                cp.wait()
            return c
        lax.fori_loop(0, block_k, wait, 0)

    @pl.when(nb > 0)
    def _():
        start_block(0, 0)

    def body(j, carry):
        o, m, l = carry
        slot = j % 2

        @pl.when(j + 1 < nb)
        def _():
            start_block(j + 1, 1 - slot)

        wait_block(j, slot)
        kb = kbuf[slot].astype(jnp.float32)
        vb = vbuf[slot].astype(jnp.float32)
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        t = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        valid = t < count
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
    o, m, l = lax.fori_loop(0, nb, body, init)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "interpret"))
def sparse_decode(q, k, v, indices, counts, *, scale: float | None = None, block_k: int = 64,
                  interpret: bool = False) -> jax.Array:
    """Gathering decode attention (row DMAs); same contract as `reference.sparse_decode`."""
    g = reference.check_sparse(q, k, v, indices, counts)
    b, hkv, cap, d = k.shape
    if block_k <= 0 or block_k % 8:
        raise ValueError(f"block_k must be a positive multiple of 8, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    cnt = jnp.clip(counts, 0, indices.shape[2]).astype(jnp.int32)
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
        name="kvjax_sparse_decode_tpu",
    )(indices.astype(jnp.int32), cnt, qg, k, v)
    return out.reshape(b, hkv * g, d)
