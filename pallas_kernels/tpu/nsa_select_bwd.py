"""NSA selected-block attention backward (Pallas-Mosaic, TPU) and the trainable op around it.

Same recipe and contract as `pallas_kernels.gpu.nsa_select_bwd` (FlashAttention-2 backward from
the saved log-sum-exp, delta = rowsum(dO * O)):

- dq, token-outer: one program per (batch, kv head, query token), the token's block ids and count
  scalar-prefetched into SMEM, each selected K/V block DMA'd from HBM into a two-slot VMEM buffer
  (block j+1 in flight while block j is used), as the forward kernel.
- dk/dv, block-outer: one program per (batch, kv head, key block) owns its block's dK/dV; the
  list of query tiles (`block_q` tokens) that selected the block is scalar-prefetched, and each
  tile's q, dO, lse, delta and index rows ([g, block_q, ...]) are DMA'd from HBM (one tile at a
  time, not double-buffered).

Natural-log softmax in float32 (lse saved by the forward kernel). Validated in
TPU interpret mode on CPU only (no TPU run yet).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gpu.nsa_select import check_select
from pallas_kernels.gpu.nsa_select_bwd import _pad_axis, tile_lists
from pallas_kernels.tpu.common import advance_double_buffer, interpret_params
from pallas_kernels.tpu.nsa_select import nsa_select

NEG_INF = -1e30
_NT = (((1,), (1,)), ((), ()))      # a @ b.T
_TN = (((0,), (0,)), ((), ()))      # a.T @ b


def _dq_kernel(idx_ref, cnt_ref, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dq_ref, kbuf, vbuf, sem, *,
               block: int, window: int):
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = cnt_ref[b, h, t]
    n = idx_ref.shape[3]
    n_pages = k_hbm.shape[2] // block
    q = q_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    lse, delta = lse_ref[...], delta_ref[...]                                   # [g, 1]

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

    def body(j, dq):
        slot = j % 2
        advance_double_buffer(copies, j, count, slot)
        page = jnp.clip(idx_ref[b, h, t, jnp.minimum(j, n - 1)], 0, n_pages - 1)
        valid = page * block + r <= t
        if window:
            valid = valid & (page * block + r > t - window)
        kb = kbuf[slot].astype(jnp.float32)
        vb = vbuf[slot].astype(jnp.float32)
        s = lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32)
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)
        dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
        return dq + jnp.dot(p * (dp - delta), kb, preferred_element_type=jnp.float32)

    dq_ref[...] = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))


def _dkdv_kernel(tiles_ref, ntiles_ref, k_ref, v_ref, q_hbm, do_hbm, stat_hbm, idx_hbm, dk_ref, dv_ref,
                 qbuf, dobuf, statbuf, idxbuf, sem, *, block: int, block_q: int, seq: int, window: int):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kb = k_ref[...].astype(jnp.float32)
    vb = v_ref[...].astype(jnp.float32)
    g = qbuf.shape[0]
    kpos = j * block + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    col = lax.broadcasted_iota(jnp.int32, idxbuf.shape, 1)

    def body(i, carry):
        dk, dv = carry
        ts = tiles_ref[b, h, j, i] * block_q
        rows = pl.ds(ts, block_q)
        cps = [pltpu.make_async_copy(q_hbm.at[b, h, :, rows], qbuf, sem.at[0]),
               pltpu.make_async_copy(do_hbm.at[b, h, :, rows], dobuf, sem.at[1]),
               pltpu.make_async_copy(stat_hbm.at[b, h, :, rows], statbuf, sem.at[2]),
               pltpu.make_async_copy(idx_hbm.at[b, h, rows], idxbuf, sem.at[3])]
        for c in cps:
            c.start()
        for c in cps:
            c.wait()
        idx = idxbuf[...]                                   # [block_q, n + 1]: block ids, then the count
        live = (idx == j) & (col < idx[:, -1:])
        hit = jnp.max(live.astype(jnp.int32), axis=1, keepdims=True) > 0
        qpos = ts + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        mask = hit & (kpos <= qpos) & (qpos < seq)
        if window:
            mask = mask & (kpos > qpos - window)
        for gg in range(g):
            q = qbuf[gg].astype(jnp.float32)
            do = dobuf[gg].astype(jnp.float32)
            st = statbuf[gg]                                # [block_q, 2]: lse, delta
            s = lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32)
            p = jnp.where(mask, jnp.exp(s - st[:, 0:1]), 0.0)
            dv = dv + lax.dot_general(p, do, _TN, preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - st[:, 1:2])
            dk = dk + lax.dot_general(ds, q, _TN, preferred_element_type=jnp.float32)
        return dk, dv

    dk, dv = lax.fori_loop(0, ntiles_ref[b, h, j, 0], body, (jnp.zeros(kb.shape, jnp.float32),
                                                             jnp.zeros(vb.shape, jnp.float32)))
    dk_ref[...] = dk
    dv_ref[...] = dv



def check_tpu_blocks(block_size: int, block_q: int) -> None:
    """The TPU kernels' key blocks and query tiles are multiples of 8 rows (a sublane tile)."""
    if block_size % 8 or block_q % 8:
        raise ValueError(f"block_size and block_q must be multiples of 8 for the TPU kernel, got "
                         f"{block_size}, {block_q}")

@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_q", "interpret", "window"))
def nsa_select_bwd(q, k, v, indices, counts, out, lse, dout, *, block_size: int = 64, scale: float | None = None,
                   block_q: int = 64, interpret=False, window: int = 0):
    """(dq, dk, dv) of the selected-block attention given the forward's out [b, hq, t, D] and
    natural-log lse [b, hq, t] (`nsa_select(..., return_lse=True)`)."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    check_tpu_blocks(block_size, block_q)
    scale = d ** -0.5 if scale is None else scale
    n = indices.shape[-1]
    cnt = jnp.clip(counts.astype(jnp.int32), 0, n)
    idx = indices.astype(jnp.int32)
    nb = -(-t // block_size)
    tp = nb * block_size
    kp, vp = _pad_axis(k, 2, tp), _pad_axis(v, 2, tp)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    grouped = lambda x: x.reshape((b, hkv, g) + x.shape[2:])
    qs = grouped(q.astype(jnp.float32) * scale).astype(q.dtype)
    do = grouped(dout.astype(q.dtype))
    stat = jnp.stack([grouped(lse.astype(jnp.float32)), grouped(delta)], axis=-1)                            # [b, hkv, g, t, 2]

    tok = lambda x: jnp.moveaxis(x, 2, 3)                                                # [b, hkv, t, g, ...]
    row = lambda *blk: pl.BlockSpec((None, None, None) + blk, lambda i, h, s, *_: (i, h, s) + (0,) * len(blk))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block=block_size, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hkv, t),
            in_specs=[row(g, d), row(g, d), row(g, 1), row(g, 1),
                      pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=row(g, d),
            scratch_shapes=[pltpu.VMEM((2, block_size, d), k.dtype), pltpu.VMEM((2, block_size, d), v.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))]),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t, g, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="kvjax_nsa_select_dq_tpu",
    )(idx, cnt, tok(qs), tok(do), tok(stat[..., :1]), tok(stat[..., 1:]), kp, vp)
    dq = dq.transpose(0, 1, 3, 2, 4).reshape(q.shape) * scale

    n_tiles = -(-t // block_q)
    tq = n_tiles * block_q
    tiles, ntiles = tile_lists(idx, cnt, nb, n_tiles, block_q)
    idx_cnt = _pad_axis(jnp.concatenate([idx, cnt[..., None]], axis=-1), 2, tq, -1)    # [b, hkv, tq, n + 1]
    kblock = pl.BlockSpec((None, None, block_size, d), lambda i, h, j, *_: (i, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block=block_size, block_q=block_q, seq=t, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hkv, nb),
            in_specs=[kblock, kblock] + [pl.BlockSpec(memory_space=pl.ANY)] * 4,
            out_specs=[kblock, kblock],
            scratch_shapes=[pltpu.VMEM((g, block_q, d), q.dtype), pltpu.VMEM((g, block_q, d), q.dtype),
                            pltpu.VMEM((g, block_q, 2), jnp.float32), pltpu.VMEM((block_q, n + 1), jnp.int32),
                            pltpu.SemaphoreType.DMA((4,))]),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, tp, d), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="kvjax_nsa_select_dkdv_tpu",
    )(tiles, ntiles, kp, vp, _pad_axis(qs, 3, tq), _pad_axis(do, 3, tq), _pad_axis(stat, 3, tq), idx_cnt)
    return dq.astype(q.dtype), dk[:, :, :t].astype(k.dtype), dv[:, :, :t].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def nsa_select_trainable(q, k, v, indices, counts, block_size: int = 64, scale: float | None = None,
                         block_q: int = 64, interpret=False, window: int = 0):
    """Selected-block attention with TPU kernel forward and backward (differentiable in q, k, v)."""
    return nsa_select(q, k, v, indices, counts, block_size=block_size, scale=scale, interpret=interpret,
                      window=window)


def _fwd(q, k, v, indices, counts, block_size, scale, block_q, interpret, window):
    out, lse = nsa_select(q, k, v, indices, counts, block_size=block_size, scale=scale, interpret=interpret,
                          return_lse=True, window=window)
    return out, (q, k, v, indices, counts, out, lse)


def _bwd(block_size, scale, block_q, interpret, window, res, dout):
    q, k, v, indices, counts, out, lse = res
    dq, dk, dv = nsa_select_bwd(q, k, v, indices, counts, out, lse, dout, block_size=block_size, scale=scale,
                                block_q=block_q, interpret=interpret, window=window)
    return dq, dk, dv, None, None


nsa_select_trainable.defvjp(_fwd, _bwd)
