"""Shared pieces of the GPU (Pallas-Triton) decode kernels: head padding, split choice, split-K combine.

Split-K combine follows FlashDecoding (Dao et al., 2023): every split writes an unnormalised
output o_s with its running max m_s and denominator l_s (base-2 exponentials); the combine is
o = sum_s 2^(m_s - m*) o_s / sum_s 2^(m_s - m*) l_s, and a head whose splits are all empty
(l = 0) yields zeros, not NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
NEG_INF = -1e30
NUM_SMS = 132  # H100 SXM; only used to size the split-K grid


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def padded_heads(g: int) -> int:
    """Query heads of one kv-head padded to a tile of >= 16 rows (the smallest Triton dot M)."""
    return max(16, next_pow2(g))


def group_queries(q: jax.Array, kv_heads: int, scale: float, dtype, gp: int) -> jax.Array:
    """q [batch, q_heads, d] -> [batch, kv_heads, gp, d] in `dtype`, pre-multiplied by scale*log2(e)."""
    b, hq, d = q.shape
    g = hq // kv_heads
    qg = q.reshape(b, kv_heads, g, d).astype(jnp.float32) * (scale * LOG2E)
    if gp > g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    return qg.astype(dtype)


def choose_splits(batch: int, kv_heads: int, n_blocks: int, requested: int | None,
                  waves: int = 2) -> int:
    """About `waves` waves of (batch, kv-head, split) programs on NUM_SMS SMs (splits a power of
    two), at most one split per block."""
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"num_splits must be positive, got {requested}")
        return max(1, min(requested, n_blocks))
    want = -(-waves * NUM_SMS // (batch * kv_heads))
    # round down to a power of two: on an H200 (2026-12-02, 8x32768 and 8x131072) 4 splits ran
    # 1.35x faster than the 5 that "2 waves" gives for 64 (batch, kv-head) rows (BENCHMARKS.md)
    want = 1 << (max(1, want).bit_length() - 1)
    return int(max(1, min(want, n_blocks, 64)))


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array, g: int) -> jax.Array:
    """o [b, h, splits, gp, d], m/l [b, h, splits, gp] (base 2) -> [b, h*g, d] float32."""
    b, h, _, _, d = o.shape
    o, m, l = o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]
    m_max = m.max(axis=2, keepdims=True)
    w = jnp.exp2(m - m_max)
    l_tot = (w * l).sum(axis=2)
    o_tot = (w[..., None] * o).sum(axis=2)
    out = jnp.where(l_tot[..., None] > 0, o_tot / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
    return out.reshape(b, h * g, d)


def online_softmax_step(s, valid, m_prev, l_prev):
    """One online-softmax update in base 2. s [gp, n] logits*log2e, valid [n] bool.

    returns (p [gp, n], alpha [gp], m_new [gp], l_new [gp])."""
    s = jnp.where(valid[None, :], s, NEG_INF)
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    p = jnp.where(valid[None, :], p, 0.0)
    l_new = alpha * l_prev + p.sum(axis=1)
    return p, alpha, m_new, l_new


def store_rows(o_ref, o, g: int, lead: int | None = None):
    """o_ref[...] = o ([gp, d]) (or o_ref[lead] = o) for rows < g only: the GQA padding rows
    (>= g) of the split-K partials are never read by `combine_splits`, so they are not written
    either (a [gp, d] f32 partial per split costs gp/g times the traffic otherwise)."""
    if lead is not None:  # a static leading index, as a length-1 slice (what plgpu.store takes)
        o_ref, o = o_ref.at[pl.ds(lead, 1)], o[None]
    if g >= o.shape[-2]:
        o_ref[...] = o
    else:
        plgpu.store(o_ref, o, mask=lax.broadcasted_iota(jnp.int32, o.shape, o.ndim - 2) < g)
