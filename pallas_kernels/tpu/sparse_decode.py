"""Token- and page-sparse decode attention, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.sparse_decode` (Quest-style token selection,
Tang et al., arXiv 2406.10774). The selected slot indices and per-head counts are
scalar-prefetched into SMEM; for each block of `block_k` selected tokens the kernel issues one
row DMA per token from HBM (`pl.ANY`) into a two-slot VMEM buffer, and the next block's rows are
in flight while the current block is consumed (double buffering). Only `counts` rows are read,
so time follows the number of selected tokens.

Page mode (`page_size` P > 1): the scalar-prefetched indices are page indices (page i = slots
[i*P, (i+1)*P)) and each page is one contiguous DMA of `chunk = min(P, block_k)` rows:
`block_k // chunk` pages share a step's buffer when P <= block_k, a longer page takes
`cdiv(P, block_k)` steps. A page running past the capacity is copied from a window shifted back
to end at the capacity, and rows outside the page, at or past the optional per-head `lengths`,
or of unused buffer rows are masked (the mask is built from SMEM scalars, one interval per DMA).
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


def _kernel(idx_ref, meta_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sem, *, block_k: int,
            page_size: int, chunk: int, masked_tail: bool):
    b = pl.program_id(0)
    h = pl.program_id(1)
    count = meta_ref[b, h, 0]   # selected indices (tokens or pages)
    limit = meta_ref[b, h, 1]   # min(capacity, lengths)
    p = page_size
    cap = k_hbm.shape[2]
    n = idx_ref.shape[2]
    n_pages = pl.cdiv(cap, p)
    cpp = -(-p // chunk)        # DMA units per page
    pps = block_k // chunk      # DMA units per step
    units = count * cpp
    nb = pl.cdiv(units, pps)
    q = q_ref[...].astype(jnp.float32)
    g, d = q.shape

    def unit(j, i):
        """DMA source start of unit i of step j and the buffer rows [a, z) it makes valid."""
        u = j * pps + i
        pos, part = (u, 0) if cpp == 1 else (lax.div(u, cpp), lax.rem(u, cpp))
        page = jnp.clip(idx_ref[b, h, jnp.minimum(pos, n - 1)], 0, n_pages - 1)
        first = page * p + part * chunk
        last = jnp.minimum(jnp.minimum(first + chunk, page * p + p), limit)
        last = jnp.where(u < units, last, first)
        src = jnp.minimum(first, cap - chunk)  # shifted back so the copy stays in the cache
        off = i * chunk - src
        return src, first + off, jnp.maximum(last, first) + off

    def copies(j, slot, i):
        src = unit(j, i)[0]
        dst = pl.ds(i * chunk, chunk)
        return (pltpu.make_async_copy(k_hbm.at[b, h, pl.ds(src, chunk)], kbuf.at[slot, dst], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[b, h, pl.ds(src, chunk)], vbuf.at[slot, dst], sem.at[1, slot]))

    def start_block(j, slot):
        def issue(i, c):
            for cp in copies(j, slot, i):
                cp.start()
            return c
        lax.fori_loop(0, pps, issue, 0)

    def wait_block(j, slot):
        def wait(i, c):
            for cp in copies(j, slot, i):
                cp.wait()
            return c
        lax.fori_loop(0, pps, wait, 0)

    r = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

    def valid_rows(j):
        if not masked_tail:  # token mode without lengths: every clamped row is live
            return j * block_k + r < count

        def add(i, acc):
            _, a, z = unit(j, i)
            return acc | ((r >= a) & (r < z))
        return lax.fori_loop(0, pps, add, jnp.zeros((1, block_k), jnp.bool_))

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
        valid = valid_rows(j)
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p_ = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l = alpha * l + p_.sum(axis=1, keepdims=True)
        vb = jnp.where(valid.reshape(block_k, 1), vb, 0.0)
        o = alpha * o + jnp.dot(p_, vb, preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((g, d), jnp.float32), jnp.full((g, 1), NEG_INF, jnp.float32),
            jnp.zeros((g, 1), jnp.float32))
    o, m, l = lax.fori_loop(0, nb, body, init)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "page_size", "block_k", "interpret"))
def sparse_decode(q, k, v, indices, counts, lengths=None, *, scale: float | None = None,
                  page_size: int = 1, block_k: int = 64, interpret: bool = False) -> jax.Array:
    """Gathering decode attention (row or page DMAs); same contract as `reference.sparse_decode`.

    block_k: buffer rows per step (a positive multiple of 8)."""
    g = reference.check_sparse(q, k, v, indices, counts, lengths, page_size)
    b, hkv, cap, d = k.shape
    if block_k <= 0 or block_k % 8:
        raise ValueError(f"block_k must be a positive multiple of 8, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    chunk = min(page_size, block_k)
    if cap < chunk:  # tiny cache: pad so that one page DMA fits
        k = jnp.pad(k, ((0, 0), (0, 0), (0, chunk - cap), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, chunk - cap), (0, 0)))
    limit = jnp.full((b, hkv), cap, jnp.int32) if lengths is None else \
        jnp.clip(lengths.astype(jnp.int32), 0, cap)
    meta = jnp.stack([jnp.clip(counts.astype(jnp.int32), 0, indices.shape[2]), limit], axis=-1)
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
    kernel = functools.partial(_kernel, block_k=block_k, page_size=page_size, chunk=chunk,
                               masked_tail=page_size > 1 or lengths is not None)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="kvjax_sparse_decode_tpu" if page_size == 1 else "kvjax_page_sparse_decode_tpu",
    )(indices.astype(jnp.int32), meta, qg, k, v)
    return out.reshape(b, hkv * g, d)
