"""NSA selected-block attention backward (Pallas-Triton, GPU) and the trainable op around it.

`nsa_select_trainable(q, k, v, indices, counts, ...)` is `jax.custom_vjp`: the forward is
`pallas_kernels.gpu.nsa_select.nsa_select` (which also returns the base-2 log-sum-exp), the
backward two kernels in the FlashAttention-2 recipe (recompute p from the saved lse;
delta = rowsum(dO * O)):

- dq, token-outer (NSA's order, as the forward): one program per (batch, kv head, query token)
  holds the g query heads as one [gp, D] tile and loops over that token's selected blocks:
  dq = scale * sum_j dS_j K_j with dS = P * (dO V^T - delta).
- dk/dv, block-outer (FSA's order): one program per (batch, kv head, key block) loops over the
  query tiles of `block_q` tokens that selected the block (a per-block list built by XLA from the
  indices, so tiles that never picked the block are not visited); inside a tile the selection
  test is per token (the token's index row contains the block) plus the causal mask, and the g
  query heads of the group each add dV += P^T dO, dK += dS^T Q. No atomics: each program owns
  its key block's dK/dV.

Shapes as the forward: q [batch, q_heads, seq, D]; k, v [batch, kv_heads, seq, D]; indices
[batch, kv_heads, seq, n] int32 (distinct per token; entries past `counts` ignored); counts
[batch, kv_heads, seq]. Gradients are returned in the inputs' dtypes (accumulated in float32).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common
from pallas_kernels.gpu.nsa_select import check_select, nsa_select

LN2 = math.log(2.0)


def _dq_kernel(q_ref, do_ref, k_ref, v_ref, idx_ref, meta_ref, lse_ref, delta_ref, dq_ref, *, block: int,
               window: int):
    count, limit = meta_ref[0], meta_ref[1]
    n_pages = k_ref.shape[0] // block
    n = idx_ref.shape[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    r = lax.iota(jnp.int32, block)

    def body(j, dq):
        page = jnp.clip(idx_ref[jnp.minimum(j, n - 1)], 0, n_pages - 1)
        start = pl.multiple_of(page * block, block)
        kb = k_ref[pl.ds(start, block), :]
        vb = v_ref[pl.ds(start, block), :]
        valid = start + r < limit
        if window:
            valid = valid & (start + r >= limit - window)
        s = plgpu.dot(q, kb, trans_b=True)
        p = jnp.where(valid[None, :], jnp.exp2(s - lse[:, None]), 0.0)
        dp = plgpu.dot(do, vb, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(kb.dtype), kb)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq


def _dkdv_kernel(tiles_ref, ntiles_ref, q_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, k_ref, v_ref,
                 dk_ref, dv_ref, *, block: int, block_q: int, groups: int, seq: int, window: int):
    j = pl.program_id(2)
    kb, vb = k_ref[...], v_ref[...]
    kpos = j * block + lax.iota(jnp.int32, block)
    nn = idx_ref.shape[1]
    col = lax.iota(jnp.int32, nn)

    def body(i, carry):
        dk, dv = carry
        ts = pl.multiple_of(tiles_ref[i] * block_q, block_q)
        rows = pl.ds(ts, block_q)
        idx = idx_ref[rows, :]
        cnt = cnt_ref[rows]
        hit = jnp.max(((idx == j) & (col[None, :] < cnt[:, None])).astype(jnp.int32), axis=1) > 0
        qpos = ts + lax.iota(jnp.int32, block_q)
        mask = hit[:, None] & (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] < seq)
        if window:
            mask = mask & (kpos[None, :] > qpos[:, None] - window)
        for gg in range(groups):          # the g query heads of the kv head share the key block
            q = q_ref[gg, rows, :]
            do = do_ref[gg, rows, :]
            lse = lse_ref[gg, rows]
            delta = delta_ref[gg, rows]
            s = plgpu.dot(q, kb, trans_b=True)                              # [block_q, block]
            p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, vb, trans_b=True)
            ds = p * (dp - delta[:, None])
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, ntiles_ref[0], body, init)
    dk_ref[...] = dk * LN2
    dv_ref[...] = dv


def tile_lists(indices, counts, n_blocks: int, n_tiles: int, block_q: int):
    """Per key block, the query tiles (of `block_q` tokens) with a token that selected it:
    (tiles [b, hkv, n_blocks, n_tiles_p] int32, hits first, ascending; n [b, hkv, n_blocks, 1])."""
    b, hkv, t, n = indices.shape
    live = (jnp.arange(n) < counts[..., None]) & (indices >= 0) & (indices < n_blocks)
    blk = jnp.where(live, indices, n_blocks)                                 # n_blocks = "none"
    tile = (jnp.arange(t) // block_q)[None, None, :, None]
    bh = (jnp.arange(b)[:, None] * hkv + jnp.arange(hkv)[None, :])[:, :, None, None]
    flat = ((bh * n_tiles + tile) * (n_blocks + 1) + blk).reshape(-1)
    hit = jnp.zeros((b * hkv * n_tiles * (n_blocks + 1),), jnp.bool_).at[flat].set(True)
    hit = hit.reshape(b, hkv, n_tiles, n_blocks + 1)[..., :n_blocks].transpose(0, 1, 3, 2)
    order = jnp.argsort(~hit, axis=-1, stable=True).astype(jnp.int32)
    ntp = common.next_pow2(max(n_tiles, 2))
    order = jnp.pad(order, ((0, 0), (0, 0), (0, 0), (0, ntp - n_tiles)))
    return order, hit.sum(-1, keepdims=True).astype(jnp.int32)


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_q", "num_warps", "interpret", "window"))
def nsa_select_bwd(q, k, v, indices, counts, out, lse, dout, *, block_size: int = 64, scale: float | None = None,
                   block_q: int = 64, num_warps: int = 4, interpret: bool = False, window: int = 0):
    """(dq, dk, dv) of the selected-block attention, given the forward's out [b, hq, t, D] and
    base-2 lse [b, hq, t] (`nsa_select(..., return_lse=True)`) and the cotangent dout."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    if block_q & (block_q - 1) or block_q < 16:
        raise ValueError(f"block_q must be a power of two >= 16, got {block_q}")
    scale = d ** -0.5 if scale is None else scale
    n = indices.shape[-1]
    cnt = jnp.clip(counts.astype(jnp.int32), 0, n)
    idx = indices.astype(jnp.int32)
    nb = -(-t // block_size)
    tp = nb * block_size
    kp, vp = _pad_axis(k, 2, tp), _pad_axis(v, 2, tp)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)        # [b, hq, t]
    grouped = lambda x: x.reshape((b, hkv, g) + x.shape[2:])                          # [b, hkv, g, t, ...]
    qs = grouped(q.astype(jnp.float32) * (scale * common.LOG2E)).astype(k.dtype)
    do = grouped(dout).astype(k.dtype)
    lse_g, delta_g = grouped(lse.astype(jnp.float32)), grouped(delta)
    nn = common.next_pow2(max(n, 2))
    idx_p = _pad_axis(idx, 3, nn, -1)

    # dq: token-outer, [gp, D] tiles as the forward
    gp = common.padded_heads(g)
    tok = lambda x: _pad_axis(jnp.moveaxis(x, 2, 3), 3, gp)                    # [b, hkv, t, gp, ...]
    limit = jnp.broadcast_to(jnp.arange(1, t + 1, dtype=jnp.int32), (b, hkv, t))
    meta = jnp.stack([cnt, limit], axis=-1)
    row = lambda *blk: pl.BlockSpec((None, None, None) + blk, lambda i, h, s: (i, h, s) + (0,) * len(blk))
    full = pl.BlockSpec((None, None, tp, d), lambda i, h, s: (i, h, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block=block_size, window=window),
        grid=(b, hkv, t),
        in_specs=[row(gp, d), row(gp, d), full, full, row(nn), row(2), row(gp), row(gp)],
        out_specs=row(gp, d),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t, gp, d), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="kvjax_nsa_select_dq",
    )(tok(qs), tok(do), kp, vp, idx_p, meta, tok(lse_g), tok(delta_g))
    dq = dq[:, :, :, :g].transpose(0, 1, 3, 2, 4).reshape(q.shape) * scale

    # dk/dv: key-block-outer over the query tiles that selected the block
    n_tiles = -(-t // block_q)
    tq = n_tiles * block_q
    g2 = common.next_pow2(g)
    heads = lambda x, fill=0: _pad_axis(_pad_axis(x, 3, tq, fill), 2, g2, fill)
    tiles, ntiles = tile_lists(idx, cnt, nb, n_tiles, block_q)
    ntp = tiles.shape[-1]
    hspec = lambda *blk: pl.BlockSpec((None, None, g2, tq) + blk, lambda i, h, j: (i, h, 0, 0) + (0,) * len(blk))
    kblock = pl.BlockSpec((None, None, block_size, d), lambda i, h, j: (i, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block=block_size, block_q=block_q, groups=g, seq=t, window=window),
        grid=(b, hkv, nb),
        in_specs=[pl.BlockSpec((None, None, None, ntp), lambda i, h, j: (i, h, j, 0)),
                  pl.BlockSpec((None, None, None, 1), lambda i, h, j: (i, h, j, 0)),
                  hspec(d), hspec(d), hspec(), hspec(),
                  pl.BlockSpec((None, None, tq, nn), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, tq), lambda i, h, j: (i, h, 0)),
                  kblock, kblock],
        out_specs=[kblock, kblock],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, tp, d), jnp.float32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="kvjax_nsa_select_dkdv",
    )(tiles, ntiles, heads(qs), heads(do), heads(lse_g), heads(delta_g), _pad_axis(idx_p, 2, tq, -1),
      _pad_axis(cnt, 2, tq), kp, vp)
    return dq.astype(q.dtype), dk[:, :, :t].astype(k.dtype), dv[:, :, :t].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def nsa_select_trainable(q, k, v, indices, counts, block_size: int = 64, scale: float | None = None,
                         block_q: int = 64, interpret: bool = False,
                         window: int = 0):
    """Selected-block attention with kernel forward and backward (differentiable in q, k, v)."""
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
