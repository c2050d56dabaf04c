"""SALE (BirdChristopher/SALE, `int4_flash_attn/flash_attn_int4_skip.py`, `quant_triton.py`,
`flash_fwd_int4_sparse_kernel_v2.h`): a low-bit estimate of every query x key score picks the
key blocks worth computing exactly. Int8 here (spec §8: Hopper has no int4 wgmma; an int8
estimate is the Pallas target), per query head:

1. Smoothing: k^ = k - mean(k) over the live keys, q^ = q - mean(q) over the chunk's queries.
   The stored correction qmk_j = mean(q) . k^_j makes q_i . k^_j = q^_i . k^_j + qmk_j.
2. Int8 per token, symmetric: scale = max|x| / 127, code = round(x / scale) in [-127, 127]
   (SALE: int4, max|x| / 7, per token = quant_mode 2).
   Estimate (scaled logit): e_ij = (sq_i sk_j (cq_i . ck_j) + qmk_j) * softmax_scale.
3. Sink + local exactly: query i's logits z_ij = q_i . k^_j * softmax_scale over the first `sink`
   live keys and its last `local` keys (j in [i - local + 1, i]) give m_i = max z and
   l_i = sum exp(z - m_i). (k^ instead of k: a per-row shift, the softmax is unchanged.)
4. Relative score threshold: key j is wanted by query i when exp(e_ij - m_i) / l_i > tau, i.e.
   e_ij > m_i + log(tau * l_i) (the logit form the kernel uses, no exp); a (query block, key
   block) is computed when some pair in it is wanted, and the sink + local blocks always are.

Per-head threshold: SALE calibrates tau_h offline per head (`kv_retrieve_calib.py`, a budget
level such as 0.4). `taus` ([layers][q_heads], or `tau_file=` a JSON {"tau": ...}) replaces the
global tau; `calibrate_taus` picks a layer's tau_h from a calibration chunk so that about the
budget fraction of the blocks outside sink + local pass. `block_scores` is the rule's per-block
statistic: max over the block's pairs of e_ij - m_i - log l_i, compared with log tau_h.

Defaults: tau 0.004 (the README example, used for every head when no table is given),
local window 128 (asserted by the official code), query block 64. SALE's key blocks are 32
tokens; the kernel here takes equal query / key blocks of `block_size` = 64, and the rule is a
max over the block, so a 64-key block is kept exactly when one of its two 32-key halves is.
sink = 64: one such block (SALE's "sink block"). Falls back to dense (every causal block) when
the context the chunk sees is at most `min_seq_len` = 1024 tokens (SALE: q_len <= 1024 -> SDPA).
GQA: the query heads' masks are unioned per kv head (the kernel shares one list).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.sparse_prefill.base import Geometry, repeat_heads, sink_local

INT8_MAX = 127


@dataclasses.dataclass(frozen=True)
class SALE:
    tau: float = 0.004
    sink: int = 64
    local: int = 128
    min_seq_len: int = 1024
    block_size: int = 64
    taus: Optional[tuple[tuple[float, ...], ...]] = None     # [layers][q_heads] per-head tau_h (else tau)

    def __post_init__(self):
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"SALE tau must be in (0, 1), got {self.tau}")
        if self.taus is not None:
            flat = [x for row in self.taus for x in row]
            if len({len(row) for row in self.taus}) != 1 or not all(0.0 < x < 1.0 for x in flat):
                raise ValueError("SALE taus must be a [layers][q_heads] table of values in (0, 1)")
        if self.sink < 0 or self.local < 1 or self.min_seq_len < 0:
            raise ValueError(f"SALE needs sink >= 0, local >= 1, min_seq_len >= 0, got sink={self.sink} "
                             f"local={self.local} min_seq_len={self.min_seq_len}")

    @classmethod
    def from_args(cls, tau_file: Optional[str] = None, **kw) -> "SALE":
        """Spec arguments; tau_file: JSON {"tau": [[tau_h per query head] per layer]} (`calibrate_taus`)."""
        kw = {k: float(v) if k == "tau" else int(v) for k, v in kw.items()}
        if tau_file is not None:
            with open(tau_file) as f:
                kw["taus"] = tuple(tuple(float(x) for x in row) for row in json.load(f)["tau"])
        return cls(**kw)

    def layer_taus(self, layer, q_heads: int) -> jax.Array:
        """[q_heads] float32 tau_h of `layer` (traced index allowed): the per-head table or the global tau."""
        if self.taus is None:
            return jnp.full((q_heads,), self.tau, jnp.float32)
        table = jnp.asarray(self.taus, jnp.float32)
        if table.shape[1] != q_heads:
            raise ValueError(f"SALE taus have {table.shape[1]} heads per layer, the model {q_heads} query heads")
        return table[layer]

    def select(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer, scale: float) -> jax.Array:
        """[b, hq, nqb, nkb] bool block mask per query head: block score > log tau_h, sink + local
        blocks, every block below min_seq_len."""
        g = q.shape[1] // keys.shape[1]
        log_tau = jnp.log(self.layer_taus(layer, q.shape[1]))
        mask = self.block_scores(q, keys, geo, scale) > log_tau[None, :, None, None]
        mask = mask | repeat_heads(sink_local(geo, self.sink, self.local), g)
        dense = repeat_heads(geo.lengths - geo.starts, g) <= self.min_seq_len
        return mask | dense[..., None, None]

    def block_scores(self, q: jax.Array, keys: jax.Array, geo: Geometry, scale: float) -> jax.Array:
        """Log relative score of every block: max over its causal (query i, key j) pairs of
        e_ij - m_i - log l_i (the pair is wanted at tau when this exceeds log tau; -inf: no causal
        pair). q [b, hq, T, d], keys [b, hkv, S, d] -> [b, hq, nqb, nkb] float32."""
        b, hq, t, d = q.shape
        g = hq // keys.shape[1]
        bs, nqb, nkb, s = geo.block_size, geo.nqb, geo.nkb, keys.shape[2]
        starts = repeat_heads(geo.starts, g)                                       # [b, hq]
        lengths = repeat_heads(geo.lengths, g)
        qslot = repeat_heads(geo.query_slots(), g)                                 # [b, hq, T]
        slot = jnp.arange(s, dtype=jnp.int32)
        live = (slot >= starts[..., None]) & (slot < lengths[..., None])           # [b, hq, S]
        qf = q.astype(jnp.float32)
        kf = jnp.where(live[..., None], repeat_heads(keys, g).astype(jnp.float32), 0.0)  # dead slots: any value
        k_s = kf - masked_mean(kf, live)[..., None, :]                             # smoothed keys
        q_ok = qslot >= starts[..., None]                                          # rows that see a key
        q_mean = masked_mean(qf, q_ok)                                             # [b, hq, d]
        cq, sq = quantize_int8(qf - q_mean[..., None, :])
        ck, sk = quantize_int8(k_s)
        qmk = jnp.einsum("bhd,bhsd->bhs", q_mean, k_s)                              # [b, hq, S]
        pad = nqb * bs - t
        padt = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
        blocks = lambda x: jnp.moveaxis(padt(x).reshape(b, hq, nqb, bs, *x.shape[3:]), 2, 0)
        xs = (blocks(qf), blocks(cq), blocks(sq), blocks(qslot), blocks(q_ok))

        def key_scores(args):
            """One query block -> [b, hq, S]: max over its rows of e_ij - m_i - log l_i."""
            qb, cqb, sqb, qs, ok = args
            est = jnp.einsum("bhtd,bhsd->bhts", cqb.astype(jnp.int32), ck.astype(jnp.int32))
            est = (est.astype(jnp.float32) * sqb[..., None] * sk[..., None, :] + qmk[..., None, :]) * scale
            exact = jnp.einsum("bhtd,bhsd->bhts", qb, k_s, precision=jax.lax.Precision.HIGHEST) * scale
            causal = live[..., None, :] & (slot <= qs[..., None])                   # [b, hq, bs, S]
            near = (slot < starts[..., None, None] + self.sink) | (slot > qs[..., None] - self.local)
            ref = causal & near
            m = jnp.max(jnp.where(ref, exact, -jnp.inf), axis=-1, keepdims=True)
            m = jnp.where(jnp.isfinite(m), m, 0.0)
            l = jnp.sum(jnp.where(ref, jnp.exp(exact - m), 0.0), axis=-1, keepdims=True)
            rel = est - m - jnp.log(jnp.maximum(l, 1e-30))
            return jnp.max(jnp.where(causal & ok[..., None], rel, -jnp.inf), axis=-2)

        sc = jax.lax.map(key_scores, xs)                                            # [nqb, b, hq, S]
        sc = jnp.pad(jnp.moveaxis(sc, 0, 2), ((0, 0), (0, 0), (0, 0), (0, nkb * bs - s)), constant_values=-jnp.inf)
        return sc.reshape(b, hq, nqb, nkb, bs).max(-1)


def calibrate_taus(sale: SALE, q: jax.Array, keys: jax.Array, geo: Geometry, scale: float,
                   budget: float) -> jax.Array:
    """Per-head tau for one layer from a calibration chunk (SALE calibrates tau_h offline per head
    to a budget level, e.g. 0.4): tau_h = exp of the budget-quantile from the top of head h's
    block scores over the live blocks outside sink + local, so that about `budget` of those blocks
    pass the threshold (ties and several batch rows: the fraction is <= budget). Returns [hq]
    float32 (clipped into SALE's (0, 1) range)."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"SALE calibration budget must be in (0, 1), got {budget}")
    g = q.shape[1] // keys.shape[1]
    sc = sale.block_scores(q, keys, geo, scale)                                    # [b, hq, nqb, nkb]
    free = repeat_heads(geo.live_blocks() & ~sink_local(geo, sale.sink, sale.local), g)
    sc = jnp.where(free, sc, -jnp.inf)
    flat = jnp.moveaxis(sc, 1, 0).reshape(sc.shape[1], -1)                         # [hq, b*nqb*nkb]
    n_free = jnp.moveaxis(free, 1, 0).reshape(sc.shape[1], -1).sum(-1)
    k = jnp.floor(budget * n_free).astype(jnp.int32)                               # blocks allowed
    srt = -jnp.sort(-flat, axis=-1)                                                # descending
    kth = jnp.take_along_axis(srt, jnp.clip(k, 0, flat.shape[1] - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(jnp.isfinite(kth), kth, 0.0)
    tau = jnp.exp(kth + 1e-5 * jnp.maximum(jnp.abs(kth), 1.0))                     # > log tau: top k only (the
    # margin keeps the k-th block out through the float32 exp / log round trip)
    return jnp.clip(tau, 1e-30, 1.0 - 1e-7)


def masked_mean(x: jax.Array, ok: jax.Array) -> jax.Array:
    """Mean over axis -2 of the rows where ok: x [b, h, n, d], ok [b, h, n] -> [b, h, d]."""
    return jnp.sum(jnp.where(ok[..., None], x, 0.0), axis=-2) / jnp.maximum(ok.sum(-1), 1)[..., None]


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token int8: x [..., n, d] -> (codes int8 [..., n, d], scales float32 [..., n])
    with x ~ codes * scale, scale = max|x| / 127 (an all-zero row gets scale 1, codes 0)."""
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    codes = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return codes, scale
