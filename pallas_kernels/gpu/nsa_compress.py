"""NSA compressed-branch attention with the selection importance (Pallas-Triton, GPU).

The compression branch attends every query to the compressed keys it may see (query at position
p sees compressed block i iff p >= i*d + l - 1) and its softmax probabilities, summed over the g
query heads of a KV head and mapped to selection blocks with the overlap weights w, are the
selection importance s_j = sum_o w_o p[j*(l'/d) - (l/d - 1) + o] (spec §6, `models.nsa.
block_importance`). The open Triton implementation writes the probabilities [T, T/d] to HBM; here
they stay on chip. One program per (batch, kv head, tile of `block_q` queries), two passes over
the compressed keys in tiles of `blocks_per_tile` * (l'/d) keys (the ones of `blocks_per_tile`
selection blocks):

1. row max and sum of the base-2 logits of each of the g heads (online softmax, no V);
2. normalised probabilities p = 2^(s - lse): the output accumulates p @ V, and the group's summed
   p times the banded overlap matrix [keys of the tile, blocks of the tile] gives the tile's block
   scores; a key also feeds the next tile's first block (weight w_0 at most: l <= l'), carried
   over in registers.

Only tiles with a visible key are computed (causal: about half). Outputs: the branch output
[batch, q_heads, seq, D] and the importance [batch, kv_heads, seq, n_selection_blocks] float32
(T x T/l': l'/d = 4x smaller than the probabilities, and what `select_blocks` takes).

Shapes: q [batch, q_heads, seq, D] (RoPE'd, positions 0..seq-1); ck, cv [batch, kv_heads,
n_compressed, D] (`models.nsa.compressed_kv`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common


def overlap_matrix(weights: np.ndarray, stride: int, lo: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The tile's banded map from its keys to its blocks: (main [blocks*stride, blocks], spill
    [blocks*stride]) with main[c, j] = w[c - j*stride + lo] and spill[c] the weight of key c in
    the next tile's first block (0 outside the band)."""
    c = np.arange(blocks * stride)[:, None]
    o = c - np.arange(blocks + 1)[None, :] * stride + lo
    full = np.where((o >= 0) & (o < len(weights)), weights[np.clip(o, 0, len(weights) - 1)], 0.0)
    return full[:, :blocks].astype(np.float32), full[:, blocks].astype(np.float32)


def _kernel(q_ref, ck_ref, cv_ref, wm_ref, ws_ref, o_ref, imp_ref, *, seq: int, groups: int, kernel_size: int,
            stride: int, per_block: int, tile_blocks: int, n_tiles: int):
    bq = q_ref.shape[1]
    bc = tile_blocks * per_block                                   # compressed keys per tile
    t0 = pl.program_id(2) * bq
    pos = t0 + lax.iota(jnp.int32, bq)
    last = jnp.minimum(t0 + bq, seq) - 1
    n_vis = jnp.maximum((last - kernel_size + 1) // stride + 1, 0)   # compressed keys the tile sees
    n_comp = jnp.minimum((n_vis + bc - 1) // bc, n_tiles)
    n_imp = jnp.minimum(n_comp + 1, n_tiles)                       # + the tile the last spill lands in

    def visible(c0):
        key = c0 + lax.iota(jnp.int32, bc)
        return (pos[:, None] >= key[None, :] * stride + kernel_size - 1) & (pos[:, None] < seq)

    def stats(i, carry):                                           # pass 1: row max / sum per head
        ms, ls = carry
        c0 = pl.multiple_of(i * bc, bc)
        kb = ck_ref[pl.ds(c0, bc), :]
        vis = visible(c0)
        new_ms, new_ls = [], []
        for gg in range(groups):
            s = jnp.where(vis, plgpu.dot(q_ref[gg], kb, trans_b=True), common.NEG_INF)
            m = jnp.maximum(ms[gg], s.max(axis=1))
            p = jnp.where(vis, jnp.exp2(s - m[:, None]), 0.0)
            new_ls.append(ls[gg] * jnp.exp2(ms[gg] - m) + p.sum(axis=1))
            new_ms.append(m)
        return tuple(new_ms), tuple(new_ls)

    init = (tuple(jnp.full((bq,), common.NEG_INF, jnp.float32) for _ in range(groups)),
            tuple(jnp.zeros((bq,), jnp.float32) for _ in range(groups)))
    ms, ls = lax.fori_loop(0, n_comp, stats, init)
    lse = [jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), 0.0) for m, l in zip(ms, ls)]
    wm, ws = wm_ref[...], ws_ref[...]

    def probs(i, carry):                                           # pass 2: output and block scores
        outs, spill = carry
        c0 = pl.multiple_of(i * bc, bc)
        kb, vb = ck_ref[pl.ds(c0, bc), :], cv_ref[pl.ds(c0, bc), :]
        vis = visible(c0)
        total = jnp.zeros((bq, bc), jnp.float32)
        new_outs = []
        for gg in range(groups):
            s = plgpu.dot(q_ref[gg], kb, trans_b=True)
            p = jnp.where(vis & (ls[gg] > 0)[:, None], jnp.exp2(s - lse[gg][:, None]), 0.0)
            new_outs.append(outs[gg] + plgpu.dot(p.astype(vb.dtype), vb))
            total = total + p
        scores = plgpu.dot(total, wm)                              # [bq, tile_blocks]
        first = lax.iota(jnp.int32, tile_blocks) == 0
        scores = scores + jnp.where(first[None, :], spill[:, None], 0.0)
        imp_ref[:, pl.ds(pl.multiple_of(i * tile_blocks, tile_blocks), tile_blocks)] = scores
        return tuple(new_outs), (total * ws[None, :]).sum(axis=1)

    d = o_ref.shape[-1]
    init = (tuple(jnp.zeros((bq, d), jnp.float32) for _ in range(groups)), jnp.zeros((bq,), jnp.float32))
    outs, _ = lax.fori_loop(0, n_imp, probs, init)
    for gg in range(groups):
        o_ref[gg] = outs[gg].astype(o_ref.dtype)

    def zero(i, c):                                                # blocks no key of the tile reaches
        imp_ref[:, pl.ds(pl.multiple_of(i * tile_blocks, tile_blocks), tile_blocks)] = jnp.zeros(
            (bq, tile_blocks), jnp.float32)
        return c

    lax.fori_loop(n_imp, n_tiles, zero, 0)


@functools.partial(jax.jit, static_argnames=("kernel_size", "kernel_stride", "block_size", "scale", "block_q",
                                             "blocks_per_tile", "num_warps", "num_stages", "interpret"))
def nsa_compressed(q, ck, cv, *, kernel_size: int = 32, kernel_stride: int = 16, block_size: int = 64,
                   scale: float | None = None, block_q: int = 64, blocks_per_tile: int = 16, num_warps: int = 4,
                   num_stages: int = 2, interpret: bool = False):
    """Compressed-branch attention and selection importance -> (out [batch, q_heads, seq, D] in
    q.dtype, importance [batch, kv_heads, seq, ceil(seq / block_size)] float32); the contract of
    `models.nsa.masked_attention` over `compressed_visible` + `block_importance`. On the GPU,
    block_q, head_dim and blocks_per_tile * block_size / kernel_stride are powers of two >= 16."""
    b, hq, t, d = q.shape
    if ck.ndim != 4 or cv.shape != ck.shape or ck.shape[0] != b or ck.shape[3] != d:
        raise ValueError(f"ck, cv must be [batch, kv_heads, n_compressed, {d}], got {ck.shape}, {cv.shape}")
    hkv, nc = ck.shape[1], ck.shape[2]
    if hq % hkv:
        raise ValueError(f"GQA group does not divide: {hq} q heads over {hkv} kv heads")
    l, st, bs = kernel_size, kernel_stride, block_size
    if min(l, st, bs, block_q, blocks_per_tile) <= 0 or l % st or bs % st:
        raise ValueError(f"kernel_size ({l}) and block_size ({bs}) must be positive multiples of kernel_stride ({st})")
    if l > bs:
        raise ValueError(f"kernel_size ({l}) must not exceed block_size ({bs}): a key would feed 3 blocks")
    if nc != max(0, (t - l) // st + 1):
        raise ValueError(f"{nc} compressed keys, but {t} tokens make {max(0, (t - l) // st + 1)}")
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    per_block, lo = bs // st, l // st - 1
    weights = np.bincount((np.arange(l // st)[:, None] + np.arange(per_block)[None, :]).ravel()).astype(np.float32)
    nb = -(-t // bs)
    n_tiles = -(-nb // blocks_per_tile)
    ncp = n_tiles * blocks_per_tile * per_block
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, ncp - nc), (0, 0)))
    tp = -(-t // block_q) * block_q
    qg = (q.reshape(b, hkv, g, t, d).astype(jnp.float32) * (scale * common.LOG2E)).astype(ck.dtype)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    wm, ws = overlap_matrix(weights, per_block, lo, blocks_per_tile)
    const = lambda *shape: pl.BlockSpec(shape, lambda i, h, s: (0,) * len(shape))
    keys = pl.BlockSpec((None, None, ncp, d), lambda i, h, s: (i, h, 0, 0))
    o, imp = pl.pallas_call(
        functools.partial(_kernel, seq=t, groups=g, kernel_size=l, stride=st, per_block=per_block,
                          tile_blocks=blocks_per_tile, n_tiles=n_tiles),
        grid=(b, hkv, tp // block_q),
        in_specs=[pl.BlockSpec((None, None, g, block_q, d), lambda i, h, s: (i, h, 0, s, 0)), keys, keys,
                  const(*wm.shape), const(*ws.shape)],
        out_specs=[pl.BlockSpec((None, None, g, block_q, d), lambda i, h, s: (i, h, 0, s, 0)),
                   pl.BlockSpec((None, None, block_q, n_tiles * blocks_per_tile), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, g, tp, d), q.dtype),
                   jax.ShapeDtypeStruct((b, hkv, tp, n_tiles * blocks_per_tile), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_nsa_compressed",
    )(qg, pad(ck), pad(cv), jnp.asarray(wm), jnp.asarray(ws))
    return o[:, :, :, :t].reshape(b, hq, t, d), imp[:, :, :t, :nb]
