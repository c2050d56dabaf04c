"""QJL key scores over packed sign-bit sketches (Pallas-Triton, GPU).

QJL (Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with
Zero Overhead", arXiv 2406.03482). Keys are stored as sign bits of a JL sketch S [d, m] of the
inlier part (outlier channels zeroed) plus sign bits of the outlier part against S[:, :m_out],
with the key norm and the outlier norm; outlier channels are chosen per G-token group. The
unbiased estimator (spec section 3) is

  <q,k> ~ sqrt(pi/2)/m     * ||k_in||  * sum_j  sign_j(k_in)  (S^T q_in)_j
        + sqrt(pi/2)/m_out * ||k_out|| * sum_j<m_out sign_j(k_out) (S^T q_out)_j .

Kernel structure: the query is projected once outside (S^T q in XLA, a tiny GEMM) with the
sketch columns permuted so that bit-field i of every packed byte (sketch indices 8*byte + i)
is one contiguous column range; inside, per G-token group, the group's outlier contribution
q_out S is rebuilt from n_out rank-1 rows of S (gathered by the group's outlier indices), the
packed bytes are unpacked field by field into +-1 tiles and the sums are tensor-core dots
[gp, m/8] x [m/8, G]. Grid (batch, kv_heads, token blocks); rows of padded query heads are
never stored.

Shapes: see `pallas_kernels.reference.qjl_scores`; out float32 [batch, q_heads, capacity].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels.gpu import common


def field_permutation(m: int):
    """Column order placing sketch index 8*byte + i at position i*(m/8) + byte."""
    m8 = m // 8
    return [8 * byte + i for i in range(8) for byte in range(m8)]


def _kernel(q_ref, qti_ref, si_ref, so_ref, ks_ref, kos_ref, kn_ref, kon_ref, oi_ref,
            len_ref, out_ref, *, group: int, groups_per_block: int, g: int, cdtype):
    blk = pl.program_id(2)
    length = len_ref[0]
    gp, d = q_ref.shape
    m8 = ks_ref.shape[1]
    mo8 = kos_ref.shape[1]
    n_out = oi_ref.shape[1]
    m, mo = 8 * m8, 8 * mo8
    c_in, c_out = math.sqrt(math.pi / 2) / m, math.sqrt(math.pi / 2) / mo
    first = blk * groups_per_block
    n_valid = jnp.clip(pl.cdiv(length, group) - first, 0, groups_per_block)
    rowmask = (lax.iota(jnp.int32, gp) < g)[:, None]
    qti = [qti_ref[:, pl.ds(i * m8, m8)] for i in range(8)]     # [gp, m/8] f32

    def body(jj, carry):
        j = first + jj
        t0 = pl.multiple_of(j * group, group)
        # per-group outlier projections q_out S (for both sketches), from n_out rank-1 rows
        sub_in = [jnp.zeros((gp, m8), jnp.float32) for _ in range(8)]
        add_out = [jnp.zeros((gp, mo8), jnp.float32) for _ in range(8)]
        cs = [oi_ref[j, o] for o in range(n_out)]
        for o in range(n_out):
            c = cs[o]
            qc = q_ref[:, pl.ds(c, 1)]                                 # [gp, 1]
            if o:  # a repeated index is one outlier channel (as in the reference's mask)
                dup = functools.reduce(jnp.logical_or, [cs[p] == c for p in range(o)])
                qc = jnp.where(dup, jnp.zeros_like(qc), qc)
            for i in range(8):
                sub_in[i] += qc * si_ref[pl.ds(c, 1), pl.ds(i * m8, m8)]
                add_out[i] += qc * so_ref[pl.ds(c, 1), pl.ds(i * mo8, mo8)]
        bytes_in = ks_ref[pl.ds(t0, group), :].astype(jnp.int32)          # [G, m/8]
        bytes_out = kos_ref[pl.ds(t0, group), :].astype(jnp.int32)        # [G, m_out/8]
        dot_in = jnp.zeros((gp, group), jnp.float32)
        dot_out = jnp.zeros((gp, group), jnp.float32)
        for i in range(8):
            sg = (2 * ((bytes_in >> i) & 1) - 1).astype(jnp.float32).astype(cdtype)
            dot_in += plgpu.dot((qti[i] - sub_in[i]).astype(cdtype), sg, trans_b=True)
            sg = (2 * ((bytes_out >> i) & 1) - 1).astype(jnp.float32).astype(cdtype)
            dot_out += plgpu.dot(add_out[i].astype(cdtype), sg, trans_b=True)
        kn = kn_ref[pl.ds(t0, group)].astype(jnp.float32)
        kon = kon_ref[pl.ds(t0, group)].astype(jnp.float32)
        kin = jnp.sqrt(jnp.maximum(kn * kn - kon * kon, 0.0))
        est = c_in * kin[None, :] * dot_in + c_out * kon[None, :] * dot_out
        valid = (t0 + lax.iota(jnp.int32, group) < length)[None, :]
        est = jnp.where(valid, est, reference.NEG_INF)
        plgpu.store(out_ref.at[:, pl.ds(jj * group, group)], est, mask=rowmask)
        return carry

    def fill(jj, carry):
        plgpu.store(out_ref.at[:, pl.ds(jj * group, group)],
                    jnp.full((gp, group), reference.NEG_INF, jnp.float32), mask=rowmask)
        return carry

    lax.fori_loop(0, n_valid, body, 0)
    lax.fori_loop(n_valid, groups_per_block, fill, 0)


@functools.partial(jax.jit, static_argnames=("group_size", "groups_per_block", "precise",
                                             "num_warps", "num_stages", "interpret"))
def qjl_scores(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx, sketch,
               lengths, *, group_size: int = 32, groups_per_block: int = 8, precise: bool = False,
               num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """QJL scores; same contract as `pallas_kernels.reference.qjl_scores`.

    precise: float32 (tf32 on GPU) dots instead of bf16 for the sign sums."""
    g = reference.check_qjl(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx,
                            sketch, lengths, group_size)
    b, hkv, cap, m8 = key_signs.shape
    d, m = sketch.shape
    mo = key_out_signs.shape[-1] * 8
    if m8 < 16 or mo // 8 < 16 or m8 & (m8 - 1) or (mo // 8) & (mo // 8 - 1):
        raise ValueError(f"GPU QJL kernel needs m/8 and m_out/8 powers of two >= 16, got m={m}, m_out={mo}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    ng = cap // group_size
    gpb = max(1, min(groups_per_block, ng))
    while ng % gpb:
        gpb -= 1
    gp = common.padded_heads(g)
    s = sketch.astype(jnp.float32)
    s_in = s[:, jnp.asarray(field_permutation(m))]
    s_out = s[:, :mo][:, jnp.asarray(field_permutation(mo))]
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qt_in = jnp.einsum("bhgd,dm->bhgm", qg, s_in, precision=lax.Precision.HIGHEST)
    cdtype = jnp.float32 if precise else jnp.bfloat16
    kernel = functools.partial(_kernel, group=group_size, groups_per_block=gpb, g=g, cdtype=cdtype)
    full = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, t: (i, h) + (0,) * len(shape))
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv, ng // gpb),
        in_specs=[
            full(gp, d), full(gp, m),
            pl.BlockSpec((d, m), lambda i, h, t: (0, 0)),
            pl.BlockSpec((d, mo), lambda i, h, t: (0, 0)),
            full(cap, m8), full(cap, mo // 8), full(cap), full(cap),
            full(ng, outlier_idx.shape[-1]), full(1),
        ],
        out_specs=pl.BlockSpec((None, None, gp, gpb * group_size), lambda i, h, t: (i, h, 0, t)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, gp, cap), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_qjl_scores",
    )(qg, qt_in, s_in, s_out, key_signs, key_out_signs, key_norms, key_out_norms,
      outlier_idx.astype(jnp.int32), lengths.astype(jnp.int32)[:, :, None])
    return out[:, :, :g].reshape(b, hkv * g, cap)
