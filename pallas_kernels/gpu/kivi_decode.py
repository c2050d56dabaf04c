"""Decode attention over a packed KIVI 2/4-bit KV cache (Pallas-Triton, GPU).

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750): keys quantised per channel over G-token groups, values per token over
G-channel groups, plus full-precision residual segments (K tail of 0..R-1 tokens, V window of
the R most recent tokens). Layout: kvjax/quant/LAYOUT.md (planar packing along head_dim).

The inner loop never materialises dequantised K or V, and never runs an int->float conversion
instruction (those issue at 1/8 of the integer rate on Hopper and bounded the first version of
this kernel at ~3 codes per cycle per SM). Codes are read as W-bit words (W = 16, or 8 for
small head_dim); a code c at bit offset o of a word becomes the fp16 number 1024 + c by pure
bit operations, ((word >> o) & mask) | 0x6400, reinterpreted as fp16 (exponent of 1024, ulp 1,
so 1024 + c is exact for c < 1024). The scales are folded into the fp16 operands and the 1024
offset is removed in the bias, using the same fp16-rounded operand, so the offset cancels
exactly in real arithmetic (spec section 11):

  keys, group gamma:  s_t = sum_c a_c * (1024 + code[t, c]) + sum_c (q_c * k_min[gamma, c] - 1024 a_c),
                      a_c = fp16(q_c * k_scale[gamma, c])
  values, token t:    o_c = sum_t b_t * (1024 + code[t, c]) + sum_t (p_t * v_min[t, c//G] - 1024 b_t),
                      b_t = fp16(p_t * v_scale[t, c//G])

A "piece" is the set of codes at one bit offset of every word of a row: for W = 16 and 4-bit
codes, the pieces are channels {2w}, {2w + d/2}, {2w + 1}, {2w + 1 + d/2} (w = 0 .. d/4-1).
Each key piece is one [gp, d/4] x [d/4, G] tensor-core dot against the matching (permuted,
prepared outside) query channels; each value unit (a piece restricted to the words of one
G-channel value group) is one [gp, G] x [G, words] dot; the value accumulators are in piece
order and are put back into channel order outside the kernel.

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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels.gpu import common

MAGIC = 0x6400  # fp16 bit pattern of 1024.0


def _word_bits(row_bytes: int, unit_bytes: int) -> int:
    """Word width (16, else 8) so that a dot over one unit has >= 16 words (tensor-core K/N >= 16)."""
    for w in (16, 8):
        if unit_bytes * 8 // w >= 16:
            return w
    raise ValueError(f"a unit of {unit_bytes} bytes of a {row_bytes}-byte packed row is too narrow "
                     "for a tensor-core dot (need >= 16 bytes: head_dim*bits/8 and group_size "
                     "large enough)")


def _pieces(d: int, bits: int, word: int, group: int, split_by_group: bool):
    """Units of one packed row: list of (word0, n_words, shift, channels [n_words] np.int64).

    Word w of the row holds bytes (word/8)*w + e; the code at bit shift b*k of a word is
    channel (word/8)*w + e + f*P with e = (b*k)//8, f = k % (8/b), P = d*b/8 bytes per row.
    split_by_group: cut word ranges so that every unit lies in one G-channel group (values)."""
    row_bytes = d * bits // 8
    bpw = word // 8
    n_words = row_bytes // bpw
    per = min(n_words, group // bpw) if split_by_group else n_words
    units = []
    for w0 in range(0, n_words, per):
        for k in range(word // bits):
            e, f = (bits * k) // 8, k % (8 // bits)
            chans = bpw * np.arange(w0, w0 + per) + e + f * row_bytes
            units.append((w0, per, bits * k, chans))
    return units


def _as_words(codes: jax.Array, word: int) -> jax.Array:
    """uint8 [..., P] -> int8 [..., P] or int16 [..., P/2] (little-endian pairs; a bitcast)."""
    if word == 8:
        return lax.bitcast_convert_type(codes, jnp.int8)
    return lax.bitcast_convert_type(codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2)),
                                    jnp.int16)


def _magic(words, shift: int, bits: int):
    """Codes at bit `shift` of every word as fp16 1024 + code (bit operations only)."""
    x = (words >> shift) & ((1 << bits) - 1)
    if x.dtype != jnp.int16:
        x = x.astype(jnp.int16)
    return lax.bitcast_convert_type(x | MAGIC, jnp.float16)


def _cols(chans):
    """In-kernel int32 vector of a unit's channels (an arithmetic progression)."""
    step = int(chans[1] - chans[0]) if len(chans) > 1 else 1
    return int(chans[0]) + step * lax.iota(jnp.int32, len(chans))


def _kernel(qk_ref, qn_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, kr_ref, vr_ref,
            len_ref, o_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int, kunits,
            vunits, num_splits: int, sub: int):
    split = pl.program_id(2)
    k_len = len_ref[0]
    v_len = len_ref[1]
    length = len_ref[2]
    first = len_ref[3]
    gp = qn_ref.shape[0]
    r = kr_ref.shape[0]
    capq = kc_ref.shape[0]
    kw = kc_ref.shape[1]               # key words per row

    nq = k_len // group                      # groups with quantised keys
    per = pl.cdiv(nq, num_splits)
    lo = split * per
    hi = jnp.minimum(lo + per, nq)
    n_pure = jnp.minimum(v_len // group, hi)  # groups whose values are all quantised too

    qks = [qk_ref[u] for u in range(len(kunits))]   # [gp, n_words] f32, channels of key unit u
    qn = qn_ref[...]                                 # [gp, d] f32, natural channel order
    v_groups = sorted({int(ch[0]) // group for _, _, _, ch in vunits})

    def key_scores_quant(j, t0):
        """s [gp, G] for quantised-key group j (tokens t0 .. t0+G)."""
        words = kc_ref[pl.ds(t0, group), pl.ds(0, kw)]                        # [G, kw]
        s = jnp.zeros((gp, group), jnp.float32)
        bias = jnp.zeros((gp,), jnp.float32)
        for u, (_, _, shift, chans) in enumerate(kunits):
            cols = _cols(chans)
            sc = ks_ref[j, cols].astype(jnp.float32)                          # [n_words]
            mn = km_ref[j, cols].astype(jnp.float32)
            a = (qks[u] * sc[None, :]).astype(jnp.float16)
            s += plgpu.dot(a, _magic(words, shift, k_bits), trans_b=True)
            bias += (qks[u] * mn[None, :] - 1024.0 * a.astype(jnp.float32)).sum(axis=1)
        return s + bias[:, None]

    def key_scores_resid(t):
        """s [gp, G] for fp-tail tokens t (vector), rows t - k_len of k_resid."""
        rows = jnp.clip(t - k_len, 0, r - 1)
        kr = kr_ref[rows, :]
        return plgpu.dot(qn.astype(kr.dtype), kr, trans_b=True)

    def value_quant(acc, p, t0, rowmask, gather_rows=None):
        """acc[u] += sum_t b_t (1024 + code) + bias for quantised-value tokens."""
        if rowmask is not None:
            p = jnp.where(rowmask[None, :], p, 0.0)
        rows = pl.ds(t0, group) if gather_rows is None else gather_rows
        folded = {}
        for vg in v_groups:
            sc = vs_ref[rows, vg].astype(jnp.float32)                         # [G]
            mn = vm_ref[rows, vg].astype(jnp.float32)
            bp = (p * sc[None, :]).astype(jnp.float16)
            bias = (p * mn[None, :] - 1024.0 * bp.astype(jnp.float32)).sum(axis=1)
            folded[vg] = (bp, bias)
        out = []
        loaded = {}
        for u, (w0, nw, shift, chans) in enumerate(vunits):
            if w0 not in loaded:
                loaded[w0] = vc_ref[rows, pl.ds(w0, nw)]                       # [G, nw]
            bp, bias = folded[int(chans[0]) // group]
            out.append(acc[u] + plgpu.dot(bp, _magic(loaded[w0], shift, v_bits)) + bias[:, None])
        return tuple(out)

    def value_resid(acc, p, t, rowmask):
        rows = jnp.clip(t - v_len, 0, r - 1)
        p = jnp.where(rowmask[None, :], p, 0.0)
        out = []
        for u, (_, _, _, chans) in enumerate(vunits):
            cols = _cols(chans)
            vr = vr_ref[rows[:, None], cols[None, :]]                          # [G, nw]
            vr = jnp.where(rowmask[:, None], vr, jnp.zeros_like(vr))
            out.append(acc[u] + plgpu.dot(p.astype(vr.dtype), vr))
        return tuple(out)

    def super_body(jb, carry):
        """`sub` consecutive all-quantised groups per iteration (one softmax rescale for all)."""
        acc, m, l = carry
        j0 = lo + jb * sub
        ss, ok = [], []
        for k in range(sub):
            t0 = pl.multiple_of((j0 + k) * group, group)
            ss.append(key_scores_quant(j0 + k, t0))
            ok.append(t0 + lax.iota(jnp.int32, group) >= first)
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

    def pure_body(j, carry):
        acc, m, l = carry
        t0 = pl.multiple_of(j * group, group)
        s = key_scores_quant(j, t0)
        valid = t0 + lax.iota(jnp.int32, group) >= first
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        acc = tuple(a * alpha[:, None] for a in acc)
        return value_quant(acc, p, t0, None), m, l

    carry = (tuple(jnp.zeros((gp, nw), jnp.float32) for _, nw, _, _ in vunits),
             jnp.full((gp,), common.NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32))
    n_super = jnp.maximum(n_pure - lo, 0) // sub if sub > 1 else 0
    if sub > 1:
        carry = lax.fori_loop(0, n_super, super_body, carry)
    carry = lax.fori_loop(lo + n_super * sub, n_pure, pure_body, carry)
    carry = lax.fori_loop(jnp.maximum(lo, n_pure), hi, mixed_body, carry)
    n_tail = jnp.where(split == num_splits - 1, pl.cdiv(jnp.maximum(length - k_len, 0), group), 0)
    acc, m, l = lax.fori_loop(0, n_tail, tail_body, carry)
    for u in range(len(vunits)):
        o_ref[u] = acc[u]
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("bits", "v_bits", "group_size", "scale", "num_splits",
                                             "groups_per_step", "num_warps", "num_stages",
                                             "interpret"))
def kivi_decode(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                k_len, v_len, lengths, starts=None, *, bits: int, group_size: int,
                v_bits: int | None = None, scale: float | None = None,
                num_splits: int | None = None, groups_per_step: int = 1, num_warps: int = 4,
                num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Fused KIVI decode; same contract as `pallas_kernels.reference.kivi_decode`
    (bits: key bits; v_bits: value bits, default = bits).

    groups_per_step: G-token groups processed per loop iteration in the all-quantised region
    (unrolled, one softmax rescale per iteration)."""
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
    kbytes, vbytes = d * bits // 8, d * v_bits // 8
    kword = _word_bits(kbytes, kbytes)
    vword = _word_bits(vbytes, min(vbytes, group_size))
    kunits = _pieces(d, bits, kword, group_size, split_by_group=False)
    vunits = _pieces(d, v_bits, vword, group_size, split_by_group=True)
    kperm = np.concatenate([ch for _, _, _, ch in kunits])
    vperm = np.concatenate([ch for _, _, _, ch in vunits])
    scale = d ** -0.5 if scale is None else scale
    gp = common.padded_heads(g)
    qg = common.group_queries(q, hkv, scale, jnp.float32, gp)                # [b, h, gp, d]
    nkw = len(kunits[0][3])
    q_units = qg[..., kperm].reshape(b, hkv, gp, len(kunits), nkw).transpose(0, 1, 3, 2, 4)
    splits = common.choose_splits(b, hkv, max(capq // group_size, 1), num_splits)
    st = jnp.maximum(reference._starts(starts, lengths), 0)
    lens = jnp.stack([k_len, v_len, lengths, st], axis=-1).astype(jnp.int32)
    kernel = functools.partial(_kernel, k_bits=bits, v_bits=v_bits, group=group_size,
                               kunits=kunits, vunits=vunits, num_splits=splits,
                               sub=max(1, groups_per_step))
    kc = _as_words(k_codes, kword)
    vc = _as_words(v_codes, vword)
    ng = capq // group_size
    nvu, nvw = len(vunits), len(vunits[0][3])
    full = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, s: (i, h) + (0,) * len(shape))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            full(len(kunits), gp, nkw), full(gp, d),
            full(capq, kc.shape[-1]), full(ng, d), full(ng, d),
            full(capq, vc.shape[-1]), full(capq, d // group_size), full(capq, d // group_size),
            full(r, d), full(r, d),
            full(4),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, nvu, gp, nvw), lambda i, h, s: (i, h, s, 0, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, nvu, gp, nvw), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"kvjax_kivi_k{bits}v{v_bits}_decode",
    )(q_units, qg, kc, k_scale, k_min, vc, v_scale, v_min, k_resid, v_resid, lens)
    o = o.transpose(0, 1, 2, 4, 3, 5).reshape(b, hkv, splits, gp, d)
    o = o[..., np.argsort(vperm)]                                            # piece order -> channels
    return common.combine_splits(o, m, l, g).astype(q.dtype)
