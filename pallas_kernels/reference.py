"""Pure-jnp references of every decode kernel in `pallas_kernels` (the XLA path and the oracle).

Each function here has exactly the signature of its Pallas kernels (`pallas_kernels.gpu.*`,
`pallas_kernels.tpu.*`), minus the kernels' tuning keywords, so a test or the dispatcher can swap
them. All math is float32; outputs are cast to the query dtype. A (batch, kv-head) with no live
token attends to nothing and yields zeros (never NaN).

Kernels (decode: one query token per sequence, grouped-query attention with the `g = q_heads /
kv_heads` query heads of one kv-head sharing its keys and values):

* `dense_decode`   -- FlashDecoding (split-K) over a bf16/fp16 cache with per-head lengths
                      (Dao et al., "Flash-Decoding for long-context inference", 2023).
* `kivi_decode`    -- attention over a KIVI 2/4-bit cache (Liu et al., "KIVI: A Tuning-Free
                      Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750) in the packed
                      layout of `kvjax/quant/LAYOUT.md`, fp residual K/V segments included.
* `sparse_decode`  -- attention over given token or page indices per (batch, kv-head) (Quest-style
                      token/page sparse decode, Tang et al., arXiv 2406.10774).
* `qjl_scores`     -- QJL key-score estimator over packed sign-bit sketches (Zandieh et al.,
                      "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero
                      Overhead", arXiv 2406.03482).

Prefill (a chunk of T new queries per sequence over the cache that already holds their keys):

* `flash_prefill`  -- causal chunked-prefill attention over a dense cache with per-head live
                      ranges (FlashAttention-2 tiling in the kernels: Dao, "FlashAttention-2:
                      Faster Attention with Better Parallelism and Work Partitioning",
                      arXiv 2307.08691).
* `block_sparse_prefill` -- the same attention restricted to listed key blocks per (batch,
                      kv-head, query block): the kernel behind the sparse-prefill methods
                      (FlexPrefill, MInference, streaming heads; `kvjax.sparse_prefill`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": a fully masked row gives zeros, not NaN


# ----------------------------------------------------------------------------- helpers


def _check_q(q: jax.Array, kv_heads: int, head_dim: int, name: str = "k") -> int:
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"q_heads={q.shape[1]} is not a multiple of kv_heads={kv_heads}")
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim={q.shape[2]} != {name} head_dim={head_dim}")
    return q.shape[1] // kv_heads


def check_dense(q, k, v, lengths):
    if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k, v must be [batch, kv_heads, capacity, dim] with equal leading dims, "
                         f"got {k.shape} and {v.shape}")
    b, hkv, _, d = k.shape
    g = _check_q(q, hkv, d)
    if q.shape[0] != b:
        raise ValueError(f"q batch {q.shape[0]} != cache batch {b}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [batch, kv_heads]={(b, hkv)}, got {lengths.shape}")
    return g


def unpack_planar(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 `[..., head_dim * bits / 8]` planar-packed codes -> int32 `[..., head_dim]`.

    Byte j holds channel `j + i * P` (P = bytes per row) in bits `[bits*i, bits*(i+1))`."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    c = codes.astype(jnp.int32)
    fields = [(c >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)]
    return jnp.concatenate(fields, axis=-1)


def unpack_signs(bits_u8: jax.Array) -> jax.Array:
    """uint8 `[..., m / 8]` sign bits, LSB first (sketch index j = 8*byte + bit) -> float32 +-1 `[..., m]`."""
    c = bits_u8.astype(jnp.int32)
    b = jnp.stack([(c >> i) & 1 for i in range(8)], axis=-1)  # [..., m/8, 8]
    return (2.0 * b.reshape(*bits_u8.shape[:-1], -1) - 1.0).astype(jnp.float32)


def _softmax_out(logits, valid, values):
    """logits [b, h, g, s], valid [b, h, 1|g, s], values [b, h, s, d] -> [b, h, g, d] f32 (zeros if nothing valid)."""
    logits = jnp.where(valid, logits, NEG_INF)
    m = logits.max(-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(logits - m), 0.0)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhgs,bhsd->bhgd", p, values.astype(jnp.float32))
    return jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)


# ----------------------------------------------------------------------------- dense


def _starts(starts, lengths):
    if starts is None:
        return jnp.zeros_like(lengths)
    if starts.shape != lengths.shape:
        raise ValueError(f"starts must be [batch, kv_heads]={lengths.shape}, got {starts.shape}")
    return starts


def dense_decode(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                 starts: jax.Array | None = None, *, scale: float | None = None) -> jax.Array:
    """Decode attention over a dense cache.

    q: [batch, q_heads, head_dim]; k, v: [batch, kv_heads, capacity, head_dim];
    lengths: [batch, kv_heads] int32; starts: optional [batch, kv_heads] int32 (default 0):
    slots [starts, lengths) are live (leading slots of a left-padded row are masked).
    returns [batch, q_heads, head_dim] in q.dtype."""
    g = check_dense(q, k, v, lengths)
    b, hkv, cap, d = k.shape
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * scale
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32))
    st = _starts(starts, lengths)
    t = jnp.arange(cap)[None, None, :]
    valid = ((t < lengths[:, :, None]) & (t >= st[:, :, None]))[:, :, None, :]
    return _softmax_out(logits, valid, v).reshape(b, g * hkv, -1).astype(q.dtype)


# ----------------------------------------------------------------------------- KIVI


def check_kivi(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
               k_len, v_len, lengths, bits, group_size, v_bits=None):
    v_bits = bits if v_bits is None else v_bits
    if bits not in (2, 4) or v_bits not in (2, 4):
        raise ValueError(f"kivi_decode supports bits 2 or 4, got k bits {bits}, v bits {v_bits}")
    if k_codes.dtype != jnp.uint8 or v_codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8, got {k_codes.dtype}, {v_codes.dtype}")
    b, hkv, capq, pk = k_codes.shape
    d = k_resid.shape[-1]
    g = _check_q(q, hkv, d, "k_resid")
    if pk * 8 != d * bits or v_codes.shape != (b, hkv, capq, d * v_bits // 8):
        raise ValueError(f"codes must be [batch, kv_heads, capacity_q, head_dim*bits/8] (k {d * bits // 8}"
                         f" bytes, v {d * v_bits // 8}), got k {k_codes.shape}, v {v_codes.shape}")
    gs = group_size
    if gs <= 0 or capq % gs or d % gs:
        raise ValueError(f"group_size={gs} must divide capacity_q={capq} and head_dim={d}")
    if k_scale.shape != (b, hkv, capq // gs, d) or k_min.shape != k_scale.shape:
        raise ValueError(f"k_scale/k_min must be {(b, hkv, capq // gs, d)}, got {k_scale.shape}, {k_min.shape}")
    if v_scale.shape != (b, hkv, capq, d // gs) or v_min.shape != v_scale.shape:
        raise ValueError(f"v_scale/v_min must be {(b, hkv, capq, d // gs)}, got {v_scale.shape}, {v_min.shape}")
    r = k_resid.shape[2]
    if k_resid.shape != (b, hkv, r, d) or v_resid.shape != (b, hkv, r, d):
        raise ValueError(f"k_resid/v_resid must be [batch, kv_heads, R, head_dim], got "
                         f"{k_resid.shape}, {v_resid.shape}")
    for name, x in (("k_len", k_len), ("v_len", v_len), ("lengths", lengths)):
        if x.shape != (b, hkv):
            raise ValueError(f"{name} must be [batch, kv_heads]={(b, hkv)}, got {x.shape}")
    return g


def kivi_dequant_keys(k_codes, k_scale, k_min, bits, group_size):
    """Dequantised keys [batch, kv_heads, capacity_q, head_dim] float32."""
    c = unpack_planar(k_codes, bits).astype(jnp.float32)
    s = jnp.repeat(k_scale.astype(jnp.float32), group_size, axis=2)
    m = jnp.repeat(k_min.astype(jnp.float32), group_size, axis=2)
    return c * s + m


def kivi_dequant_values(v_codes, v_scale, v_min, bits, group_size):
    """Dequantised values [batch, kv_heads, capacity_q, head_dim] float32."""
    c = unpack_planar(v_codes, bits).astype(jnp.float32)
    s = jnp.repeat(v_scale.astype(jnp.float32), group_size, axis=3)
    m = jnp.repeat(v_min.astype(jnp.float32), group_size, axis=3)
    return c * s + m


def kivi_decode(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                k_len, v_len, lengths, starts=None, *, bits: int, group_size: int,
                v_bits: int | None = None, scale: float | None = None) -> jax.Array:
    """Decode attention over a packed KIVI cache (layout: kvjax/quant/LAYOUT.md).

    q [batch, q_heads, head_dim]; k_codes/v_codes [batch, kv_heads, capacity_q, head_dim*bits/8] uint8
    (bits = key bits, v_bits = value bits, default bits);
    k_scale/k_min [batch, kv_heads, capacity_q/G, head_dim]; v_scale/v_min [batch, kv_heads, capacity_q,
    head_dim/G]; k_resid/v_resid [batch, kv_heads, R, head_dim]; k_len, v_len, lengths [batch, kv_heads].
    Token t < lengths uses key k_codes[t] if t < k_len else k_resid[t - k_len], and value
    v_codes[t] if t < v_len else v_resid[t - v_len]. starts: optional [batch, kv_heads] (default 0),
    tokens t < starts are masked (left padding: LAYOUT.md's t + pos_offset < 0).  returns [batch, q_heads, head_dim] in q.dtype."""
    g = check_kivi(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_resid, v_resid,
                   k_len, v_len, lengths, bits, group_size, v_bits)
    v_bits = bits if v_bits is None else v_bits
    b, hkv, capq, _ = k_codes.shape
    r, d = k_resid.shape[2], k_resid.shape[3]
    scale = d ** -0.5 if scale is None else scale
    kq = kivi_dequant_keys(k_codes, k_scale, k_min, bits, group_size)
    vq = kivi_dequant_values(v_codes, v_scale, v_min, v_bits, group_size)
    # Token-ordered logical cache of capacity capq + r, assembled per head with gathers.
    t = jnp.arange(capq + r)[None, None, :]
    kl, vl = k_len[:, :, None], v_len[:, :, None]

    def take(x, idx):
        idx = jnp.clip(idx, 0, x.shape[2] - 1)
        return jnp.take_along_axis(x.astype(jnp.float32), idx[..., None], axis=2)

    keys = jnp.where((t < kl)[..., None], take(kq, jnp.broadcast_to(t, (b, hkv, capq + r))),
                     take(k_resid, jnp.broadcast_to(t - kl, (b, hkv, capq + r))))
    vals = jnp.where((t < vl)[..., None], take(vq, jnp.broadcast_to(t, (b, hkv, capq + r))),
                     take(v_resid, jnp.broadcast_to(t - vl, (b, hkv, capq + r))))
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * scale
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, keys)
    st = _starts(starts, lengths)
    valid = ((t < lengths[:, :, None]) & (t >= st[:, :, None]))[:, :, None, :]
    return _softmax_out(logits, valid, vals).reshape(b, g * hkv, d).astype(q.dtype)


# ----------------------------------------------------------------------------- sparse


def check_sparse(q, k, v, indices, counts, lengths=None, page_size: int = 1):
    if k.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k, v must be [batch, kv_heads, capacity, dim], got {k.shape}, {v.shape}")
    b, hkv, _, d = k.shape
    g = _check_q(q, hkv, d)
    if indices.ndim != 3 or indices.shape[:2] != (b, hkv):
        raise ValueError(f"indices must be [batch, kv_heads, n_selected], got {indices.shape}")
    if counts.shape != (b, hkv):
        raise ValueError(f"counts must be [batch, kv_heads]={(b, hkv)}, got {counts.shape}")
    if lengths is not None and lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [batch, kv_heads]={(b, hkv)}, got {lengths.shape}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    return g


def sparse_slots(indices, counts, lengths, page_size: int, capacity: int):
    """Selected slots of every (batch, kv-head) and their validity.

    indices [b, h, n] (token or page indices), counts [b, h], lengths [b, h] or None ->
    (slots [b, h, n * page_size] int32 in [0, capacity), valid [b, h, n * page_size] bool).
    An index is clamped to [0, cdiv(capacity, page_size)) first; page i covers slots
    [i*P, (i+1)*P); a slot is valid when its index is among the first `counts` and
    slot < min(capacity, lengths) (the part of a last page past the capacity is masked)."""
    p = page_size
    n_pages = -(-capacity // p)
    page = jnp.clip(indices.astype(jnp.int32), 0, n_pages - 1)
    slots = (page[..., None] * p + jnp.arange(p, dtype=jnp.int32)).reshape(*indices.shape[:2], -1)
    pos = jnp.repeat(jnp.arange(indices.shape[2]), p)[None, None, :]
    limit = jnp.full(counts.shape, capacity, jnp.int32) if lengths is None else \
        jnp.minimum(lengths.astype(jnp.int32), capacity)
    valid = (pos < counts[:, :, None]) & (slots < limit[:, :, None])
    return jnp.minimum(slots, capacity - 1), valid


def sparse_decode(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, counts: jax.Array,
                  lengths: jax.Array | None = None, *, scale: float | None = None,
                  page_size: int = 1) -> jax.Array:
    """Decode attention over selected tokens (page_size 1) or selected pages only.

    q [batch, q_heads, head_dim]; k, v [batch, kv_heads, capacity, head_dim];
    indices [batch, kv_heads, n_selected] int32: slot indices (page_size 1) or page indices
    (page i = slots [i*page_size, (i+1)*page_size), clipped to capacity); out-of-range indices
    are clamped to [0, cdiv(capacity, page_size)); duplicates count twice;
    counts [batch, kv_heads] int32: the first `counts` indices of a row are used, the rest ignored;
    lengths: optional [batch, kv_heads] int32, slots >= lengths are masked (a live tail page).
    returns [batch, q_heads, head_dim] in q.dtype (zeros where nothing is selected)."""
    g = check_sparse(q, k, v, indices, counts, lengths, page_size)
    if indices.shape[2] == 0:  # nothing can be selected
        return jnp.zeros(q.shape[:2] + v.shape[-1:], q.dtype)
    b, hkv, cap, d = k.shape
    scale = d ** -0.5 if scale is None else scale
    idx, valid = sparse_slots(indices, counts, lengths, page_size, cap)
    ks = jnp.take_along_axis(k, idx[..., None], axis=2)
    vs = jnp.take_along_axis(v, idx[..., None], axis=2)
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * scale
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, ks.astype(jnp.float32))
    return _softmax_out(logits, valid[:, :, None, :], vs).reshape(b, g * hkv, -1).astype(q.dtype)


# ----------------------------------------------------------------------------- QJL


def check_qjl(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx, sketch,
              lengths, group_size):
    b, hkv, cap, m8 = key_signs.shape
    d, m = sketch.shape
    g = _check_q(q, hkv, d, "sketch")
    if key_signs.dtype != jnp.uint8 or key_out_signs.dtype != jnp.uint8:
        raise ValueError("sign sketches must be uint8")
    if m8 * 8 != m:
        raise ValueError(f"key_signs last dim {m8} != sketch m/8 = {m // 8}")
    mo = key_out_signs.shape[-1] * 8
    if key_out_signs.shape[:3] != (b, hkv, cap) or mo > m:
        raise ValueError(f"key_out_signs must be [batch, kv_heads, capacity, m_out/8] with m_out <= m, "
                         f"got {key_out_signs.shape}")
    if key_norms.shape != (b, hkv, cap) or key_out_norms.shape != (b, hkv, cap):
        raise ValueError(f"key norms must be [batch, kv_heads, capacity]={(b, hkv, cap)}")
    if group_size <= 0 or cap % group_size:
        raise ValueError(f"group_size={group_size} must divide capacity={cap}")
    if outlier_idx.ndim != 4 or outlier_idx.shape[:3] != (b, hkv, cap // group_size):
        raise ValueError(f"outlier_idx must be [batch, kv_heads, capacity/G, n_outliers], got {outlier_idx.shape}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [batch, kv_heads]={(b, hkv)}, got {lengths.shape}")
    return g


def qjl_scores(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx, sketch,
               lengths, *, group_size: int = 32) -> jax.Array:
    """QJL estimate of <q, k> for every cached key (no softmax scale applied).

    q [batch, q_heads, head_dim]; sketch S [head_dim, m] (float32);
    key_signs [batch, kv_heads, capacity, m/8] uint8: sign(k_in^T S), bit j of the sketch in byte j//8,
        bit j%8 (LSB first); k_in = k with the group's outlier channels zeroed;
    key_out_signs [batch, kv_heads, capacity, m_out/8] uint8: sign(k_out^T S[:, :m_out]);
    key_norms, key_out_norms [batch, kv_heads, capacity]: ||k|| and ||k_out||;
    outlier_idx [batch, kv_heads, capacity/G, n_outliers] int32: outlier channels of each G-token group;
    lengths [batch, kv_heads].
    Estimator: sqrt(pi/2)/m * ||k_in|| * sum_j sign_j(k_in) (S^T q_in)_j
             + sqrt(pi/2)/m_out * ||k_out|| * sum_{j<m_out} sign_j(k_out) (S^T q_out)_j,
    q_in / q_out = q with the outlier channels zeroed / kept, ||k_in|| = sqrt(||k||^2 - ||k_out||^2).
    returns float32 [batch, q_heads, capacity]; slots >= lengths hold NEG_INF."""
    g = check_qjl(q, key_signs, key_out_signs, key_norms, key_out_norms, outlier_idx, sketch,
                  lengths, group_size)
    b, hkv, cap, _ = key_signs.shape
    d, m = sketch.shape
    mo = key_out_signs.shape[-1] * 8
    s = sketch.astype(jnp.float32)
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32)
    # outlier mask per group [b, h, n_groups, d]
    omask = jax.nn.one_hot(outlier_idx, d, dtype=jnp.float32).max(axis=3)
    q_out = qg[:, :, None, :, :] * omask[:, :, :, None, :]           # [b, h, ng, g, d]
    q_in = qg[:, :, None, :, :] - q_out
    qt_in = jnp.einsum("bhngd,dm->bhngm", q_in, s)
    qt_out = jnp.einsum("bhngd,dm->bhngm", q_out, s[:, :mo])
    sg_in = unpack_signs(key_signs).reshape(b, hkv, cap // group_size, group_size, m)
    sg_out = unpack_signs(key_out_signs).reshape(b, hkv, cap // group_size, group_size, mo)
    dot_in = jnp.einsum("bhngm,bhntm->bhgnt", qt_in, sg_in).reshape(b, hkv, g, cap)
    dot_out = jnp.einsum("bhngm,bhntm->bhgnt", qt_out, sg_out).reshape(b, hkv, g, cap)
    kn = key_norms.astype(jnp.float32)
    kon = key_out_norms.astype(jnp.float32)
    kin = jnp.sqrt(jnp.maximum(kn * kn - kon * kon, 0.0))
    c = math.sqrt(math.pi / 2)
    est = c / m * kin[:, :, None] * dot_in + c / mo * kon[:, :, None] * dot_out
    valid = (jnp.arange(cap)[None, None, :] < lengths[:, :, None])[:, :, None, :]
    return jnp.where(valid, est, NEG_INF).reshape(b, hkv * g, cap)


# ----------------------------------------------------------------------------- prefill


def check_prefill(q, keys, values, starts, lengths):
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_heads, T, head_dim], got shape {q.shape}")
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ValueError(f"keys, values must be [batch, kv_heads, capacity, head_dim] of one shape, "
                         f"got {keys.shape} and {values.shape}")
    b, hkv, _, d = keys.shape
    if q.shape[0] != b or q.shape[3] != d:
        raise ValueError(f"q {q.shape} does not match the cache {keys.shape} (batch, head_dim)")
    if q.shape[1] % hkv:
        raise ValueError(f"q_heads={q.shape[1]} is not a multiple of kv_heads={hkv}")
    for name, x in (("starts", starts), ("lengths", lengths)):
        if x.shape != (b, hkv):
            raise ValueError(f"{name} must be [batch, kv_heads]={(b, hkv)}, got {x.shape}")
    return q.shape[1] // hkv


def flash_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                  lengths: jax.Array, *, scale: float | None = None) -> jax.Array:
    """Causal attention of a prefill chunk over the cache that already holds the chunk's keys.

    q:       [batch, q_heads, T, head_dim]  the chunk's queries; grouped-query attention:
             q_heads = kv_heads * group, query head j uses kv head j // group.
    keys, values: [batch, kv_heads, S, head_dim]  the cache (capacity S >= T, any S).
    starts:  [batch, kv_heads] int32  first live slot of each head.
    lengths: [batch, kv_heads] int32  one past the last live slot; the chunk's T keys occupy
             slots lengths - T .. lengths - 1.
    Query i (0-based in the chunk) of a head sees slot s iff starts <= s <= lengths - T + i
    (everything live before the chunk, causal inside it); slots outside [starts, lengths) are
    never read by the kernels (their content may be garbage). Softmax in float32 with scale
    (default head_dim**-0.5); a query that sees no slot (e.g. starts >= lengths) yields zeros.
    returns [batch, q_heads, T, head_dim] in q.dtype.

    This reference materialises the [batch, q_heads, T, S] logits (tests and small shapes)."""
    g = check_prefill(q, keys, values, starts, lengths)
    return _prefill(q, keys, values, starts, lengths, g, scale, None)


def _prefill(q, keys, values, starts, lengths, g, scale, allowed):
    """flash_prefill's math; allowed: None or a [batch, kv_heads, T, S] bool mask ANDed in."""
    b, hkv, cap, d = keys.shape
    t_len = q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, hkv, g, t_len, d).astype(jnp.float32) * scale
    hi = jax.lax.Precision.HIGHEST  # float32 products on GPUs too (no TF32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32), precision=hi)
    slot = jnp.arange(cap)[None, None, None, :]                          # [1, 1, 1, S]
    last = (lengths[:, :, None, None] - t_len + jnp.arange(t_len)[None, None, :, None])  # [b, h, T, 1]
    valid = (slot >= starts[:, :, None, None]) & (slot <= last) & (slot < lengths[:, :, None, None])
    if allowed is not None:
        valid = valid & allowed
    valid = valid[:, :, None]                                            # [b, h, 1, T, S]
    logits = jnp.where(valid, logits, NEG_INF)
    m = logits.max(-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(logits - m), 0.0)
    l = p.sum(-1, keepdims=True)
    live = (slot[0] >= starts[:, :, None]) & (slot[0] < lengths[:, :, None])   # [b, h, S]
    vals = jnp.where(live[..., None], values.astype(jnp.float32), 0.0)  # dead slots may hold NaN
    o = jnp.einsum("bhgts,bhsd->bhgtd", p, vals, precision=hi)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(b, hkv * g, t_len, d).astype(q.dtype)


def check_block_sparse(q, keys, values, starts, lengths, block_indices, block_counts, block_size,
                       column_indices=None, column_counts=None):
    """Shape checks of `block_sparse_prefill`; returns the group size g."""
    g = check_prefill(q, keys, values, starts, lengths)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    b, hkv = keys.shape[:2]
    n_qb = -(-q.shape[2] // block_size)
    if block_indices.ndim != 4 or block_indices.shape[:3] != (b, hkv, n_qb):
        raise ValueError(f"block_indices must be [batch, kv_heads, n_query_blocks, max_blocks]="
                         f"{(b, hkv, n_qb, '*')} (n_query_blocks = ceil(T / block_size)), got "
                         f"{block_indices.shape}")
    if block_counts.shape != (b, hkv, n_qb):
        raise ValueError(f"block_counts must be [batch, kv_heads, n_query_blocks]={(b, hkv, n_qb)}, "
                         f"got {block_counts.shape}")
    if (column_indices is None) != (column_counts is None):
        raise ValueError("column_indices and column_counts go together (both or neither)")
    if column_indices is not None:
        if column_indices.ndim != 4 or column_indices.shape[:3] != (b, hkv, n_qb):
            raise ValueError(f"column_indices must be [batch, kv_heads, n_query_blocks, max_columns]="
                             f"{(b, hkv, n_qb, '*')}, got {column_indices.shape}")
        if column_counts.shape != (b, hkv, n_qb):
            raise ValueError(f"column_counts must be [batch, kv_heads, n_query_blocks]={(b, hkv, n_qb)}, "
                             f"got {column_counts.shape}")
    for name, x in (("block_indices", block_indices), ("block_counts", block_counts),
                    ("column_indices", column_indices), ("column_counts", column_counts)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")
    return g


def block_list_mask(block_indices, block_counts, n_key_blocks: int) -> jax.Array:
    """[batch, kv_heads, n_qb, max_blocks] lists + counts -> [batch, kv_heads, n_qb, n_key_blocks]
    bool: key block j is listed among the first `counts` entries (entries outside [0,
    n_key_blocks) are ignored; duplicates are harmless)."""
    pos = jnp.arange(block_indices.shape[-1])
    valid = (pos < block_counts[..., None]) & (block_indices >= 0) & (block_indices < n_key_blocks)
    hit = (block_indices[..., None] == jnp.arange(n_key_blocks)) & valid[..., None]
    return hit.any(axis=-2)


def column_list_mask(column_indices, column_counts, n_slots: int) -> jax.Array:
    """[batch, kv_heads, n_qb, max_columns] lists + counts -> [batch, kv_heads, n_qb, n_slots]
    bool: slot s is listed among the first `counts` entries (entries outside [0, n_slots) are
    ignored; duplicates are harmless)."""
    b, h, n_qb, m = column_indices.shape
    valid = ((jnp.arange(m) < column_counts[..., None]) & (column_indices >= 0)
             & (column_indices < n_slots))
    grid = jnp.ix_(jnp.arange(b), jnp.arange(h), jnp.arange(n_qb), jnp.arange(m))[:3]
    hit = jnp.zeros((b, h, n_qb, n_slots + 1), bool)
    return hit.at[(*grid, jnp.where(valid, column_indices, n_slots))].set(True)[..., :n_slots]


def block_sparse_prefill(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                         lengths: jax.Array, block_indices: jax.Array, block_counts: jax.Array, *,
                         block_size: int, scale: float | None = None,
                         column_indices: jax.Array | None = None,
                         column_counts: jax.Array | None = None) -> jax.Array:
    """`flash_prefill` restricted to listed key blocks (block-sparse causal chunked prefill),
    optionally plus listed single key columns (MInference's vertical lines, gathered).

    q, keys, values, starts, lengths: as `flash_prefill` (the chunk's T queries sit at slots
    lengths - T .. lengths - 1 of the cache: a query offset for chunked prefill over a cache).
    block_indices: [batch, kv_heads, ceil(T / block_size), max_blocks] int32; entry p of row
             (b, h, i) names key block j = cache slots [j*block_size, (j+1)*block_size) seen by
             the queries i*block_size .. (i+1)*block_size - 1 of the chunk (all query heads of
             kv head h: GQA shares one list).
    block_counts: [batch, kv_heads, ceil(T / block_size)] int32: the first counts entries of a
             row are used; entries past it, negative or >= ceil(S / block_size) are ignored, and
             a repeated block counts once (a set).
    column_indices, column_counts (optional, together): [batch, kv_heads, ceil(T / block_size),
             max_columns] cache slots and their counts, the same set semantics per slot (entries
             outside [0, S) ignored; a column inside a listed block counts once).
    Query i of a head sees slot s iff (block s // block_size is listed for query block
    i // block_size OR s is a listed column of it) AND the dense rule holds (starts <= s <=
    lengths - T + i): the causal mask is applied element-wise. A query that sees nothing yields
    zeros. returns [batch, q_heads, T, head_dim] in q.dtype. Materialises [batch, q_heads, T, S]."""
    g = check_block_sparse(q, keys, values, starts, lengths, block_indices, block_counts, block_size,
                           column_indices, column_counts)
    t_len, cap = q.shape[2], keys.shape[2]
    nkb = -(-cap // block_size)
    bm = block_list_mask(block_indices, block_counts, nkb)               # [b, h, nqb, nkb]
    qb = jnp.arange(t_len) // block_size
    kb = jnp.arange(cap) // block_size
    allowed = bm[:, :, qb][:, :, :, kb]                                   # [b, h, T, S]
    if column_indices is not None:
        allowed = allowed | column_list_mask(column_indices, column_counts, cap)[:, :, qb]
    return _prefill(q, keys, values, starts, lengths, g, scale, allowed)
