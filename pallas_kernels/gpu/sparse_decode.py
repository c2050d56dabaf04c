"""Token- and page-sparse decode attention (Pallas-Triton, GPU): attend only to selected slots.

For Quest-style query-aware sparsity (Tang et al., "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference", arXiv 2406.10774) and any token-level selection (TokenSelect,
ShadowKV, NSA selected branch): each (batch, kv-head) brings its own list of slot indices; the
kernel gathers the selected K/V rows inside the loop (no gathered copy in HBM) and runs the
same split-K online softmax as the dense kernel, so the time is proportional to the number of
selected tokens, not to the cache capacity.

Page mode (`page_size` P > 1; Quest pages, NSA blocks): `indices` are page indices, page i
being slots [i*P, (i+1)*P) of the cache (the part past the capacity, or past the optional
per-head `lengths`, is masked), and `counts` counts pages. For P >= 16 every loop step reads
`block_k` slots as contiguous slices: `block_k // chunk` pages of `chunk = next_pow2(P)` rows
each when P <= block_k (one `pl.ds` load and one tensor-core dot per page, one online-softmax
update per step), or one `block_k`-row slice of a page when P > block_k. A slice that would run
past the capacity is shifted back to end at it and the rows outside the page are masked, so no
load leaves the cache. For 1 < P < 16 (below the smallest Triton dot) and with `row_gather=True`
the rows of the selected pages are gathered one by one as in token mode. Split-K is over steps.

Shapes: q [batch, q_heads, head_dim]; k, v [batch, kv_heads, capacity, head_dim];
indices [batch, kv_heads, n_selected] int32; counts [batch, kv_heads] int32 (the first counts
indices of a row are used); lengths optional [batch, kv_heads] -> out [batch, q_heads, head_dim].
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


def _range(n_steps, num_splits):
    """[lo, hi) of the loop steps of this program's split."""
    per = pl.cdiv(n_steps, num_splits)
    lo = pl.program_id(2) * per
    return lo, jnp.minimum(lo + per, n_steps)


def _init(gp, d):
    return (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), common.NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))


def _query(q_ref, dtype, g: int, gp: int, scale: float | None):
    """[gp, d] query tile of this program's kv-head. scale None: q_ref is the XLA-prepared
    [gp, d] tile (`common.group_queries`); else q_ref is the raw [q_heads, d] slab of the batch
    row, gathered, scaled by scale*log2(e) in f32 and zero-padded here (fused variant: no XLA op
    before the kernel; the same values as group_queries)."""
    if scale is None:
        return q_ref[...]
    hq = q_ref.shape[0]
    r = lax.iota(jnp.int32, gp)
    q = q_ref[jnp.minimum(pl.program_id(1) * g + r, hq - 1), :].astype(jnp.float32)
    return jnp.where((r < g)[:, None], q * (scale * common.LOG2E), 0.0).astype(dtype)


def _finish(outs, o, m, l, g: int):
    """Write the split's (o, m, l) partial (3 outputs), or with one output (the fused variant with
    one split) the normalised attention o / l itself, in the output dtype (no combine op)."""
    if len(outs) == 1:
        out = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
        common.store_rows(outs[0], out.astype(outs[0].dtype), g)
        return
    o_ref, m_ref, l_ref = outs
    common.store_rows(o_ref, o, g)
    m_ref[...] = m
    l_ref[...] = l


def _rows_kernel(q_ref, k_ref, v_ref, idx_ref, meta_ref, *outs, block_k: int,
                 num_splits: int, page_size: int, g: int, gp: int, q_scale: float | None):
    """Row gather: step j covers selected slots [j*block_k, (j+1)*block_k) of the row."""
    count, limit = meta_ref[0], meta_ref[1]  # selected indices; min(capacity, lengths)
    cap = k_ref.shape[0]
    n = idx_ref.shape[0]
    p = page_size
    n_pages = pl.cdiv(cap, p)
    lo, hi = _range(pl.cdiv(count * p, block_k), num_splits)
    q = _query(q_ref, k_ref.dtype, g, gp, q_scale)

    def body(j, carry):
        o, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        t = start + lax.iota(jnp.int32, block_k)
        if p == 1:
            slot = jnp.clip(idx_ref[pl.ds(start, block_k)], 0, cap - 1)
        else:  # slot t of the selection = offset t % P of page t // P
            page = jnp.clip(idx_ref[jnp.minimum(lax.div(t, p), n - 1)], 0, n_pages - 1)
            slot = page * p + lax.rem(t, p)
        valid = (t < count * p) & (slot < limit)
        rows = jnp.where(valid, slot, 0)
        kb = k_ref[rows, :]
        vb = v_ref[rows, :]
        s = plgpu.dot(q, kb, trans_b=True)
        p_, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        vb = jnp.where(valid[:, None], vb, jnp.zeros_like(vb))
        o = alpha[:, None] * o + plgpu.dot(p_.astype(vb.dtype), vb)
        return o, m, l

    o, m, l = lax.fori_loop(lo, hi, body, _init(*q.shape))
    _finish(outs, o, m, l, g)


def _pages_kernel(q_ref, k_ref, v_ref, idx_ref, meta_ref, *outs, block_k: int,
                  num_splits: int, page_size: int, chunk: int, g: int, gp: int,
                  q_scale: float | None):
    """Contiguous slices: a unit is `chunk` rows of one page (cpp units per page); a step is
    block_k // chunk units, each one pl.ds load of K and V and one dot."""
    count, limit = meta_ref[0], meta_ref[1]
    cap = k_ref.shape[0]
    n = idx_ref.shape[0]
    p = page_size
    n_pages = pl.cdiv(cap, p)
    cpp = -(-p // chunk)
    pps = block_k // chunk
    units = count * cpp
    lo, hi = _range(pl.cdiv(units, pps), num_splits)
    q = _query(q_ref, k_ref.dtype, g, gp, q_scale)
    r = lax.iota(jnp.int32, chunk)

    def body(j, carry):
        o, m, l = carry
        ss, vbs, valids = [], [], []
        for i in range(pps):
            u = j * pps + i
            pos, part = (u, 0) if cpp == 1 else (lax.div(u, cpp), lax.rem(u, cpp))
            page = jnp.clip(idx_ref[jnp.minimum(pos, n - 1)], 0, n_pages - 1)
            first = page * p + part * chunk  # first slot of the unit
            last = jnp.minimum(jnp.minimum(first + chunk, page * p + p), limit)
            last = jnp.where(u < units, last, first)
            src = jnp.minimum(first, cap - chunk)  # stay inside the cache: shift back, mask
            slot = src + r
            valid = (slot >= first) & (slot < last)
            kb = k_ref[pl.ds(src, chunk), :]
            vbs.append(jnp.where(valid[:, None], v_ref[pl.ds(src, chunk), :], 0).astype(kb.dtype))
            ss.append(jnp.where(valid[None, :], plgpu.dot(q, kb, trans_b=True), common.NEG_INF))
            valids.append(valid)
        m_new = m
        for s in ss:
            m_new = jnp.maximum(m_new, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        o = alpha[:, None] * o
        l = alpha * l
        for s, vb, valid in zip(ss, vbs, valids):
            pr = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
            l = l + pr.sum(axis=1)
            o = o + plgpu.dot(pr.astype(vb.dtype), vb)
        return o, m_new, l

    o, m, l = lax.fori_loop(lo, hi, body, _init(*q.shape))
    _finish(outs, o, m, l, g)


@functools.partial(jax.jit, static_argnames=("scale", "page_size", "block_k", "num_splits",
                                             "num_warps", "num_stages", "row_gather", "fused",
                                             "interpret"))
def sparse_decode(q, k, v, indices, counts, lengths=None, *, scale: float | None = None,
                  page_size: int = 1, block_k: int = 32, num_splits: int | None = None,
                  num_warps: int = 4, num_stages: int = 3, row_gather: bool = False,
                  fused: bool = False, interpret: bool = False) -> jax.Array:
    """Gathering split-K decode; same contract as `pallas_kernels.reference.sparse_decode`.

    Out-of-range indices are clamped to [0, cdiv(capacity, page_size)) (the reference does the
    same). block_k: selected slots per loop step (power of two >= 16); num_splits: split-K
    programs per (batch, kv-head) (default ~2 waves); row_gather: page mode with per-row
    gathers (the token-mode load) instead of contiguous page slices (always for page_size < 16).
    fused (issue 13): no XLA work around the kernel that a small selection cannot amortise: the
    query is gathered, scaled and padded inside the kernel (no `group_queries` op), and with one
    split (num_splits=1) the kernel writes the normalised output itself (no split partials, no
    combine op). The default path launches ~3 XLA ops besides the kernel."""
    g = reference.check_sparse(q, k, v, indices, counts, lengths, page_size)
    if indices.shape[2] == 0:  # nothing can be selected (a zero-width grid would not lower)
        return jnp.zeros(q.shape[:2] + v.shape[-1:], q.dtype)
    b, hkv, cap, d = k.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    n = indices.shape[2]
    p = page_size
    indices = indices.astype(jnp.int32)
    limit = jnp.full((b, hkv), cap, jnp.int32) if lengths is None else \
        jnp.clip(lengths.astype(jnp.int32), 0, cap)
    meta = jnp.stack([jnp.clip(counts.astype(jnp.int32), 0, n), limit], axis=-1)
    chunk = min(common.next_pow2(p), block_k)
    if p == 1 or p < 16 or row_gather:
        if n % block_k and p == 1:  # token mode loads block_k indices at once
            indices = jnp.pad(indices, ((0, 0), (0, 0), (0, -n % block_k)))
        n_steps = -(-n * p // block_k)
        kernel = functools.partial(_rows_kernel, page_size=p)
    else:
        if cap < chunk:  # tiny cache: pad so that a slice of `chunk` rows fits
            k = jnp.pad(k, ((0, 0), (0, 0), (0, chunk - cap), (0, 0)))
            v = jnp.pad(v, ((0, 0), (0, 0), (0, chunk - cap), (0, 0)))
        n_steps = -(-n * -(-p // chunk) // (block_k // chunk))
        kernel = functools.partial(_pages_kernel, page_size=p, chunk=chunk)
    cap_k, n_idx = k.shape[2], indices.shape[2]
    gp = common.padded_heads(g)
    splits = common.choose_splits(b, hkv, max(1, n_steps), num_splits)
    if fused:
        q_in, q_spec = q, pl.BlockSpec((None, q.shape[1], d), lambda i, h, s: (i, 0, 0))
    else:
        q_in = common.group_queries(q, hkv, scale, k.dtype, gp)
        q_spec = pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0))
    if fused and splits == 1:  # the normalised output, written by the kernel
        out_specs = [pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, gp, d), q.dtype)]
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b, hkv, splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        ]
    outs = pl.pallas_call(
        functools.partial(kernel, block_k=block_k, num_splits=splits, g=g, gp=gp,
                          q_scale=scale if fused else None),
        grid=(b, hkv, splits),
        in_specs=[
            q_spec,
            pl.BlockSpec((None, None, cap_k, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, cap_k, d), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, n_idx), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, 2), lambda i, h, s: (i, h, 0)),
        ],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_sparse_decode" if p == 1 else "kvjax_page_sparse_decode",
    )(q_in, k, v, indices, meta)
    if len(outs) == 1:  # [b, hkv, gp, d] -> [b, q_heads, d] (a slice copy only when gp > g)
        return outs[0][:, :, :g].reshape(b, hkv * g, d)
    return common.combine_splits(*outs, g).astype(q.dtype)
