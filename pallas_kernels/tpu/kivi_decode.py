"""Decode attention over a packed KIVI 2/4-bit KV cache, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.kivi_decode` (KIVI: Liu et al., arXiv 2402.02750;
layout kvjax/quant/LAYOUT.md: planar bit packing along head_dim, per-channel key scales over
G-token groups, per-token value scales over G-channel groups, fp key tail / value window).

Structure as `tpu.dense_decode`: grid (batch, kv_heads); k_len, v_len, lengths and starts are
scalar-prefetched into SMEM; the codes, scales and mins stay in HBM (`pl.ANY`) and are streamed
in `block_k`-token blocks (a multiple of G) by manual DMA into two-slot VMEM buffers (block j+1
is in flight while block j is consumed); only blocks holding live tokens of [starts, lengths)
are copied. The small fp residuals k_resid / v_resid ([R, head_dim] per head) come in as whole
VMEM blocks. The g query heads of a kv-head are one [g, head_dim] tile.

Dequantisation: the block is dequantised in VMEM, one planar bit-field at a time (field i of the
packed bytes is the contiguous channel range [i*P, (i+1)*P), P = bytes per row, so no lane
shuffles or concatenations are needed): codes = (bytes >> bits*i) & mask on int32, k_hat =
codes * k_scale + k_min with the block's per-channel key scales repeated over their G tokens
(sublane broadcasts),
v_hat = codes * v_scale + v_min with the per-token value scales broadcast over their G-channel
lanes; then s += q_field . k_hat_field^T and o_field += p . v_hat_field (MXU). Dequantising costs
one multiply-add per element on the VPU, the same order as the unpacking itself, and keeps every
dot a plain [g, P] x [P, block_k] / [g, block_k] x [block_k, P] matmul (scale folding into q
would need a different q per G-token group, i.e. G-wide dots). float16 scales travel as int16
bits (see `tpu.common`).

Token classes (t in the logical cache, LAYOUT.md): blocks entirely below min(k_len, v_len) are
"pure" (quantised key and value); blocks up to max(k_len, v_len) are "mixed": a token t >= k_len
takes its logit from the fp tail (q . k_resid^T computed once per head, moved to block position
by a 0/1 selection matmul) and a token t >= v_len adds its probability to a running weight
vector w [g, R] over v_resid rows (rescaled with the online softmax); the remaining fp tokens
[max(k_len, v_len), lengths) are one final step over k_resid; the output is o + w . v_resid.
For a LAYOUT-conformant cache the mixed blocks are the last ceil(R / block_k) + 1 ones.

Not measured on a TPU (none available when written); validated in TPU interpret mode only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import reference
from pallas_kernels.tpu import common

NEG_INF = reference.NEG_INF
_HI = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))   # contract the last dims: x [m, k] . y [n, k] -> [m, n]


def _kernel(kl_ref, vl_ref, len_ref, st_ref, q_ref, kr_ref, vr_ref,
            kc_hbm, ks_hbm, km_hbm, vc_hbm, vs_hbm, vm_hbm, o_ref,
            kcbuf, ksbuf, kmbuf, vcbuf, vsbuf, vmbuf, sem,
            *, block_k: int, group: int, k_bits: int, v_bits: int, f16_k: bool, f16_v: bool):
    b, h = pl.program_id(0), pl.program_id(1)
    k_len, v_len = kl_ref[b, h], vl_ref[b, h]
    length, first = len_ref[b, h], st_ref[b, h]
    bk, gs = block_k, group
    ngb = bk // gs                                       # key-scale rows (G-token groups) per block
    q = q_ref[...].astype(jnp.float32)                   # [g, d], pre-scaled
    g, d = q.shape
    r = kr_ref.shape[0]
    pk, pv = kcbuf.shape[2], vcbuf.shape[2]              # bytes per packed row = channels per field

    n_pure = jnp.minimum(jnp.minimum(k_len, v_len), length)   # tokens with quantised key and value
    n_quant = jnp.minimum(jnp.maximum(k_len, v_len), length)  # tokens with a quantised key or value
    b0 = lax.div(jnp.minimum(first, n_quant), bk)
    nb = lax.div(n_quant + bk - 1, bk)
    nb_pure = jnp.maximum(lax.div(n_pure, bk), b0)

    def copies(j, slot):
        t0 = pl.multiple_of(j * bk, bk)
        g0 = pl.multiple_of(j * ngb, ngb)
        srcs = ((kc_hbm, t0, bk, kcbuf), (ks_hbm, g0, ngb, ksbuf), (km_hbm, g0, ngb, kmbuf),
                (vc_hbm, t0, bk, vcbuf), (vs_hbm, t0, bk, vsbuf), (vm_hbm, t0, bk, vmbuf))
        return [pltpu.make_async_copy(src.at[b, h, pl.ds(start, n)], buf.at[slot], sem.at[i, slot])
                for i, (src, start, n, buf) in enumerate(srcs)]

    @pl.when(b0 < nb)
    def _():
        for c in copies(b0, 0):
            c.start()

    # fp key tail: logits of the R residual rows, computed once per head (rows past the live
    # tail are zeroed: they meet the 0/1 selection matmuls, where 0 * garbage could be NaN)
    s_res = lax.dot_general(q, kr_ref[...].astype(jnp.float32), _NT,
                            preferred_element_type=jnp.float32)          # [g, R]
    s_res = jnp.where(lax.broadcasted_iota(jnp.int32, (1, r), 1) < length - k_len, s_res, 0.0)

    def online(s, valid, m, l):
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        return p, alpha, m_new, alpha * l + p.sum(axis=1, keepdims=True)

    def field(codes_i32, i, bits):
        return ((codes_i32 >> (bits * i)) & ((1 << bits) - 1)).astype(jnp.float32)

    def value_lanes(x, i):
        """Per-token value stats x [bk, d/G] -> [bk, P] for the channels of field i."""
        lane = lax.broadcasted_iota(jnp.int32, (bk, pv), 1)      # channel i*pv + lane
        groups = range((i * pv) // gs, ((i + 1) * pv - 1) // gs + 1)
        out = jnp.broadcast_to(x[:, groups[0]:groups[0] + 1], (bk, pv))
        for gi in groups[1:]:
            out = jnp.where(lane >= gi * gs - i * pv, x[:, gi:gi + 1], out)
        return out

    def rep(x):
        """Per-group key stats x [bk/G, d] -> [bk, d]: row gi repeated over its G tokens
        (sublane broadcasts stacked at multiples of G, tile-aligned for G % 8 == 0)."""
        parts = [jnp.broadcast_to(x[gi:gi + 1], (gs, d)) for gi in range(ngb)]
        return parts[0] if ngb == 1 else jnp.concatenate(parts, axis=0)

    def body(j, carry, mixed: bool):
        o, w, m, l = carry
        slot = lax.rem(j - b0, 2)

        common.advance_double_buffer(copies, j, nb, slot)
        t = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)           # token ids, row
        t_col = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)       # token ids, column
        # keys: dequantise field by field, s = sum_i q_i . k_hat_i^T
        kc = kcbuf[slot].astype(jnp.int32)                                  # [bk, pk]
        ks = rep(common.load_f32(ksbuf[slot], f16_k))                       # [bk, d]
        km = rep(common.load_f32(kmbuf[slot], f16_k))
        s = jnp.zeros((g, bk), jnp.float32)
        for i in range(8 // k_bits):
            sl = slice(i * pk, (i + 1) * pk)
            k_hat = field(kc, i, k_bits) * ks[:, sl] + km[:, sl]
            s = s + lax.dot_general(q[:, sl], k_hat, _NT, preferred_element_type=jnp.float32)
        valid = t >= first
        valid_col = t_col >= first
        if mixed:
            valid &= t < n_quant
            valid_col &= t_col < n_quant
            sel_k = (lax.broadcasted_iota(jnp.int32, (r, bk), 0) == t - k_len).astype(jnp.float32)
            s_fp = jnp.dot(s_res, sel_k, precision=_HI, preferred_element_type=jnp.float32)
            s = jnp.where(t < k_len, s, s_fp)
        p, alpha, m, l = online(s, valid, m, l)
        # values: o_i += p_q . v_hat_i over the quantised values of the block
        vq_col = (valid_col & (t_col < v_len)) if mixed else valid_col
        p_q = jnp.where(t < v_len, p, 0.0) if mixed else p
        vc = vcbuf[slot].astype(jnp.int32)                                  # [bk, pv]
        vs = common.load_f32(vsbuf[slot], f16_v)                            # [bk, d/G]
        vm = common.load_f32(vmbuf[slot], f16_v)
        o_new = []
        for i in range(8 // v_bits):
            v_hat = field(vc, i, v_bits) * value_lanes(vs, i) + value_lanes(vm, i)
            v_hat = jnp.where(vq_col, v_hat, 0.0)    # masked rows may hold garbage: 0 * inf = NaN
            o_new.append(alpha * o[i] + jnp.dot(p_q, v_hat, preferred_element_type=jnp.float32))
        w = alpha * w
        if mixed:  # tokens whose value is in the fp window: weight on v_resid row t - v_len
            sel_v = (t_col - v_len == lax.broadcasted_iota(jnp.int32, (bk, r), 1)).astype(jnp.float32)
            w = w + jnp.dot(jnp.where(t >= v_len, p, 0.0), sel_v, precision=_HI,
                            preferred_element_type=jnp.float32)
        return tuple(o_new), w, m, l

    carry = (tuple(jnp.zeros((g, pv), jnp.float32) for _ in range(8 // v_bits)),
             jnp.zeros((g, r), jnp.float32), jnp.full((g, 1), NEG_INF, jnp.float32),
             jnp.zeros((g, 1), jnp.float32))
    carry = lax.fori_loop(b0, nb_pure, functools.partial(body, mixed=False), carry)
    carry = lax.fori_loop(nb_pure, nb, functools.partial(body, mixed=True), carry)
    o, w, m, l = carry

    # fp tokens [n_quant, lengths): key k_resid[t - k_len], value v_resid[t - v_len]
    t = k_len + lax.broadcasted_iota(jnp.int32, (1, r), 1)
    valid = (t >= n_quant) & (t < length) & (t >= first)
    p, alpha, m, l = online(s_res, valid, m, l)
    shift = (k_len - v_len + lax.broadcasted_iota(jnp.int32, (r, r), 0)
             == lax.broadcasted_iota(jnp.int32, (r, r), 1)).astype(jnp.float32)
    w = alpha * w + jnp.dot(p, shift, precision=_HI, preferred_element_type=jnp.float32)
    live = lax.broadcasted_iota(jnp.int32, (r, 1), 0) < length - v_len
    vr = jnp.where(live, vr_ref[...].astype(jnp.float32), 0.0)              # [R, d]
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    for i in range(8 // v_bits):
        sl = slice(i * pv, (i + 1) * pv)
        oi = alpha * o[i] + jnp.dot(w, vr[:, sl], precision=_HI, preferred_element_type=jnp.float32)
        o_ref[:, sl] = (oi * inv).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "v_bits", "group_size", "scale", "block_k",
                                             "interpret"))
def kivi_decode(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                k_len, v_len, lengths, starts=None, *, bits: int, group_size: int,
                v_bits: int | None = None, scale: float | None = None, block_k: int | None = None,
                interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Double-buffered KIVI decode; same contract as `reference.kivi_decode`
    (bits: key bits; v_bits: value bits, default = bits).

    block_k: tokens per DMA block, a multiple of 32 and of group_size; capacity_q is padded to a
    multiple of it if needed (a copy -- allocate capacity_q as a multiple of block_k). Default
    (None): the largest such multiple <= 256 dividing capacity_q (rounded up to one), so a cache
    whose capacity_q is a multiple of lcm(32, G) is never copied."""
    g = reference.check_kivi(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid,
                             v_resid, k_len, v_len, lengths, bits, group_size, v_bits)
    v_bits = bits if v_bits is None else v_bits
    b, hkv, capq, _ = k_codes.shape
    r, d = k_resid.shape[2], k_resid.shape[3]
    gs = group_size
    unit = 32 * gs // math.gcd(32, gs)                   # uint8 sublane tile and whole groups
    cap_u = -(-capq // unit) * unit
    if block_k is None:
        block_k = next(n * unit for n in range(max(256 // unit, 1), 0, -1) if cap_u % (n * unit) == 0)
    if block_k <= 0 or block_k % unit:
        raise ValueError(f"block_k must be a positive multiple of 32 and of group_size={gs}, got {block_k}")
    scale = d ** -0.5 if scale is None else scale
    bk = min(block_k, cap_u)
    pad = -capq % bk
    if pad:
        padt = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0)))
        k_codes, v_codes = padt(k_codes, pad), padt(v_codes, pad)
        k_scale, k_min = padt(k_scale, pad // gs), padt(k_min, pad // gs)
        v_scale, v_min = padt(v_scale, pad), padt(v_min, pad)
    if r == 0:  # no residual segment: one zero row keeps every block shape non-empty
        k_resid = jnp.zeros((b, hkv, 1, d), k_resid.dtype)
        v_resid = jnp.zeros((b, hkv, 1, d), v_resid.dtype)
        r = 1
    k_scale, k_min, f16_k = common.stat_pair(k_scale, k_min)
    v_scale, v_min, f16_v = common.stat_pair(v_scale, v_min)
    k_resid = k_resid if k_resid.dtype in (jnp.float32, jnp.bfloat16) else k_resid.astype(jnp.float32)
    v_resid = v_resid if v_resid.dtype in (jnp.float32, jnp.bfloat16) else v_resid.astype(jnp.float32)
    kl = jnp.clip(k_len, 0, capq).astype(jnp.int32)
    vl = jnp.clip(v_len, 0, capq).astype(jnp.int32)
    lens = jnp.clip(lengths, 0, capq + r).astype(jnp.int32)
    st = jnp.maximum(reference._starts(starts, lengths), 0).astype(jnp.int32)
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * scale
    head = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, *_: (i, h) + (0,) * len(shape))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, hkv),
        in_specs=[head(g, d), head(r, d), head(r, d)] + [pl.BlockSpec(memory_space=pl.ANY)] * 6,
        out_specs=head(g, d),
        scratch_shapes=[
            pltpu.VMEM((2, bk, k_codes.shape[-1]), k_codes.dtype),
            pltpu.VMEM((2, bk // gs, d), k_scale.dtype), pltpu.VMEM((2, bk // gs, d), k_min.dtype),
            pltpu.VMEM((2, bk, v_codes.shape[-1]), v_codes.dtype),
            pltpu.VMEM((2, bk, d // gs), v_scale.dtype), pltpu.VMEM((2, bk, d // gs), v_min.dtype),
            pltpu.SemaphoreType.DMA((6, 2)),
        ],
    )
    kernel = functools.partial(_kernel, block_k=bk, group=gs, k_bits=bits, v_bits=v_bits,
                               f16_k=f16_k, f16_v=f16_v)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_params(interpret),
        name=f"kvjax_kivi_k{bits}v{v_bits}_decode_tpu",
    )(kl, vl, lens, st, qg, k_resid, v_resid, k_codes, k_scale, k_min, v_codes, v_scale, v_min)
    return out.reshape(b, hkv * g, d)
