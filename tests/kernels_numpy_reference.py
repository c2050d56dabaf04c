"""Independent float64 numpy oracles and input builders for the decode-kernel tests.

Written from the formulas of the specs (FlashDecoding attention, KIVI per-channel/per-token
asymmetric quantisation in the packed layout of kvjax/quant/LAYOUT.md, QJL sign sketches),
sharing no code with pallas_kernels/.
"""
from __future__ import annotations

import numpy as np


def attention(q, keys, values, valid, scale):
    """q [hq, d]; keys/values [hkv, n, d] float64; valid [hkv, n] bool -> [hq, d] (zeros if none)."""
    hq, d = q.shape
    hkv = keys.shape[0]
    g = hq // hkv
    out = np.zeros((hq, values.shape[-1]))
    for h in range(hq):
        kv = h // g
        sel = valid[kv]
        if not sel.any():
            continue
        s = keys[kv][sel] @ q[h] * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ values[kv][sel]
    return out


def quantize_rtn(x, bits, axis):
    """Asymmetric min-max RTN along `axis` of x: returns codes (int), scale, min (float16-rounded)."""
    mn = x.min(axis=axis, keepdims=True)
    mx = x.max(axis=axis, keepdims=True)
    scale = ((mx - mn) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    mn = mn.astype(np.float16).astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.round((x - mn) / safe), 0, 2 ** bits - 1).astype(np.int64)
    codes = np.where(scale > 0, codes, 0)
    return codes, scale, mn


def pack_planar(codes, bits):
    """int codes [..., d] -> uint8 [..., d*bits/8]: byte j holds channel j + i*P in bits [bits*i, bits*(i+1))."""
    d = codes.shape[-1]
    f = 8 // bits
    p = d // f
    out = np.zeros(codes.shape[:-1] + (p,), np.int64)
    for i in range(f):
        out |= codes[..., i * p:(i + 1) * p] << (bits * i)
    return out.astype(np.uint8)


def make_kivi(rng, b, hkv, d, bits, group, r, capq, lengths, dtype_np=np.float32, v_bits=None):
    """Random KIVI cache following LAYOUT.md for per-head total lengths [b, hkv].

    k_len = lengths - lengths % r (whole R-blocks quantised); v_len = max(lengths - r, 0).
    Returns (arrays dict in numpy, dequantised keys/values [b, hkv, maxlen, d] float64)."""
    lengths = np.asarray(lengths)
    v_bits = bits if v_bits is None else v_bits
    k_len = lengths - lengths % r
    v_len = np.maximum(lengths - r, 0)
    assert k_len.max() <= capq and v_len.max() <= capq
    pk = d * bits // 8
    arr = dict(
        k_codes=np.zeros((b, hkv, capq, pk), np.uint8),
        k_scale=np.zeros((b, hkv, capq // group, d), np.float16),
        k_min=np.zeros((b, hkv, capq // group, d), np.float16),
        v_codes=np.zeros((b, hkv, capq, d * v_bits // 8), np.uint8),
        v_scale=np.zeros((b, hkv, capq, d // group), np.float16),
        v_min=np.zeros((b, hkv, capq, d // group), np.float16),
        k_resid=np.zeros((b, hkv, r, d), dtype_np),
        v_resid=np.zeros((b, hkv, r, d), dtype_np),
        k_len=k_len.astype(np.int32), v_len=v_len.astype(np.int32),
        lengths=lengths.astype(np.int32))
    maxlen = max(int(lengths.max()), 1)
    kt = np.zeros((b, hkv, maxlen, d))
    vt = np.zeros((b, hkv, maxlen, d))
    for i in range(b):
        for h in range(hkv):
            n = int(lengths[i, h])
            keys = rng.standard_normal((n, d)) + rng.standard_normal(d) * 2  # channel outliers
            vals = rng.standard_normal((n, d))
            kl, vl = int(k_len[i, h]), int(v_len[i, h])
            if kl:
                kg = keys[:kl].reshape(kl // group, group, d)
                c, s, m = quantize_rtn(kg, bits, axis=1)
                arr["k_codes"][i, h, :kl] = pack_planar(c.reshape(kl, d), bits)
                arr["k_scale"][i, h, :kl // group] = s[:, 0]
                arr["k_min"][i, h, :kl // group] = m[:, 0]
                kt[i, h, :kl] = (c * s + m).reshape(kl, d)
            kres = keys[kl:].astype(dtype_np)
            arr["k_resid"][i, h, :n - kl] = kres
            kt[i, h, kl:n] = kres.astype(np.float64)
            if vl:
                vg = vals[:vl].reshape(vl, d // group, group)
                c, s, m = quantize_rtn(vg, v_bits, axis=2)
                arr["v_codes"][i, h, :vl] = pack_planar(c.reshape(vl, d), v_bits)
                arr["v_scale"][i, h, :vl] = s[:, :, 0]
                arr["v_min"][i, h, :vl] = m[:, :, 0]
                vt[i, h, :vl] = (c * s + m).reshape(vl, d)
            vres = vals[vl:].astype(dtype_np)
            arr["v_resid"][i, h, :n - vl] = vres
            vt[i, h, vl:n] = vres.astype(np.float64)
    return arr, kt, vt


def pack_signs(signs_pm1):
    """+-1 [..., m] -> uint8 [..., m/8], sketch index j in byte j//8 bit j%8 (LSB first)."""
    bitsv = (signs_pm1 > 0).astype(np.int64)
    m = bitsv.shape[-1]
    bitsv = bitsv.reshape(bitsv.shape[:-1] + (m // 8, 8))
    return (bitsv << np.arange(8)).sum(-1).astype(np.uint8)


def make_qjl(rng, b, hkv, cap, d, m, m_out, group, n_out):
    """Random keys sketched as in QJL: returns (arrays dict, keys [b, hkv, cap, d], sketch [d, m])."""
    s = rng.standard_normal((d, m))
    keys = rng.standard_normal((b, hkv, cap, d))
    ng = cap // group
    oidx = np.zeros((b, hkv, ng, n_out), np.int32)
    signs_in = np.zeros((b, hkv, cap, m))
    signs_out = np.zeros((b, hkv, cap, m_out))
    norms = np.zeros((b, hkv, cap))
    onorms = np.zeros((b, hkv, cap))
    for i in range(b):
        for h in range(hkv):
            for gi in range(ng):
                kg = keys[i, h, gi * group:(gi + 1) * group]
                idx = np.argsort(-np.linalg.norm(kg, axis=0))[:n_out]
                oidx[i, h, gi] = idx
                mask = np.zeros(d)
                mask[idx] = 1
                k_in, k_out = kg * (1 - mask), kg * mask
                signs_in[i, h, gi * group:(gi + 1) * group] = np.where(k_in @ s >= 0, 1, -1)
                signs_out[i, h, gi * group:(gi + 1) * group] = np.where(k_out @ s[:, :m_out] >= 0, 1, -1)
                norms[i, h, gi * group:(gi + 1) * group] = np.linalg.norm(kg, axis=1)
                onorms[i, h, gi * group:(gi + 1) * group] = np.linalg.norm(k_out, axis=1)
    arr = dict(key_signs=pack_signs(signs_in), key_out_signs=pack_signs(signs_out),
               key_norms=norms.astype(np.float16), key_out_norms=onorms.astype(np.float16),
               outlier_idx=oidx, sketch=s.astype(np.float32))
    return arr, keys, s, signs_in, signs_out


def qjl_estimate(q, signs_in, signs_out, norms, onorms, oidx, s, group):
    """float64 QJL estimator, loops over tokens. q [hq, d]; per-kv-head arrays [hkv, cap, ...] -> [hq, cap]."""
    hq, d = q.shape
    hkv, cap, m = signs_in.shape
    m_out = signs_out.shape[-1]
    g = hq // hkv
    out = np.zeros((hq, cap))
    for h in range(hq):
        kv = h // g
        for t in range(cap):
            mask = np.zeros(d)
            mask[oidx[kv, t // group]] = 1
            qi, qo = q[h] * (1 - mask), q[h] * mask
            kin = np.sqrt(max(norms[kv, t] ** 2 - onorms[kv, t] ** 2, 0.0))
            out[h, t] = (np.sqrt(np.pi / 2) / m * kin * signs_in[kv, t] @ (s.T @ qi)
                         + np.sqrt(np.pi / 2) / m_out * onorms[kv, t] * signs_out[kv, t] @ (s[:, :m_out].T @ qo))
    return out
