"""Token-sparse decode attention (Pallas-Triton, GPU): attend only to selected slots.

For Quest-style query-aware sparsity (Tang et al., "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference", arXiv 2406.10774) and any token-level selection (TokenSelect,
ShadowKV, NSA selected branch): each (batch, kv-head) brings its own list of slot indices; the
kernel gathers the selected K/V rows inside the loop (no gathered copy in HBM) and runs the
same split-K online softmax as the dense kernel, so the time is proportional to the number of
selected tokens, not to the cache capacity.

Shapes: q [batch, q_heads, head_dim]; k, v [batch, kv_heads, capacity, head_dim];
indices [batch, kv_heads, n_selected] int32; counts [batch, kv_heads] int32 (the first counts
indices of a row are used) -> out [batch, q_heads, head_dim].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels.gpu import common


def _kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, o_ref, m_ref, l_ref, *, block_k: int,
            num_splits: int):
    split = pl.program_id(2)
    count = cnt_ref[0]
    cap = k_ref.shape[0]
    n_blocks = pl.cdiv(count, block_k)
    per = pl.cdiv(n_blocks, num_splits)
    lo = split * per
    hi = jnp.minimum(lo + per, n_blocks)
    q = q_ref[...]
    gp, d = q.shape

    def body(j, carry):
        o, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        valid = start + lax.iota(jnp.int32, block_k) < count
        rows = jnp.clip(idx_ref[pl.ds(start, block_k)], 0, cap - 1)
        rows = jnp.where(valid, rows, 0)
        kb = k_ref[rows, :]
        vb = v_ref[rows, :]
        s = plgpu.dot(q, kb, trans_b=True)
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        vb = jnp.where(valid[:, None], vb, jnp.zeros_like(vb))
        o = alpha[:, None] * o + plgpu.dot(p.astype(vb.dtype), vb)
        return o, m, l

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def sparse_decode(q, k, v, indices, counts, *, scale: float | None = None, block_k: int = 32,
                  num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False) -> jax.Array:
    """Gathering split-K decode; same contract as `pallas_kernels.reference.sparse_decode`.

    Out-of-range indices are clamped to [0, capacity) (the reference does the same)."""
    g = reference.check_sparse(q, k, v, indices, counts)
    b, hkv, cap, d = k.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    n = indices.shape[2]
    if n % block_k:
        indices = jnp.pad(indices, ((0, 0), (0, 0), (0, -n % block_k)))
        n = indices.shape[2]
    gp = common.padded_heads(g)
    qg = common.group_queries(q, hkv, scale, k.dtype, gp)
    splits = common.choose_splits(b, hkv, n // block_k, num_splits)
    cnt = jnp.clip(counts.astype(jnp.int32), 0, indices.shape[2])[:, :, None]
    kernel = functools.partial(_kernel, block_k=block_k, num_splits=splits)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, n), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, 1), lambda i, h, s: (i, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_sparse_decode",
    )(qg, k, v, indices.astype(jnp.int32), cnt)
    return common.combine_splits(o, m, l, g).astype(q.dtype)
