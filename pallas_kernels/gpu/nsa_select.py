"""NSA selected-block attention forward (Pallas-Triton, GPU), token-outer order.

NSA's selection kernel order (fla-org/native-sparse-attention `parallel_nsa_fwd`): one program per
(batch, kv head, query token) holds the g query heads of the group as one [g, D] tile (padded to
16 rows, the smallest Triton dot) and loops over that token's selected blocks of `block_size`
keys: one contiguous `pl.ds` load of K and V and two tensor-core dots per block, base-2 online
softmax, causal mask (key position <= query position) on the query's own block. No [T, T] mask
and no gathered copy of K/V exist in HBM; the work is T * top_n * block_size per head.

(For g < 16 this kernel wastes 1 - g/16 of each dot: FSA's block-outer forward, which fills the
dot's M dimension with `block_q` tokens that selected the same block, is `nsa_select_fsa.
nsa_select_block_outer`, same contract. The dK/dV backward kernel in `nsa_select_bwd` is block-outer.)

Shapes: q [batch, q_heads, seq, D] (RoPE'd, positions 0..seq-1); k, v [batch, kv_heads, seq, D];
indices [batch, kv_heads, seq, n] int32 block ids (entries past `counts` are ignored; -1 allowed);
counts [batch, kv_heads, seq] int32 -> out [batch, q_heads, seq, D] in q.dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu import common


def check_select(q, k, v, indices, counts, block_size: int):
    """Shared shape checks of the NSA selection kernels; returns the GQA group size."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [batch, q_heads, seq, D] and k, v [batch, kv_heads, seq, D], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, hkv, t, d = k.shape
    if q.shape[0] != b or q.shape[2:] != (t, d):
        raise ValueError(f"q {q.shape} does not match k {k.shape}")
    if q.shape[1] % hkv:
        raise ValueError(f"GQA group does not divide: {q.shape[1]} q heads over {hkv} kv heads")
    if indices.ndim != 4 or indices.shape[:3] != (b, hkv, t):
        raise ValueError(f"indices must be [batch, kv_heads, seq, n]={(b, hkv, t)} + (n,), got {indices.shape}")
    if counts.shape != (b, hkv, t):
        raise ValueError(f"counts must be [batch, kv_heads, seq]={(b, hkv, t)}, got {counts.shape}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return q.shape[1] // hkv


def _kernel(q_ref, k_ref, v_ref, idx_ref, meta_ref, o_ref, lse_ref=None, *, block: int, window: int = 0):
    count, limit = meta_ref[0], meta_ref[1]          # selected blocks; query position + 1
    n_pages = k_ref.shape[0] // block
    n = idx_ref.shape[0]
    q = q_ref[...]
    gp, d = q.shape
    r = lax.iota(jnp.int32, block)

    def body(j, carry):
        o, m, l = carry
        page = jnp.clip(idx_ref[jnp.minimum(j, n - 1)], 0, n_pages - 1)
        start = pl.multiple_of(page * block, block)
        kb = k_ref[pl.ds(start, block), :]
        vb = v_ref[pl.ds(start, block), :]
        valid = start + r < limit
        if window:                                   # sliding window: keys after position - window only
            valid = valid & (start + r >= limit - window)
        s = plgpu.dot(q, kb, trans_b=True)
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        vb = jnp.where(valid[:, None], vb, jnp.zeros_like(vb))
        o = alpha[:, None] * o + plgpu.dot(p.astype(vb.dtype), vb)
        return o, m, l

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = lax.fori_loop(0, count, body, init)
    o_ref[...] = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    if lse_ref is not None:     # base-2 log-sum-exp of the scaled logits (0 for a row without keys)
        lse_ref[...] = jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "num_warps", "num_stages", "interpret",
                                             "return_lse", "window"))
def nsa_select(q, k, v, indices, counts, *, block_size: int = 64, scale: float | None = None,
               num_warps: int = 4, num_stages: int = 2, interpret: bool = False, return_lse: bool = False,
               window: int = 0):
    """Selected-block attention forward; the contract of `models.nsa.selected_attention`
    (block_size: a power of two >= 16; head_dim a power of two >= 16). Indices of a token must be
    distinct. return_lse: also the base-2 log-sum-exp of the logits * scale * log2(e)
    [batch, q_heads, seq] float32 (what the backward kernels need). window > 0: keys at positions
    <= query - window are masked too (the sliding-window branch as a list of window blocks)."""
    g = check_select(q, k, v, indices, counts, block_size)
    b, hkv, t, d = k.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16 for the GPU kernel, got {block_size}")
    scale = d ** -0.5 if scale is None else scale
    gp = common.padded_heads(g)
    qg = q.reshape(b, hkv, g, t, d).transpose(0, 1, 3, 2, 4).astype(jnp.float32) * (scale * common.LOG2E)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0))).astype(k.dtype)
    tp = -(-t // block_size) * block_size
    if tp > t:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    n = indices.shape[-1]
    nn = common.next_pow2(max(n, 2))
    idx = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, nn - n)))
    limit = jnp.broadcast_to(jnp.arange(1, t + 1, dtype=jnp.int32), (b, hkv, t))
    meta = jnp.stack([jnp.clip(counts.astype(jnp.int32), 0, n), limit], axis=-1)
    res = pl.pallas_call(
        functools.partial(_kernel, block=block_size, window=window),
        grid=(b, hkv, t),
        in_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, tp, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tp, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, None, nn), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, 2), lambda i, h, s: (i, h, s, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0))]
        + ([pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0))] if return_lse else []),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, t, gp, d), q.dtype)]
        + ([jax.ShapeDtypeStruct((b, hkv, t, gp), jnp.float32)] if return_lse else []),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_nsa_select",
    )(qg, k, v, idx, meta)
    out = res[0][:, :, :, :g].transpose(0, 1, 3, 2, 4).reshape(b, hkv * g, t, d)
    if return_lse:
        return out, res[1][:, :, :, :g].transpose(0, 1, 3, 2).reshape(b, hkv * g, t)
    return out
