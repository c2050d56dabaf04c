"""Decode attention over a packed KIVI 2/4-bit KV cache (Pallas-Triton, GPU).

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750): keys quantised per channel over G-token groups, values per token over
G-channel groups, plus full-precision residual segments (K tail of 0..R-1 tokens, V window of
the R most recent tokens). Layout: kvjax/quant/LAYOUT.md (planar packing along head_dim: bit
field f of byte j is channel j + f*P, P = head_dim*bits/8 bytes per row).

The inner loop never materialises dequantised K or V (spec section 11: scales folded into the
operands) and runs few, large tensor-core dots, like the bf16 kernel:

* Unpack without int->float conversion instructions: a code c becomes the fp16 number 1024 + c
  by bit operations, ((byte >> 4f) & mask) | 0x6400 reinterpreted as fp16 (exponent of 1024,
  ulp 1). The 1024 offset is removed in a bias computed from the same fp16-rounded operand, so
  it cancels exactly in real arithmetic.
* Keys, per tile of T = n*G tokens (n key groups): the per-channel scales of the n groups are
  folded into n copies of the query tile, stacked along M (the GQA heads of one kv-head are few,
  e.g. 4, and a tensor-core dot needs M >= 16, so stacking fills the rows padding would waste):
      A[(i, r), c] = fp16(q[r, c] * k_scale[group i, c])          [n*gq, d]
      S = A . (1024 + code)^T                                      [n*gq, T]   (one dot per bit field)
      s[r, t] = S[(group(t), r), t] + sum_c (q[r, c] k_min[group(t), c] - 1024 A[(group(t), r), c])
* Values: the per-token scales of the d/G value groups are folded into copies of p, stacked
  the same way (once per tile, shared by the bit fields):  B[(i, r), t] = fp16(p[r, t] * v_scale[t, group i]);
      o[r, c] += (B . (1024 + code))[(group(c), r), c] + sum_t (p[r, t] v_min[t, group(c)] - 1024 B[(group(c), r), t]).
  The accumulators are one [gq, P] tile per bit field (channels fP .. fP+P-1).
(A `fuse_fields=True` variant that joined the unpacked fields into one [T, d] operand ran
0.56-0.65x of bf16 on the H200 (issue 13), slower than the per-field dots: removed.)

Work split (flash-decoding): grid (batch, kv_heads, splits); the quantised-key groups [0, k_len/G)
are cut into `splits` ranges walked in tiles of n groups: full tiles whose values are quantised
too run a mask-free path; the rest (a range's last tile, tiles straddling v_len) run a masked
path with clamped row gathers; the last split also walks the fp key tail [k_len, lengths).
Values of tokens t >= v_len come from v_resid. An XLA combine merges the splits.
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

MAGIC = 0x6400  # fp16 bit pattern of 1024.0


def _magic(codes_u8, shift: int, bits: int):
    """Bit field at `shift` of every byte as fp16 1024 + code (bit operations only)."""
    x = ((codes_u8 >> shift) & ((1 << bits) - 1)).astype(jnp.int16)
    return lax.bitcast_convert_type(x | MAGIC, jnp.float16)


# Unpack modes of the stacked kernel (issue 13). Field f of a byte holds bits [f*bits, (f+1)*bits).
#   "shift": field -> fp16 1024 + code (shift, and, widen, or per value: `_magic`).
#   "mask":  field -> fp16 1024 + code * 2**(f*bits): the field is masked in place (no shift) and
#            the byte put under the exponent byte 0x64; the factor 2**(f*bits) is folded into the
#            scale (exact: a power of two). Plain bit operations (the interpret-mode path).
#   "asm":   "mask" computed by inline PTX on 4 codes at a time (FasterTransformer/BitDecoding
#            style): one prmt.b32 per 2 codes builds two fp16 lanes 0x64XX from two bytes, then
#            one and.b32 per field keeps that field's bits of both lanes -> 2 fp16 per
#            instruction (4-bit: 6 instructions per 8 values once ptxas shares the prmt of the
#            two fields, 8 if not). GPU only (not interpretable).
UNPACKS = ("shift", "mask", "asm")


def field_mask(f: int, bits: int) -> int:
    """32-bit and-mask of field f on two fp16 lanes 0x64XX: keeps the exponent byte and the field."""
    lane = 0xFF00 | (((1 << bits) - 1) << (f * bits))
    return lane | (lane << 16)


def _asm_source(bits: int, f: int) -> str:
    """PTX for Triton's elementwise inline asm with pack=4 and one fp16 output (field f):
    operand $2 is one b32 holding 4 code bytes e0..e3 (byte k = element k); the output is two b32
    registers $0, $1 holding the fp16 pairs (e0, e1) and (e2, e3) (low half = lower element).
    One asm per field (jax's multi-output inline asm lowering differs between versions); the
    fields repeat the same two prmt.b32, left to ptxas to share."""
    m = f"0x{field_mask(f, bits):08X}"
    # bytes {e0, 0x64, e1, 0x64} and {e2, 0x64, e3, 0x64}: selector nibble 5 = byte 1 of the
    # second operand (0x64), 0..3 = bytes of the codes word
    return "\n".join(["{", ".reg .b32 kvlo, kvhi;",
                      "prmt.b32 kvlo, $2, 0x64646464, 0x5150;",
                      "prmt.b32 kvhi, $2, 0x64646464, 0x5352;",
                      f"and.b32 $0, kvlo, {m};", f"and.b32 $1, kvhi, {m};", "}"])


def unpack_fields(codes_u8, bits: int, unpack: str):
    """codes [..] uint8 -> 8//bits fp16 arrays, one per bit field f: 1024 + code ("shift") or
    1024 + code * 2**(f*bits) ("mask", "asm"); all exact in fp16 (integers < 2048)."""
    n_f = 8 // bits
    if unpack == "shift":
        return [_magic(codes_u8, f * bits, bits) for f in range(n_f)]
    if unpack == "asm":
        spec = jax.ShapeDtypeStruct(codes_u8.shape, jnp.float16)
        return [plgpu.elementwise_inline_asm(_asm_source(bits, f), args=[codes_u8],
                                             constraints="=r,=r,r", pack=4,
                                             result_shape_dtypes=[spec])[0] for f in range(n_f)]
    x = codes_u8.astype(jnp.int16)
    return [lax.bitcast_convert_type((x & (((1 << bits) - 1) << (f * bits))) | MAGIC, jnp.float16)
            for f in range(n_f)]


def field_scales(bits: int, unpack: str):
    """Per field f, the exact factor applied to that field's dot output: an unpacked field is
    1024 + code * 2**(f*bits) ("mask", "asm"), so (dot - 1024 * sum) * 2**-(f*bits) = dot over
    the codes. Scaling the f32 dot output (not the fp16 operand) keeps small scales normal."""
    return [1.0 if unpack == "shift" else 2.0 ** -(f * bits) for f in range(8 // bits)]


def _select(stacked, slot_of_col):
    """stacked [n, gq, N], slot_of_col [N] int -> [gq, N]: column c taken from slot slot_of_col[c]."""
    n = stacked.shape[0]
    hit = lax.broadcasted_iota(jnp.int32, (n, 1, 1), 0) == slot_of_col[None, None, :]
    return jnp.where(hit, stacked, 0.0).sum(axis=0)


def _stacked_kernel(qf_ref, qrep_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, kr_ref, vr_ref,
            len_ref, o_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int, n_tile: int,
            v_slots: int, num_splits: int, unpack: str = "shift"):
    split = pl.program_id(2)
    k_len = len_ref[0]
    v_len = len_ref[1]
    length = len_ref[2]
    first = len_ref[3]
    n_ku, gq, _ = qf_ref.shape           # key units (bit fields), padded GQA rows
    n_vu = o_ref.shape[0]                # value units
    pk, pv = kc_ref.shape[1], vc_ref.shape[1]   # bytes per packed row = channels per bit field
    n_kf, n_vf = 8 // k_bits, 8 // v_bits
    rep = qrep_ref.shape[0] // gq
    n_vg = vs_ref.shape[1]               # value groups per row (d / G)
    r = kr_ref.shape[0]
    capq = kc_ref.shape[0]
    tile = n_tile * group
    f32, f16 = jnp.float32, jnp.float16

    nq = k_len // group                       # groups with quantised keys
    per = pl.cdiv(nq, num_splits)
    lo = split * per
    hi = jnp.minimum(lo + per, nq)
    n_pure = jnp.minimum(v_len // group, hi)   # groups whose values are quantised too

    qf = [qf_ref[u] for u in range(n_ku)]     # [gq, width] f32: query channels of key unit u
    qrep = qrep_ref[...]                      # [rep*gq, d] q repeated (fp segments' dots)
    tok_slot = lax.iota(jnp.int32, tile) // group

    col_groups = [(f * pv + lax.iota(jnp.int32, pv)) // group for f in range(n_vf)]
    k_fs, v_fs = field_scales(k_bits, unpack), field_scales(v_bits, unpack)

    def key_scores_quant(rows, grp):
        """[gq, tile] logits of the tile's tokens against quantised keys; grp: slot groups
        (a pl.ds for a full tile, else an int32 [n_tile] vector of clamped group indices)."""
        codes = kc_ref[rows, :]                                            # [tile, P] u8
        keys = unpack_fields(codes, k_bits, unpack)
        scs = [ks_ref[grp, pl.ds(f * pk, pk)] for f in range(n_kf)]  # [n, width]
        mns = [km_ref[grp, pl.ds(f * pk, pk)] for f in range(n_kf)]
        s_stacked = jnp.zeros((n_tile * gq, tile), f32)
        bias = jnp.zeros((n_tile, gq), f32)
        for u in range(n_ku):
            sc, mn = scs[u].astype(f32), mns[u].astype(f32)
            a = (qf[u][None, :, :] * sc[:, None, :]).astype(f16)          # [n, gq, width]
            # field u unpacks to 1024 + code * 2**(u*bits) ("mask"/"asm"): its dot output is
            # scaled by k_fs[u] = 2**-(u*bits) (exact), not the fp16 operand (no subnormals)
            bias += (qf[u][None, :, :] * mn[:, None, :]
                     - (1024.0 * k_fs[u]) * a.astype(f32)).sum(axis=2)
            s_u = plgpu.dot(a.reshape(n_tile * gq, a.shape[2]), keys[u], trans_b=True)
            s_stacked += s_u if k_fs[u] == 1.0 else s_u * k_fs[u]
        s3 = s_stacked.reshape(n_tile, gq, tile) + bias[:, :, None]
        return _select(s3, tok_slot)

    def key_scores_resid(t):
        """[gq, tile] logits against fp-tail keys k_resid[t - k_len]."""
        kr = kr_ref[jnp.clip(t - k_len, 0, r - 1), :]
        s = plgpu.dot(qrep.astype(kr.dtype), kr, trans_b=True)             # [rep*gq, tile]
        return _select(s.reshape(rep, gq, tile), jnp.zeros((tile,), jnp.int32))

    def value_quant(acc, p, rows):
        """acc[f] += p . v_hat over quantised values of rows (p already masked). The per-token
        scales of all d/G value groups are folded into one stacked copy of p per tile."""
        codes = vc_ref[rows, :]                                            # [tile, P] u8
        if v_slots == n_vg:
            sc, mn = vs_ref[rows, :], vm_ref[rows, :]                      # [tile, d/G]
        else:  # fewer value groups than the 16 dot rows need: repeat the last group
            rv = rows.start + lax.iota(jnp.int32, tile) if isinstance(rows, pl.Slice) else rows
            gids = jnp.minimum(lax.iota(jnp.int32, v_slots), n_vg - 1)
            sc, mn = vs_ref[rv[:, None], gids[None, :]], vm_ref[rv[:, None], gids[None, :]]
        sc, mn = sc.astype(f32).T, mn.astype(f32).T                        # [slots, tile]
        b = (p[None, :, :] * sc[:, None, :]).astype(f16)                  # [slots, gq, tile]
        if unpack == "shift":
            bias = [(p[None, :, :] * mn[:, None, :] - 1024.0 * b.astype(f32)).sum(axis=2)] * n_vu
        else:  # field u's dot is scaled by 2**-(u*bits): so is its 1024 offset
            pm, bsum = (p[None, :, :] * mn[:, None, :]).sum(axis=2), b.astype(f32).sum(axis=2)
            bias = [pm - (1024.0 * v_fs[u]) * bsum for u in range(n_vu)]
        b = b.reshape(v_slots * gq, tile)
        vals = unpack_fields(codes, v_bits, unpack)
        out = []
        for u in range(n_vu):
            o = plgpu.dot(b, vals[u])                                       # [slots*gq, width]
            if v_fs[u] != 1.0:
                o = o * v_fs[u]
            o3 = o.reshape(v_slots, gq, o.shape[1]) + bias[u][:, :, None]
            out.append(acc[u] + _select(o3, col_groups[u]))
        return tuple(out)

    def value_resid(acc, p, t, mask):
        """acc[f] += p . v_resid[t - v_len] for tokens in the fp value window (mask)."""
        rows = jnp.clip(t - v_len, 0, r - 1)
        p = jnp.where(mask[None, :], p, 0.0)
        prep = jnp.broadcast_to(p[None], (rep, gq, tile)).reshape(rep * gq, tile)
        out = []
        for u, vr in enumerate([vr_ref[rows, pl.ds(f * pv, pv)] for f in range(n_vf)]):
            vr = jnp.where(mask[:, None], vr, jnp.zeros_like(vr))
            o = plgpu.dot(prep.astype(vr.dtype), vr)
            w = o.shape[1]
            out.append(acc[u] + _select(o.reshape(rep, gq, w), jnp.zeros((w,), jnp.int32)))
        return tuple(out)

    def softmax(acc, m, l, s, valid):
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        return p, tuple(a * alpha[:, None] for a in acc), m, l

    def pure_body(i, carry):
        acc, m, l = carry
        j0 = lo + i * n_tile
        t0 = pl.multiple_of(j0 * group, group)
        s = key_scores_quant(pl.ds(t0, tile), pl.ds(j0, n_tile))
        p, acc, m, l = softmax(acc, m, l, s, t0 + lax.iota(jnp.int32, tile) >= first)
        return value_quant(acc, p, pl.ds(t0, tile)), m, l

    def mixed_body(i, carry):
        acc, m, l = carry
        j0 = start_mixed + i * n_tile
        t = j0 * group + lax.iota(jnp.int32, tile)
        grp = jnp.clip(j0 + lax.iota(jnp.int32, n_tile), 0, jnp.maximum(hi - 1, 0))
        rows = jnp.clip(t, 0, capq - 1)
        s = key_scores_quant(rows, grp)
        valid = (t < hi * group) & (t < length) & (t >= first)
        p, acc, m, l = softmax(acc, m, l, s, valid)
        acc = value_quant(acc, jnp.where((t < v_len)[None, :], p, 0.0), rows)
        return value_resid(acc, p, t, (t >= v_len) & valid), m, l

    def tail_body(i, carry):
        acc, m, l = carry
        t = k_len + i * tile + lax.iota(jnp.int32, tile)
        valid = (t < length) & (t >= first)
        p, acc, m, l = softmax(acc, m, l, key_scores_resid(t), valid)
        acc = value_quant(acc, jnp.where(((t < v_len) & valid)[None, :], p, 0.0),
                          jnp.clip(t, 0, capq - 1))
        return value_resid(acc, p, t, (t >= v_len) & valid), m, l

    carry = (tuple(jnp.zeros(o_ref.shape[1:], f32) for _ in range(n_vu)),
             jnp.full((gq,), common.NEG_INF, f32), jnp.zeros((gq,), f32))
    n_full = jnp.maximum(n_pure - lo, 0) // n_tile
    carry = lax.fori_loop(0, n_full, pure_body, carry)
    start_mixed = lo + n_full * n_tile
    carry = lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - start_mixed, 0), n_tile), mixed_body, carry)
    n_tail = jnp.where(split == num_splits - 1, pl.cdiv(jnp.maximum(length - k_len, 0), tile), 0)
    acc, m, l = lax.fori_loop(0, n_tail, tail_body, carry)
    for u in range(n_vu):
        o_ref[u] = acc[u]
    m_ref[...] = m
    l_ref[...] = l


def _unpack16(codes_u8, shift: int, bits: int):
    """Bit field at `shift` of every byte as its exact fp16 code value (magic-number unpack:
    bit operations and one exact fp16 subtraction, no int->float conversion)."""
    return _magic(codes_u8, shift, bits) - jnp.float16(1024.0)


def _dequant_kernel(qf_ref, qr_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, kr_ref, vr_ref,
                    len_ref, o_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int,
                    n_sub: int, num_splits: int, g: int):
    """One program = one (batch, kv-head, split). Loop steps are tiles of T = n_sub * G tokens:
    every bit field of the tile's codes is dequantised in registers to an fp16 [T, P] operand
    (scale/min rows of the tile's groups loaded once and broadcast over their tokens) and meets
    the un-stacked GQA query tile in one dot: n_kf key dots and n_vf value dots per tile (4 per
    128 tokens at 4 bits, as the stacked variant), no stacked copies and no selects.

    qf_ref [n_kf, gp, P_k] f16 (the query channels of each key bit field); qr_ref [gp, d] (query
    in the residual dtype); o_ref [n_vf, gp, P_v]: value field f = channels [f*P_v, (f+1)*P_v)."""
    split = pl.program_id(2)
    k_len, v_len, length, first = len_ref[0], len_ref[1], len_ref[2], len_ref[3]
    n_kf, gp, pk = qf_ref.shape
    n_vf, _, pv = o_ref.shape
    capq, ng, r = kc_ref.shape[0], ks_ref.shape[0], kr_ref.shape[0]
    tile = n_sub * group
    f32, f16 = jnp.float32, jnp.float16
    qf = [qf_ref[f] for f in range(n_kf)]
    qr = qr_ref[...]
    iota = lax.iota(jnp.int32, tile)

    def per_token(x):
        """[n_sub, P] rows of the tile's key groups -> [T, P] (each row repeated G times)."""
        return jnp.broadcast_to(x[:, None, :], (n_sub, group, x.shape[1])).reshape(tile, x.shape[1])

    def logits_quant(rows, grps):
        """[gp, T] logits against the dequantised keys of rows (grps: their n_sub groups)."""
        codes = kc_ref[rows, :]                                             # [T, P_k] u8
        s = jnp.zeros((gp, tile), f32)
        for f in range(n_kf):
            sc = per_token(ks_ref[grps, pl.ds(f * pk, pk)])                  # [T, P_k] f16
            mn = per_token(km_ref[grps, pl.ds(f * pk, pk)])
            k_hat = _unpack16(codes, f * k_bits, k_bits) * sc + mn
            s += plgpu.dot(qf[f], k_hat, trans_b=True)
        return s

    def per_channel(ref, rows, f):
        """The per-token value scales (or mins) of field f's channels: [T, P_v] or [T, 1]."""
        if group >= pv:  # the whole field lies in one value group
            return ref[rows, pl.ds(f * pv // group, 1)]
        k = pv // group
        x = ref[rows, pl.ds(f * k, k)]                                       # [T, k]
        return jnp.broadcast_to(x[:, :, None], (tile, k, group)).reshape(tile, pv)

    def values_quant(acc, p, rows):
        """acc[f] += p . v_hat[:, field f] over the quantised values of rows (p masked)."""
        codes = vc_ref[rows, :]                                             # [T, P_v] u8
        p16 = p.astype(f16)
        out = []
        for f in range(n_vf):
            v_hat = (_unpack16(codes, f * v_bits, v_bits) * per_channel(vs_ref, rows, f)
                     + per_channel(vm_ref, rows, f))
            out.append(acc[f] + plgpu.dot(p16, v_hat))
        return tuple(out)

    def values_resid(acc, p, rows):
        """acc[f] += p . v_resid[rows, field f's channels] (p masked to the fp window)."""
        out = []
        for f in range(n_vf):
            vr = vr_ref[rows, pl.ds(f * pv, pv)]                            # [T, P_v]
            out.append(acc[f] + plgpu.dot(p.astype(vr.dtype), vr))
        return tuple(out)

    def update(carry, s, valid):
        acc, m, l = carry
        p, alpha, m, l = common.online_softmax_step(s, valid, m, l)
        return p, (tuple(a * alpha[:, None] for a in acc), m, l)

    def pure_body(i, carry):
        """A tile whose keys and values are all quantised (only `first` masks)."""
        j0 = (base + i) * n_sub
        t0 = pl.multiple_of(j0 * group, tile)
        rows = pl.ds(t0, tile)
        p, (acc, m, l) = update(carry, logits_quant(rows, pl.ds(j0, n_sub)), t0 + iota >= first)
        return values_quant(acc, p, rows), m, l

    def mixed_body(i, carry):
        """A tile mixing quantised and fp keys/values (clamped row gathers)."""
        t0 = start_mixed + i * tile
        t = t0 + iota
        rows = jnp.clip(t, 0, capq - 1)
        grps = jnp.clip(t0 // group + lax.iota(jnp.int32, n_sub), 0, ng - 1)
        s_q = logits_quant(rows, grps)
        kr = kr_ref[jnp.clip(t - k_len, 0, r - 1), :]
        s_r = plgpu.dot(qr.astype(kr.dtype), kr, trans_b=True)
        s = jnp.where((t < k_len)[None, :], s_q, s_r)
        p, (acc, m, l) = update(carry, s, (t >= first) & (t < length))
        acc = values_quant(acc, jnp.where((t < v_len)[None, :], p, 0.0), rows)
        acc = values_resid(acc, jnp.where((t >= v_len)[None, :], p, 0.0),
                           jnp.clip(t - v_len, 0, r - 1))
        return acc, m, l

    # tiles lying wholly below k_len, v_len and length are split over the programs (those wholly
    # before `first` skipped); the rest (< one tile + R tokens) is the last split's mixed loop
    n_full = jnp.minimum(jnp.minimum(k_len, v_len), length) // tile
    base0 = jnp.minimum(first // tile, n_full)
    per = pl.cdiv(n_full - base0, num_splits)
    base = base0 + split * per
    n_steps = jnp.clip(n_full - base, 0, per)
    carry = (tuple(jnp.zeros((gp, pv), f32) for _ in range(n_vf)),
             jnp.full((gp,), common.NEG_INF, f32), jnp.zeros((gp,), f32))
    carry = lax.fori_loop(0, n_steps, pure_body, carry)
    start_mixed = n_full * tile
    n_mixed = jnp.where(split == num_splits - 1,
                        pl.cdiv(jnp.maximum(length - start_mixed, 0), tile), 0)
    acc, m, l = lax.fori_loop(0, n_mixed, mixed_body, carry)
    for f in range(n_vf):
        common.store_rows(o_ref, acc[f], g, lead=f)
    m_ref[...] = m
    l_ref[...] = l


def _full(*shape):
    """BlockSpec of a whole [..shape] slab of one (batch, kv-head) on a (b, h, split) grid."""
    return pl.BlockSpec((None, None) + shape, lambda i, h, s: (i, h) + (0,) * len(shape))


def _split_outputs(b, hkv, splits, inner):
    """out_specs / out_shape of (o [.., *inner], m, l) per (batch, kv-head, split)."""
    gq = inner[-2]
    specs = [pl.BlockSpec((None, None, None) + inner, lambda i, h, s: (i, h, s) + (0,) * len(inner)),
             pl.BlockSpec((None, None, None, gq), lambda i, h, s: (i, h, s, 0)),
             pl.BlockSpec((None, None, None, gq), lambda i, h, s: (i, h, s, 0))]
    shapes = [jax.ShapeDtypeStruct((b, hkv, splits) + inner, jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, splits, gq), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, splits, gq), jnp.float32)]
    return specs, shapes


VARIANTS = ("dequant", "stacked", "stacked_mask", "stacked_asm")
_STACKED_UNPACK = {"stacked": "shift", "stacked_mask": "mask", "stacked_asm": "asm"}


@functools.partial(jax.jit, static_argnames=("bits", "v_bits", "group_size", "scale", "num_splits",
                                             "tile_groups", "variant", "num_warps",
                                             "num_stages", "interpret"))
def kivi_decode(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                k_len, v_len, lengths, starts=None, *, bits: int, group_size: int,
                v_bits: int | None = None, scale: float | None = None,
                num_splits: int | None = None, tile_groups: int | None = None,
                variant: str = "stacked_asm", num_warps: int = 4, num_stages: int = 2,
                interpret: bool = False) -> jax.Array:
    """Fused KIVI decode; same contract as `pallas_kernels.reference.kivi_decode`
    (bits: key bits; v_bits: value bits, default = bits).

    variant "stacked_asm" (default; H200 2026-12-05: KIVI-4 276.6 us at 8x32K vs 301.1 for "stacked"
    and 285.7 for our bf16 kernel, 927.3 vs 1105.3 at 32x32K; KIVI-2 425.4 vs 450.3 -- BENCHMARKS.md):
    the stacked kernel (module docstring) with the shift-free unpack (`UNPACKS`): fields masked in
    place under the fp16 exponent byte 0x64, 2**-(f*bits) applied to each field's f32 dot output,
    the masking done in inline PTX (prmt.b32 + and.b32, 2 values per instruction); in interpret
    mode it runs "stacked_mask"'s plain bit operations (same results bit for bit).
    variant "stacked" / "stacked_mask": the same kernel with the shift unpack / the mask unpack in
    plain bit operations (kept for the A/B in benchmarks/decode.py).
    tile_groups = groups stacked per tile (default: enough for 16 dot rows).
    variant "dequant": per tile of tile_groups key groups (default 128 tokens), each bit
    field -> fp16 [tile, P] in registers (magic-number unpack, one fp16 multiply-add with the
    broadcast scale/min rows), one dot with the un-stacked GQA tile (>= 16 rows) per field.
    num_splits: split-K programs per (batch, kv-head) (default ~4 waves on 132 SMs)."""
    g = reference.check_kivi(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid,
                             v_resid, k_len, v_len, lengths, bits, group_size, v_bits)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    v_bits = bits if v_bits is None else v_bits
    b, hkv, capq, _ = k_codes.shape
    r, d = k_resid.shape[2], k_resid.shape[3]
    if d & (d - 1) or group_size & (group_size - 1) or group_size < 16:
        raise ValueError(f"GPU KIVI kernel needs power-of-two head_dim and group_size >= 16, "
                         f"got head_dim={d}, group_size={group_size}")
    if r % group_size:
        raise ValueError(f"residual length R={r} must be a multiple of group_size={group_size}")
    pk, pv = d * bits // 8, d * v_bits // 8
    if min(pk, pv) < 16:
        raise ValueError(f"packed row of {min(pk, pv)} bytes < 16 (head_dim*bits/8 too small for "
                         "a tensor-core dot)")
    if tile_groups is not None and (tile_groups < 1 or tile_groups & (tile_groups - 1)):
        raise ValueError(f"tile_groups must be a positive power of two, got {tile_groups}")
    scale = d ** -0.5 if scale is None else scale
    st = jnp.maximum(reference._starts(starts, lengths), 0)
    lens = jnp.stack([k_len, v_len, lengths, st], axis=-1).astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    arrays = (k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid)
    if variant in _STACKED_UNPACK:
        unpack = _STACKED_UNPACK[variant]
        unpack = "mask" if unpack == "asm" and interpret else unpack
        return _stacked_call(q, arrays, lens, g, bits, v_bits, group_size, scale, num_splits,
                             tile_groups, params, interpret, unpack)
    gp = common.padded_heads(g)
    n_sub = tile_groups or max(1, 128 // group_size)
    n_sub = min(n_sub, 1 << (max(capq // group_size, 1).bit_length() - 1))  # a tile fits the cache
    splits = common.choose_splits(b, hkv, max(capq // group_size // n_sub, 1), num_splits,
                                  waves=4)
    qg = common.group_queries(q, hkv, scale, jnp.float32, gp)                 # [b, h, gp, d]
    qf = qg.reshape(b, hkv, gp, 8 // bits, pk).transpose(0, 1, 3, 2, 4).astype(jnp.float16)
    kernel = functools.partial(_dequant_kernel, k_bits=bits, v_bits=v_bits, group=group_size,
                               n_sub=n_sub, num_splits=splits, g=g)
    ng, nvg = capq // group_size, d // group_size
    out_specs, out_shape = _split_outputs(b, hkv, splits, (8 // v_bits, gp, pv))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[_full(8 // bits, gp, pk), _full(gp, d), _full(capq, pk), _full(ng, d),
                  _full(ng, d), _full(capq, pv), _full(capq, nvg), _full(capq, nvg), _full(r, d),
                  _full(r, d), _full(4)],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=interpret,
        name=f"kvjax_kivi_k{bits}v{v_bits}_dequant_decode",
    )(qf, qg.astype(k_resid.dtype), *arrays, lens)
    o = o.transpose(0, 1, 2, 4, 3, 5).reshape(b, hkv, splits, gp, d)
    return common.combine_splits(o, m, l, g).astype(q.dtype)


def _stacked_call(q, arrays, lens, g, bits, v_bits, group_size, scale, num_splits, tile_groups,
                  params, interpret, unpack):
    """The "stacked" variant (module docstring): scales folded into stacked operand copies."""
    k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid = arrays
    b, hkv, capq, pk = k_codes.shape
    r, d = k_resid.shape[2], k_resid.shape[3]
    pv = v_codes.shape[3]
    gq = common.next_pow2(g)
    n_tile = tile_groups or max(1, 16 // gq)
    if n_tile * gq < 16:
        raise ValueError(f"stacked variant: tile_groups * {gq} must be >= 16, got {n_tile}")
    if capq < n_tile * group_size:  # tiny cache: pad to one tile (a copy of < one tile's bytes)
        pad = n_tile * group_size - capq
        padt = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0)))
        k_codes, v_codes = padt(k_codes, pad), padt(v_codes, pad)
        v_scale, v_min = padt(v_scale, pad), padt(v_min, pad)
        k_scale, k_min = padt(k_scale, pad // group_size), padt(k_min, pad // group_size)
        capq = n_tile * group_size
    v_slots = max(d // group_size, 16 // gq)
    rep = max(1, 16 // gq)
    qg = common.group_queries(q, hkv, scale, jnp.float32, gq)                # [b, h, gq, d]
    n_ku, n_vu = 8 // bits, 8 // v_bits
    q_units = qg.reshape(b, hkv, gq, n_ku, d // n_ku).transpose(0, 1, 3, 2, 4)
    q_rep = jnp.tile(qg, (1, 1, rep, 1)).astype(k_resid.dtype)               # [b, h, rep*gq, d]
    splits = common.choose_splits(b, hkv, max(capq // group_size, 1), num_splits)
    kernel = functools.partial(_stacked_kernel, k_bits=bits, v_bits=v_bits, group=group_size,
                               n_tile=n_tile, v_slots=v_slots, num_splits=splits, unpack=unpack)
    ng = capq // group_size
    out_specs, out_shape = _split_outputs(b, hkv, splits, (n_vu, gq, d // n_vu))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[
            _full(n_ku, gq, d // n_ku), _full(rep * gq, d),
            _full(capq, pk), _full(ng, d), _full(ng, d),
            _full(capq, pv), _full(capq, d // group_size), _full(capq, d // group_size),
            _full(r, d), _full(r, d),
            _full(4),
        ],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=interpret,
        name=f"kvjax_kivi_k{bits}v{v_bits}_decode" + ("" if unpack == "shift" else f"_{unpack}"),
    )(q_units, q_rep, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid, lens)
    o = o.transpose(0, 1, 2, 4, 3, 5).reshape(b, hkv, splits, gq, d)
    return common.combine_splits(o, m, l, g).astype(q.dtype)
