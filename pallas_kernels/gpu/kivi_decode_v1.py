"""Decode attention over a packed KIVI 2/4-bit KV cache (Pallas-Triton, GPU).

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750): keys quantised per channel over G-token groups, values per token over
G-channel groups, plus full-precision residual segments (K tail of 0..R-1 tokens, V window of
the R most recent tokens). Layout: kvjax/quant/LAYOUT.md (planar packing along head_dim).

The inner loop never materialises dequantised K or V; the scales are folded into the operands
(spec section 11):
  keys, group gamma:  s_t = sum_c (q_c * k_scale[gamma, c]) * code[t, c] + sum_c q_c * k_min[gamma, c]
  values, token t:    o_c = sum_t (p_t * v_scale[t, c // G]) * code[t, c] + sum_t p_t * v_min[t, c // G]
so each step is unpack (shift/and) -> convert -> tensor-core dot. The head_dim is processed in
"units" of W = min(bytes per row, G) channels: one unit is one contiguous byte range of the
packed row and one bit-field, and lies inside one value group, so every unit is a plain
[gp, W] x [W, G] (keys) or [gp, G] x [G, W] (values) dot with one scale vector.

Work split (flash-decoding): grid (batch, kv_heads, splits); the quantised-key groups [0, k_len/G)
are cut into `splits` ranges; each range runs a fast loop over groups whose values are also
quantised (t < v_len) and a mixed loop over the few groups that straddle v_len; the last split
also handles the fp key tail [k_len, lengths). Tokens whose value sits in the fp window use
v_resid. An XLA combine merges the splits.
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


def _unit_layout(d: int, bits: int, group: int):
    """Units of W channels: list of (unit, field, byte_offset, value_group)."""
    pbytes = d * bits // 8
    w = min(pbytes, group)
    units = []
    for field in range(8 // bits):
        for off in range(0, pbytes, w):
            u = len(units)
            units.append((u, field, off, (u * w) // group))
    return w, units


def _kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, kr_ref, vr_ref, len_ref,
            o_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int, kunits, vunits, num_splits: int,
            cdtype, sub: int):
    split = pl.program_id(2)
    k_len = len_ref[0]
    v_len = len_ref[1]
    length = len_ref[2]
    first = len_ref[3]
    n_units, gp, w = q_ref.shape      # key units (width w)
    wv = o_ref.shape[2]               # value units (width wv)
    r = kr_ref.shape[0]
    capq = kc_ref.shape[0]

    nq = k_len // group                      # groups with quantised keys
    per = pl.cdiv(nq, num_splits)
    lo = split * per
    hi = jnp.minimum(lo + per, nq)
    n_pure = jnp.minimum(v_len // group, hi)  # groups whose values are all quantised too

    qs = [q_ref[u] for u in range(n_units)]  # [gp, W] float32 each

    def field(codes_u8, f, bits):
        return ((codes_u8.astype(jnp.int32) >> (bits * f)) & ((1 << bits) - 1)).astype(jnp.float32)

    def key_scores_quant(j, t0):
        """s [gp, G] for quantised-key group j (tokens t0 .. t0+G)."""
        s = jnp.zeros((gp, group), jnp.float32)
        bias = jnp.zeros((gp,), jnp.float32)
        loaded = {}
        for u, f, off, _ in kunits:
            if off not in loaded:
                loaded[off] = kc_ref[pl.ds(t0, group), pl.ds(off, w)]
            code = field(loaded[off], f, k_bits).astype(cdtype)                    # [G, W]
            sc = ks_ref[j, pl.ds(u * w, w)].astype(jnp.float32)              # [W]
            mn = km_ref[j, pl.ds(u * w, w)].astype(jnp.float32)
            s += plgpu.dot((qs[u] * sc[None, :]).astype(cdtype), code, trans_b=True)
            bias += (qs[u] * mn[None, :]).sum(axis=1)
        return s + bias[:, None]

    def key_scores_resid(t):
        """s [gp, G] for fp-tail tokens t (vector), rows t - k_len of k_resid."""
        rows = jnp.clip(t - k_len, 0, r - 1)
        s = jnp.zeros((gp, group), jnp.float32)
        for u, _, _, _ in kunits:
            kr = kr_ref[rows, pl.ds(u * w, w)]
            s += plgpu.dot(qs[u].astype(kr.dtype), kr, trans_b=True)
        return s

    def value_quant(acc, p, t0, rowmask, gather_rows=None):
        """acc[u] += (p * v_scale) . code + (p . v_min) for quantised-value tokens."""
        if rowmask is not None:
            p = jnp.where(rowmask[None, :], p, 0.0)
        out = []
        loaded = {}
        for u, f, off, vg in vunits:
            if off not in loaded:
                if gather_rows is None:
                    loaded[off] = vc_ref[pl.ds(t0, group), pl.ds(off, wv)]
                else:
                    loaded[off] = vc_ref[gather_rows, pl.ds(off, wv)]
            code = field(loaded[off], f, v_bits).astype(cdtype)                    # [G, W]
            if gather_rows is None:
                sc = vs_ref[pl.ds(t0, group), vg].astype(jnp.float32)       # [G]
                mn = vm_ref[pl.ds(t0, group), vg].astype(jnp.float32)
            else:
                sc = vs_ref[gather_rows, vg].astype(jnp.float32)
                mn = vm_ref[gather_rows, vg].astype(jnp.float32)
            bias = (p * mn[None, :]).sum(axis=1)
            out.append(acc[u] + plgpu.dot((p * sc[None, :]).astype(cdtype), code)
                       + bias[:, None])
        return tuple(out)

    def value_resid(acc, p, t, rowmask):
        rows = jnp.clip(t - v_len, 0, r - 1)
        p = jnp.where(rowmask[None, :], p, 0.0)
        out = []
        for u, _, _, _ in vunits:
            vr = vr_ref[rows, pl.ds(u * wv, wv)]
            vr = jnp.where(rowmask[:, None], vr, jnp.zeros_like(vr))
            out.append(acc[u] + plgpu.dot(p.astype(vr.dtype), vr))
        return tuple(out)

    def pure_body(j, carry):
        acc, m, l = carry
        t0 = pl.multiple_of(j * group, group)
        s = key_scores_quant(j, t0)
        valid = t0 + lax.iota(jnp.int32, group) >= first
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        acc = tuple(a * alpha[:, None] for a in acc)
        acc = value_quant(acc, p, t0, None)
        return acc, m, l

    def super_body(jb, carry):
        """`sub` consecutive all-quantised groups in one iteration (more loads in flight)."""
        acc, m, l = carry
        j0 = lo + jb * sub
        ss = [key_scores_quant(j0 + k, pl.multiple_of((j0 + k) * group, group)) for k in range(sub)]
        ok = [(j0 + k) * group + lax.iota(jnp.int32, group) >= first for k in range(sub)]
        ss = [jnp.where(v[None, :], s, common.NEG_INF) for s, v in zip(ss, ok)]
        m_new = m
        for s in ss:
            m_new = jnp.maximum(m_new, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        ps = [jnp.where(v[None, :], jnp.exp2(s - m_new[:, None]), 0.0) for s, v in zip(ss, ok)]
        l = alpha * l + sum(p.sum(axis=1) for p in ps)
        acc = tuple(a * alpha[:, None] for a in acc)
        for k, p in enumerate(ps):
            acc = value_quant(acc, p, pl.multiple_of((j0 + k) * group, group), None)
        return acc, m_new, l

    def mixed_body(j, carry):
        acc, m, l = carry
        t0 = pl.multiple_of(j * group, group)
        t = t0 + lax.iota(jnp.int32, group)
        s = key_scores_quant(j, t0)
        valid = (t < length) & (t >= first)
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        acc = tuple(a * alpha[:, None] for a in acc)
        acc = value_quant(acc, p, t0, t < v_len)
        acc = value_resid(acc, p, t, (t >= v_len) & valid)
        return acc, m, l

    def tail_body(i, carry):
        acc, m, l = carry
        t = k_len + i * group + lax.iota(jnp.int32, group)
        s = key_scores_resid(t)
        valid = (t < length) & (t >= first)
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        acc = tuple(a * alpha[:, None] for a in acc)
        qrows = jnp.clip(t, 0, capq - 1)
        acc = value_quant(acc, p, None, (t < v_len) & valid, gather_rows=qrows)
        acc = value_resid(acc, p, t, (t >= v_len) & valid)
        return acc, m, l

    carry = (tuple(jnp.zeros((gp, wv), jnp.float32) for _ in range(len(vunits))),
             jnp.full((gp,), common.NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32))
    n_super = jnp.maximum(n_pure - lo, 0) // sub
    carry = lax.fori_loop(0, n_super, super_body, carry)
    carry = lax.fori_loop(lo + n_super * sub, n_pure, pure_body, carry)
    carry = lax.fori_loop(jnp.maximum(lo, n_pure), hi, mixed_body, carry)
    n_tail = jnp.where(split == num_splits - 1, pl.cdiv(jnp.maximum(length - k_len, 0), group), 0)
    acc, m, l = lax.fori_loop(0, n_tail, tail_body, carry)
    for u in range(len(vunits)):
        o_ref[u] = acc[u]
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("bits", "v_bits", "group_size", "scale", "num_splits", "groups_per_step",
                                             "num_warps", "num_stages", "interpret"))
def kivi_decode(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                k_len, v_len, lengths, starts=None, *, bits: int, group_size: int,
                v_bits: int | None = None, scale: float | None = None,
                num_splits: int | None = None, groups_per_step: int = 1, num_warps: int = 4,
                num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Fused KIVI decode; same contract as `pallas_kernels.reference.kivi_decode`
    (bits: key bits; v_bits: value bits, default = bits).

    groups_per_step: G-token groups processed per loop iteration in the all-quantised region
    (unrolled; more independent loads in flight per step). Defaults (1 group, 2 stages) are the
    ones measured on an H200 (BENCHMARKS.md, 2026-12-02): with 4 groups and 3 stages, Triton did
    not finish compiling the head_dim-128 4-bit kernel within 8 minutes."""
    g = reference.check_kivi(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid,
                             v_resid, k_len, v_len, lengths, bits, group_size, v_bits)
    v_bits = bits if v_bits is None else v_bits
    b, hkv, capq, _ = k_codes.shape
    r, d = k_resid.shape[2], k_resid.shape[3]
    if d & (d - 1) or group_size & (group_size - 1) or group_size < 16:
        raise ValueError(f"GPU KIVI kernel needs power-of-two head_dim and group_size >= 16, "
                         f"got head_dim={d}, group_size={group_size}")
    if r % group_size:
        raise ValueError(f"residual length R={r} must be a multiple of group_size={group_size}")
    w, kunits = _unit_layout(d, bits, group_size)
    wv, vunits = _unit_layout(d, v_bits, group_size)
    if min(w, wv) < 16:
        raise ValueError(f"unit width {min(w, wv)} < 16 (head_dim*bits/8 too small for a tensor-core dot)")
    scale = d ** -0.5 if scale is None else scale
    gp = common.padded_heads(g)
    qg = common.group_queries(q, hkv, scale, jnp.float32, gp)               # [b, h, gp, d]
    q_units = qg.reshape(b, hkv, gp, d // w, w).transpose(0, 1, 3, 2, 4)    # [b, h, U, gp, W]
    n_units = d // w
    splits = common.choose_splits(b, hkv, max(capq // group_size, 1), num_splits)
    st = jnp.maximum(reference._starts(starts, lengths), 0)
    lens = jnp.stack([k_len, v_len, lengths, st], axis=-1).astype(jnp.int32)
    cdtype = jnp.bfloat16 if k_resid.dtype == jnp.bfloat16 else jnp.float16
    kernel = functools.partial(_kernel, k_bits=bits, v_bits=v_bits, group=group_size,
                               kunits=kunits, vunits=vunits,
                               num_splits=splits, cdtype=cdtype,
                               sub=max(1, groups_per_step))
    pk = k_codes.shape[-1]
    ng = capq // group_size
    full = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, s: (i, h) + (0,) * len(shape))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            full(n_units, gp, w),
            full(capq, pk), full(ng, d), full(ng, d),
            full(capq, v_codes.shape[-1]), full(capq, d // group_size), full(capq, d // group_size),
            full(r, d), full(r, d),
            full(4),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, d // wv, gp, wv), lambda i, h, s: (i, h, s, 0, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, d // wv, gp, wv), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"kvjax_kivi_k{bits}v{v_bits}_decode",
    )(q_units, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid, lens)
    o = o.transpose(0, 1, 2, 4, 3, 5).reshape(b, hkv, splits, gp, d)
    return common.combine_splits(o, m, l, g).astype(q.dtype)
