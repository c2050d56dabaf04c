"""QJL key scores over packed sign-bit sketches, Pallas-Mosaic (TPU).

Same contract as `pallas_kernels.reference.qjl_scores` (QJL: Zandieh, Daliri, Han, arXiv
2406.03482). With S [d, m] the JL sketch, O the outlier channels of a key's G-token group,
q_out = q on O (zero elsewhere) and q_in = q - q_out:

  est = sqrt(pi/2)/m     * ||k_in||  * <sign(k_in S),  S^T q - S^T q_out>
      + sqrt(pi/2)/m_out * ||k_out|| * <sign(k_out S'), S'^T q_out>,      S' = S[:, :m_out],

and S^T q_out = sum_{c in O} q_c S[c, :] is a sum of |O| rows of S (rank-1 updates, no [d, m]
matmul per group).

Kernel structure: grid (batch, kv_heads, token blocks of `block_t` = several G-token groups);
lengths are scalar-prefetched and the index maps of the inputs clamp the block index to the last
live block, so the pipeline issues no new DMA for blocks past `lengths` (those only write
NEG_INF). S^T q (the same for every block) is one small XLA matmul outside, with the sketch
columns permuted so that bit i of every packed byte (sketch index 8*byte + i) is one contiguous
range of m/8 columns: unpacking bit i of a [block_t, m/8] byte tile ((bytes >> i) & 1 on int32)
gives +-1 signs that meet q's projection as a plain MXU dot, 8 dots per block. The per-group
outlier terms use the same dots: the g query heads (padded to gp, a multiple of 8) of every group
in the block are stacked into one [groups * gp, m] operand (rows S[c, :] gathered by dynamic
sublane loads with the outlier indices, which come in per block through SMEM), dotted against
the whole block's signs, and each token keeps the row-block of its own group (a select and a sum
over groups, no lane shuffles). The outputs of the g real heads are written lane-dense
([g, block_t] per step, block_t a multiple of 128 or the whole capacity). float16 norms
travel as int16 bits (see `tpu.common`).

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
_NT = (((1,), (1,)), ((), ()))   # contract the last dims


def bit_major_columns(m: int) -> jnp.ndarray:
    """Permutation placing sketch column 8*byte + i at position i*(m/8) + byte."""
    m8 = m // 8
    return (8 * jnp.arange(m8)[None, :] + jnp.arange(8)[:, None]).reshape(-1)


def _kernel(len_ref, q_ref, qt_ref, s_in_ref, s_out_ref, si_ref, so_ref, kn_ref, kon_ref, oi_ref,
            o_ref, *, group: int, f16_norms: bool):
    b, h, blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b, h]
    g, bt = o_ref.shape
    gp, d = q_ref.shape
    ngb, n_out = oi_ref.shape
    m8, mo8 = si_ref.shape[1], so_ref.shape[1]
    c_in, c_out = math.sqrt(math.pi / 2) / (8 * m8), math.sqrt(math.pi / 2) / (8 * mo8)
    t = blk * bt + lax.broadcasted_iota(jnp.int32, (1, bt), 1)

    @pl.when(blk * bt >= length)
    def _():
        o_ref[...] = jnp.full((g, bt), NEG_INF, jnp.float32)

    @pl.when(blk * bt < length)
    def _():
        q = q_ref[...].astype(jnp.float32)                               # [gp, d]
        lane = lax.broadcasted_iota(jnp.int32, (gp, d), 1)
        # S^T q_out per group, stacked: rows [gi*gp, (gi+1)*gp) belong to group gi of the block
        u_in, u_out = [], []
        for gi in range(ngb):
            cs = [oi_ref[gi, o] for o in range(n_out)]
            ui = jnp.zeros((gp, 8 * m8), jnp.float32)
            uo = jnp.zeros((gp, 8 * mo8), jnp.float32)
            for o, c in enumerate(cs):
                # a repeated index is one outlier channel (a set, as in the reference's mask);
                # an index outside [0, d) selects nothing
                dup = functools.reduce(jnp.logical_or, [cs[p] == c for p in range(o)], c != c)
                c_sel = jnp.where(dup, -1, c)
                qc = jnp.where(lane == c_sel, q, 0.0).sum(axis=1, keepdims=True)   # [gp, 1] = q[:, c]
                row = jnp.clip(c, 0, d - 1)
                ui = ui + qc * s_in_ref[pl.ds(row, 1), :]
                uo = uo + qc * s_out_ref[pl.ds(row, 1), :]
            u_in.append(ui)
            u_out.append(uo)
        u_in = jnp.concatenate(u_in, axis=0)                              # [ngb*gp, m]
        u_out = jnp.concatenate(u_out, axis=0)                            # [ngb*gp, m_out]
        qt = qt_ref[...]                                                  # [gp, m]  (S^T q)
        bytes_in = si_ref[...].astype(jnp.int32)                          # [bt, m/8]
        bytes_out = so_ref[...].astype(jnp.int32)                         # [bt, m_out/8]
        dot_all = jnp.zeros((gp, bt), jnp.float32)
        dot_grp = jnp.zeros((ngb * gp, bt), jnp.float32)
        dot_out = jnp.zeros((ngb * gp, bt), jnp.float32)
        for i in range(8):
            sg = (2 * ((bytes_in >> i) & 1) - 1).astype(jnp.float32)    # [bt, m/8], +-1
            dot_all += lax.dot_general(qt[:, i * m8:(i + 1) * m8], sg, _NT,
                                       preferred_element_type=jnp.float32)
            dot_grp += lax.dot_general(u_in[:, i * m8:(i + 1) * m8], sg, _NT,
                                       preferred_element_type=jnp.float32)
            sg = (2 * ((bytes_out >> i) & 1) - 1).astype(jnp.float32)
            dot_out += lax.dot_general(u_out[:, i * mo8:(i + 1) * mo8], sg, _NT,
                                       preferred_element_type=jnp.float32)
        # every token keeps the row-block of its own group
        first_tok = lax.broadcasted_iota(jnp.int32, (ngb, 1, bt), 0) * group
        tok = lax.broadcasted_iota(jnp.int32, (ngb, 1, bt), 2)
        own = (tok >= first_tok) & (tok < first_tok + group)
        pick = lambda x: jnp.where(own, x.reshape(ngb, gp, bt), 0.0).sum(axis=0)
        dot_in = dot_all - pick(dot_grp)
        kn = common.load_f32(kn_ref[...], f16_norms)                      # [1, bt]
        kon = common.load_f32(kon_ref[...], f16_norms)
        kin = jnp.sqrt(jnp.maximum(kn * kn - kon * kon, 0.0))
        est = c_in * kin * dot_in + c_out * kon * pick(dot_out)
        o_ref[...] = jnp.where(t < length, est, NEG_INF)[:g]


@functools.partial(jax.jit, static_argnames=("group_size", "block_t", "interpret"))
def qjl_scores(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx, sketch,
               lengths, *, group_size: int = 32, block_t: int = 256,
               interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """QJL scores; same contract as `reference.qjl_scores`.

    block_t: tokens per grid step, rounded to a multiple of 128 tokens made of whole G-token
    groups dividing the capacity (the whole capacity when none does), so no input is padded or
    copied."""
    g = reference.check_qjl(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx,
                            sketch, lengths, group_size)
    b, hkv, cap, m8 = key_signs.shape
    d, m = sketch.shape
    mo = key_out_signs.shape[-1] * 8
    if m % 8 or mo <= 0:
        raise ValueError(f"sketch sizes must be positive multiples of 8, got m={m}, m_out={mo}")
    if block_t <= 0:
        raise ValueError(f"block_t must be positive, got {block_t}")
    ng = cap // group_size
    # Mosaic blocks: the token (lane) dim of the norm and output blocks must be a multiple of 128
    # or the whole capacity; take the largest such whole-group divisor <= max(block_t, 128).
    fits = [n for n in range(1, ng + 1) if ng % n == 0 and (n * group_size) % 128 == 0
            and n * group_size <= max(block_t, 128)]
    gpb = max(fits) if fits else ng
    bt = gpb * group_size
    if outlier_idx.shape[-1] == 0:   # no outliers: one index that selects nothing
        outlier_idx = jnp.full(outlier_idx.shape[:-1] + (1,), -1, jnp.int32)
    gp = -(-g // 8) * 8
    n_out = outlier_idx.shape[-1]
    s = sketch.astype(jnp.float32)
    s_in = s[:, bit_major_columns(m)]
    s_out = s[:, :mo][:, bit_major_columns(mo)]
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qt = jnp.einsum("bhgd,dm->bhgm", qg, s_in, precision=lax.Precision.HIGHEST)
    kn, kon, f16 = common.stat_pair(key_norms, key_out_norms)
    kn, kon = kn.reshape(b, hkv, 1, cap), kon.reshape(b, hkv, 1, cap)
    lens = jnp.clip(lengths, 0, cap).astype(jnp.int32)

    def live(j, i, h, ln):  # the last block holding a live token (no new DMA past lengths)
        return jnp.minimum(j, jnp.maximum(lax.div(ln[i, h] + bt - 1, bt) - 1, 0))

    per_head = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, j, ln: (i, h) + (0,) * len(shape))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, ng // gpb),
        in_specs=[
            per_head(gp, d), per_head(gp, m),
            pl.BlockSpec((d, m), lambda i, h, j, ln: (0, 0)),
            pl.BlockSpec((d, mo), lambda i, h, j, ln: (0, 0)),
            pl.BlockSpec((None, None, bt, m8), lambda i, h, j, ln: (i, h, live(j, i, h, ln), 0)),
            pl.BlockSpec((None, None, bt, mo // 8), lambda i, h, j, ln: (i, h, live(j, i, h, ln), 0)),
            pl.BlockSpec((None, None, 1, bt), lambda i, h, j, ln: (i, h, 0, live(j, i, h, ln))),
            pl.BlockSpec((None, None, 1, bt), lambda i, h, j, ln: (i, h, 0, live(j, i, h, ln))),
            pl.BlockSpec((None, None, gpb, n_out), lambda i, h, j, ln: (i, h, live(j, i, h, ln), 0),
                         memory_space=pltpu.SMEM),
        ],
        out_specs=pl.BlockSpec((None, None, g, bt), lambda i, h, j, ln: (i, h, 0, j)),
    )
    out = pl.pallas_call(
        functools.partial(_kernel, group=group_size, f16_norms=f16),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, cap), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=common.interpret_params(interpret),
        name="kvjax_qjl_scores_tpu",
    )(lens, qg, qt, s_in, s_out, key_signs, key_out_signs, kn, kon, outlier_idx.astype(jnp.int32))
    return out.reshape(b, hkv * g, cap)
