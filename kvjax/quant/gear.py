"""GEAR: quantization + low-rank + sparse decomposition of the KV cache.

Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference
of LLM", arXiv 2403.05527 (code: opengear-project/GEAR, `GEARLM/Simulated/compress_function.py`).
Spec: shared/methods/quantization_and_sparse_attention.md §4.

Every compressed piece of a key/value matrix X [n, d] (one batch row, one kv-head) is X ~ D + S + L:

* S (sparse outliers): per vector, the `k` largest and `k` smallest entries are set aside
  (keys: vector = one channel over the piece's tokens; values: vector = one token over its channels),
  with `k = max(1, int(s * len / 2))` for `s > 0` (s = 2 %). Their places are filled with the vector
  mean before quantizing and the exact values are restored afterwards (as `gears_channelQ/tokenQ`).
* D (quantized): KIVI-style asymmetric min-max RTN, keys per channel over G-token groups, values per
  token over G-channel groups (G = 64), codes planar-packed into uint8, float16 scale and min.
* L (low-rank): the error E = X - (D with S restored) is approximated by `loop` power iterations from
  a random uniform P0 [d, r]: Q = E P, P = E^T Q, with P and Q QR-orthonormalised in the last
  iteration (`fake_poweriteration_group`), L = Q P^T with float16 factors Q [n, r], P [d, r].
  The reconstruction is D_S + L (L is added at the outlier entries too, as in the code).

Streaming (GEAR's `--streaming --streaming_gap 64`): the prompt (all whole G-token groups of the
first append into an empty cache) is compressed at once with `prefill_rank` (4) into the prefill
region; later tokens wait in a full-precision buffer of n_b = 64 tokens and every full buffer is
compressed as its own block with rank `rank` (2). Prompt tokens past the last whole group wait in
the buffer too.

Layout per layer slice (the stacked cache adds a leading `layers` axis; Cp prefill capacity, Cs
stream capacity, both multiples of n_b; NB = Cs / n_b; kp/kb key outliers per side of a prefill /
stream channel, kv value outliers per side of a token):

    pk_codes [B, H, Cp, d*bits/8] uint8   pk_scale, pk_min [B, H, Cp/G, d] f16
    pk_oval, pk_oidx [B, H, 2kp, d] f16 / int32 token index (>= Cp marks "none")
    pk_q [B, H, Cp, rp] f16   pk_p [B, H, d, rp] f16            (and pv_* for values:
    pv_codes [B, H, Cp, d*bits/8]  pv_scale, pv_min [B, H, Cp, d/G]  pv_oval, pv_oidx [B, H, Cp, 2kv]
    (uint8 channel index)  pv_q [B, H, Cp, rp]  pv_p [B, H, d, rp])
    sk_*, sv_* : the same for the stream region with Cs rows, NB blocks (sk_oval [B, H, NB, 2kb, d],
                 sk_p [B, H, NB, d, r], ...)
    k_buf, v_buf [B, H, n_b, d] cache dtype
    pre_len, s_len, buf_len, lengths, pos_offset [B, H] int32

Token t of a row is in the prefill region if t < pre_len, in the stream region at t - pre_len if
t < pre_len + s_len, else in the buffer. Positions are contiguous: position = t + pos_offset.

Protocol order: the model appends first and attends second, so tokens compressed by this append
are seen compressed by this call's queries ("fake-quant" evaluation, as KIVI/KVQuant report PPL).

Bad input -> ValueError: bits not in {2, 4, 8}, G not dividing head_dim or n_b, rank <= 0, outlier
ratio outside [0, 0.5), prefill capacity not a multiple of n_b, NaN/inf keys or values (eager calls).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import tree_bytes
from kvjax.quant import packing

GEAR_BITS = (2, 4, 8)
NO_POSITION = -(2 ** 30)


@dataclasses.dataclass(frozen=True)
class GEARConfig:
    """GEAR hyperparameters; defaults are `run_template_llama-3-8b.sh` (2-bit, G 64, 3 power
    iterations, prefill rank 4, streaming rank 2, 2 % outliers, streaming gap 64)."""

    bits: int = 2
    group: int = 64
    loop: int = 3
    prefill_rank: int = 4
    rank: int = 2
    outlier_ratio: float = 0.02
    streaming_gap: int = 64
    seed: int = 0

    def validate(self, head_dim: int) -> None:
        if self.bits not in GEAR_BITS:
            raise ValueError(f"GEAR bits={self.bits} is not supported: choose one of {GEAR_BITS}")
        if self.group <= 0 or head_dim % self.group:
            raise ValueError(f"GEAR group size {self.group} must be positive and divide head_dim={head_dim}")
        if self.streaming_gap <= 0 or self.streaming_gap % self.group:
            raise ValueError(f"GEAR streaming gap {self.streaming_gap} must be a positive multiple of the "
                             f"group size {self.group}")
        if self.rank <= 0 or self.prefill_rank <= 0 or self.loop <= 0:
            raise ValueError(f"GEAR ranks and loop must be positive, got rank={self.rank}, "
                             f"prefill_rank={self.prefill_rank}, loop={self.loop}")
        if max(self.rank, self.prefill_rank) > head_dim:
            raise ValueError(f"GEAR rank {max(self.rank, self.prefill_rank)} exceeds head_dim={head_dim}")
        if not 0 <= self.outlier_ratio < 0.5:
            raise ValueError(f"GEAR outlier ratio must be in [0, 0.5), got {self.outlier_ratio}")


def outlier_count(length: int, ratio: float) -> int:
    """Outliers kept per side of a vector of `length` entries: max(1, int(ratio*length/2)) if ratio > 0."""
    if ratio <= 0:
        return 0
    return min(max(1, int(ratio * length / 2)), length // 2)


def initial_p(d: int, rank: int, seed: int = 0) -> jax.Array:
    """Random start of the power iteration, uniform [0, 1) like `torch.rand` in the GEAR code: [d, r]."""
    return jax.random.uniform(jax.random.PRNGKey(seed), (d, rank), jnp.float32)


# ----------------------------------------------------------------------------- pure decomposition

def power_iteration(e: jax.Array, p0: jax.Array, loop: int) -> tuple[jax.Array, jax.Array]:
    """GEAR's low-rank fit of an error matrix `e [n, d]` from `p0 [d, r]` -> (Q [n, r], P [d, r]),
    with e ~ Q P^T (Q orthonormal: L = Q Q^T e, the projection of e on a Krylov subspace)."""
    e = e.astype(jnp.float32)
    p = p0.astype(jnp.float32)
    q = None
    for i in range(loop):
        if i == loop - 1:
            p = jnp.linalg.qr(p)[0]
        q = e @ p
        if i == loop - 1:
            q = jnp.linalg.qr(q)[0]
        p = e.T @ q
    return q, p


def _split_outliers(x: jax.Array, k: int):
    """Per row of `x [m, n]`: the k smallest and k largest entries -> (filled x, values [m, 2k],
    indices [m, 2k]); filled x has them replaced by the row mean."""
    if k == 0:
        return x, jnp.zeros(x.shape[:-1] + (0,), x.dtype), jnp.zeros(x.shape[:-1] + (0,), jnp.int32)
    top_v, top_i = jax.lax.top_k(x, k)
    bot_v, bot_i = jax.lax.top_k(-x, k)
    idx = jnp.concatenate([bot_i, top_i], axis=-1)
    val = jnp.concatenate([-bot_v, top_v], axis=-1)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    rows = jnp.arange(x.shape[0])[:, None]
    filled = x.at[rows, idx].set(jnp.broadcast_to(mean, idx.shape))
    return filled, val, idx


def compress(x: jax.Array, kind: str, bits: int, group: int, rank: int, loop: int, outlier_ratio: float,
             p0: jax.Array) -> dict:
    """GEAR-compress one piece `x [n, d]` of keys (`kind="key"`: per-channel quantization, channel
    outliers along tokens) or values (`kind="value"`: per-token quantization and outliers).

    returns a dict of stored arrays: codes [n, d*bits/8] uint8, scale/min (keys [n/G, d], values
    [n, d/G]) f16, oval f16 / oidx int32 (keys [2k, d] token indices, values [n, 2k] channel
    indices), q [n, r] f16, p [d, r] f16."""
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    packing.check_finite(f"GEAR {kind}s", x)
    x = x.astype(jnp.float32)
    n, d = x.shape
    if kind == "key":
        k = outlier_count(n, outlier_ratio)
        filled_t, oval, oidx = _split_outliers(x.T, k)          # rows = channels
        filled = filled_t.T
        codes, scale, mn = packing.quantize(filled, bits, group, axis=0)
        dq = packing.dequantize(codes, scale, mn, group, axis=0)
        oval, oidx = oval.T, oidx.T                               # [2k, d]
        dq_s = dq.at[oidx, jnp.arange(d)[None, :]].set(oval.astype(jnp.float16).astype(jnp.float32)) if k else dq
    else:
        k = outlier_count(d, outlier_ratio)
        filled, oval, oidx = _split_outliers(x, k)
        codes, scale, mn = packing.quantize(filled, bits, group, axis=-1)
        dq = packing.dequantize(codes, scale, mn, group, axis=-1)
        dq_s = dq.at[jnp.arange(n)[:, None], oidx].set(oval.astype(jnp.float16).astype(jnp.float32)) if k else dq
    oval16 = oval.astype(jnp.float16)
    # the error is measured against what the cache reproduces (outliers restored in float16)
    q, p = power_iteration(x - dq_s, p0[:, :rank], loop)
    return dict(codes=packing.pack(codes, bits), scale=scale, min=mn, oval=oval16, oidx=oidx.astype(jnp.int32),
                q=q.astype(jnp.float16), p=p.astype(jnp.float16))


def decompress(c: dict, kind: str, bits: int, group: int) -> jax.Array:
    """Inverse of `compress` -> x_hat [n, d] float32 = D (outliers restored) + Q P^T.

    Outlier indices out of range (>= n for keys) are ignored (unused slots)."""
    codes = packing.unpack(c["codes"], bits)
    n, d = codes.shape
    axis = 0 if kind == "key" else -1
    x = packing.dequantize(codes, c["scale"], c["min"], group, axis=axis)
    if c["oval"].size:
        val = c["oval"].astype(jnp.float32)
        if kind == "key":
            x = x.at[c["oidx"], jnp.arange(d)[None, :]].set(val, mode="drop")
        else:
            x = x.at[jnp.arange(n)[:, None], c["oidx"]].set(val, mode="drop")
    return x + c["q"].astype(jnp.float32) @ c["p"].astype(jnp.float32).T


def compressed_bytes(n: int, d: int, bits: int, group: int, rank: int, outlier_ratio: float) -> dict:
    """Bytes of one compressed key piece and one value piece of n tokens (codes + f16 scale/min +
    outliers (f16 value + int32 index) + f16 low-rank factors) -- the accounting of `compress`."""
    kk, kv = outlier_count(n, outlier_ratio), outlier_count(d, outlier_ratio)
    codes = n * d * bits // 8
    lr = 2 * rank * (n + d)
    return {"key": codes + 2 * 2 * (n // group) * d + 2 * kk * d * (2 + 4) + lr,
            "value": codes + 2 * 2 * n * (d // group) + 2 * kv * n * (2 + 4) + lr}


# ----------------------------------------------------------------------------- the cache

_PIECE = ("codes", "scale", "min", "oval", "oidx", "q", "p")


@dataclasses.dataclass(frozen=True)
class GEARCache:
    """Packed GEAR cache (layout in the module docstring); dict fields hold the compressed pieces
    (`pk`, `pv`: prefill keys/values; `sk`, `sv`: stream blocks)."""

    pk: dict
    pv: dict
    sk: dict
    sv: dict
    k_buf: jax.Array
    v_buf: jax.Array
    pre_len: jax.Array
    s_len: jax.Array
    buf_len: jax.Array
    lengths: jax.Array
    pos_offset: jax.Array
    p0: jax.Array
    config: GEARConfig = GEARConfig()

    @property
    def head_dim(self) -> int:
        return self.k_buf.shape[-1]

    @property
    def prefill_capacity(self) -> int:
        return self.pk["codes"].shape[-2]

    @property
    def stream_capacity(self) -> int:
        return self.sk["codes"].shape[-2]

    @property
    def capacity(self) -> int:
        return self.prefill_capacity + self.stream_capacity + self.k_buf.shape[-2]

    def memory_bytes(self) -> int:
        """Bytes of every array held (codes, scales, outliers, low-rank factors, buffers, counters;
        the shared power-iteration start p0 included)."""
        return tree_bytes(self)

    @property
    def positions(self) -> jax.Array:
        return slot_positions(self)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "GEARCache":
        """keys (post-RoPE), values `[batch, kv_heads, new, d]`, positions `[batch, new]`."""
        return append(self, keys, values, positions)

    def resize(self, capacity: int) -> "GEARCache":
        """GEAR's regions are fixed at init: a capacity up to the allocated one keeps the cache as is
        (generate calls this with the capacity it was built for); more is a ValueError."""
        if capacity > self.capacity:
            raise ValueError(f"cannot grow a GEAR cache from {self.capacity} to {capacity} slots: build it with "
                             "the larger capacity")
        return self

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        k, v = dequantize(self)
        return attend(q, k, v, self.positions, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(
    GEARCache, data_fields=["pk", "pv", "sk", "sv", "k_buf", "v_buf", "pre_len", "s_len", "buf_len",
                            "lengths", "pos_offset", "p0"], meta_fields=["config"])


def _piece_arrays(lead, n, d, cfg: GEARConfig, rank, kind, blocks=None):
    """Zero arrays of a compressed piece region of n rows (blocks: number of separately compressed
    n_b-row blocks for the stream region, None for the single prefill piece)."""
    b, g = cfg.bits, cfg.group
    z = lambda *s, dt=jnp.float16: jnp.zeros(lead + s, dt)
    if kind == "key":
        kper = outlier_count(n if blocks is None else cfg.streaming_gap, cfg.outlier_ratio)
        ostat = (2 * kper, d) if blocks is None else (blocks, 2 * kper, d)
        stat = (n // g, d)
    else:
        kper = outlier_count(d, cfg.outlier_ratio)
        ostat = (n, 2 * kper)
        stat = (n, d // g)
    pshape = (d, rank) if blocks is None else (blocks, d, rank)
    big = np.iinfo(np.int32).max
    return dict(codes=z(n, packing.packed_size(d, b), dt=jnp.uint8), scale=z(*stat), min=z(*stat),
                oval=z(*ostat), oidx=jnp.full(lead + ostat, big if kind == "key" else 0, jnp.int32),
                q=z(n, rank), p=z(*pshape))


def init_gear_cache(cfg: GEARConfig, n_layers: int, batch: int, kv_heads: int, head_dim: int,
                    prefill_capacity: int, stream_capacity: int, dtype=jnp.float32) -> GEARCache:
    """Empty GEAR cache stacked over layers.

    prefill_capacity: tokens of the prompt region (rounded up to a multiple of n_b; 0 = no prefill
    region: everything streams); stream_capacity: tokens compressed after the prompt (rounded up to
    a multiple of n_b). The buffer adds n_b slots."""
    cfg.validate(head_dim)
    if min(n_layers, batch, kv_heads, head_dim) <= 0 or prefill_capacity < 0 or stream_capacity < 0:
        raise ValueError("cache dimensions must be positive")
    nb = cfg.streaming_gap
    cp = -(-prefill_capacity // nb) * nb
    cs = max(-(-stream_capacity // nb), 1) * nb
    lead = (n_layers, batch, kv_heads)
    z = lambda dt=jnp.int32: jnp.zeros(lead, dt)
    return GEARCache(
        pk=_piece_arrays(lead, cp, head_dim, cfg, cfg.prefill_rank, "key"),
        pv=_piece_arrays(lead, cp, head_dim, cfg, cfg.prefill_rank, "value"),
        sk=_piece_arrays(lead, cs, head_dim, cfg, cfg.rank, "key", blocks=cs // nb),
        sv=_piece_arrays(lead, cs, head_dim, cfg, cfg.rank, "value", blocks=cs // nb),
        k_buf=jnp.zeros(lead + (nb, head_dim), dtype), v_buf=jnp.zeros(lead + (nb, head_dim), dtype),
        pre_len=z(), s_len=z(), buf_len=z(), lengths=z(), pos_offset=jnp.full(lead, NO_POSITION, jnp.int32),
        p0=jnp.broadcast_to(initial_p(head_dim, max(cfg.rank, cfg.prefill_rank), cfg.seed),
                            (n_layers, head_dim, max(cfg.rank, cfg.prefill_rank))),
        config=cfg)


def _update_offset(offset, length, positions):
    n = positions.shape[-1]
    slot = length[..., None] + jnp.arange(n, dtype=jnp.int32)
    pos = positions[:, None, :].astype(jnp.int32)
    cand = jnp.where(pos >= 0, pos - slot, NO_POSITION)
    return jnp.where(jnp.any(pos >= 0, axis=-1), jnp.max(cand, -1), offset).astype(jnp.int32)


def _pad_rows(x: jax.Array, n: int, axis: int, value=0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def append(layer: GEARCache, keys, values, positions) -> GEARCache:
    """Append new tokens to one layer's GEAR cache (pure; the per-layer slice).

    keys, values `[batch, kv_heads, new, d]`. Into an empty row, the first (new // G) * G tokens
    are compressed at once into the prefill region (if it is large enough: otherwise ValueError);
    everything else goes through the n_b buffer, each full buffer becoming a stream block."""
    if keys.shape != values.shape or keys.ndim != 4 or keys.shape[-1] != layer.head_dim:
        raise ValueError(f"keys {keys.shape} / values {values.shape} must be [batch, kv_heads, new, "
                         f"{layer.head_dim}]")
    packing.check_finite("GEAR append keys/values", keys, values)
    cfg = layer.config
    nb, g, bits = cfg.streaming_gap, cfg.group, cfg.bits
    n = keys.shape[-2]
    cp = layer.prefill_capacity
    n_pre = (n // g) * g if cp else 0
    if n_pre > cp:
        raise ValueError(f"a prompt of {n} tokens needs a GEAR prefill region of {n_pre} tokens, the cache "
                         f"has {cp}: init_gear_cache(prefill_capacity=...)")
    p0 = layer.p0
    nbs = layer.sk["p"].shape[-3]
    max_blocks = (nb - 1 + n) // nb

    def stream_row(sk, sv, kbuf, vbuf, blen, slen, knew, vnew):
        # merge the buffer with the new tokens and compress every full n_b block
        total = blen + n
        m = total // nb
        rows = max_blocks * nb + nb
        kb = jax.lax.dynamic_update_slice(_pad_rows(kbuf.astype(jnp.float32), rows, 0), knew.astype(jnp.float32),
                                          (blen, 0))
        vb = jax.lax.dynamic_update_slice(_pad_rows(vbuf.astype(jnp.float32), rows, 0), vnew.astype(jnp.float32),
                                          (blen, 0))
        if max_blocks:
            kblk = kb[: max_blocks * nb].reshape(max_blocks, nb, -1)
            vblk = vb[: max_blocks * nb].reshape(max_blocks, nb, -1)
            ck = jax.vmap(lambda x: compress(x, "key", bits, g, cfg.rank, cfg.loop, cfg.outlier_ratio, p0))(kblk)
            cv = jax.vmap(lambda x: compress(x, "value", bits, g, cfg.rank, cfg.loop, cfg.outlier_ratio, p0))(vblk)
            first = slen // nb
            bidx = jnp.where(jnp.arange(max_blocks) < m, first + jnp.arange(max_blocks), nbs)  # nbs: dropped
            sk, sv = dict(sk), dict(sv)
            for name, arr in ck.items():
                sk[name] = _write_blocks(sk[name], arr, bidx, name, "key", nb, g)
            for name, arr in cv.items():
                sv[name] = _write_blocks(sv[name], arr, bidx, name, "value", nb, g)
        start = m * nb
        kbuf_new = jax.lax.dynamic_slice(kb, (start, 0), (nb, kb.shape[1]))
        vbuf_new = jax.lax.dynamic_slice(vb, (start, 0), (nb, vb.shape[1]))
        return sk, sv, kbuf_new.astype(kbuf.dtype), vbuf_new.astype(vbuf.dtype), total - start, slen + start

    f = jax.vmap(jax.vmap(stream_row))
    sk, sv, kbuf, vbuf, blen, slen = f(layer.sk, layer.sv, layer.k_buf, layer.v_buf, layer.buf_len,
                                       layer.s_len, keys, values)
    pk, pv, pre_len = layer.pk, layer.pv, layer.pre_len
    if n_pre:
        def prefill_row(knew, vnew, kbuf0, vbuf0):
            ck = compress(knew[:n_pre], "key", bits, g, cfg.prefill_rank, cfg.loop, cfg.outlier_ratio, p0)
            cv = compress(vnew[:n_pre], "value", bits, g, cfg.prefill_rank, cfg.loop, cfg.outlier_ratio, p0)
            ck = {name: _pad_piece(a, name, "key", n_pre, cp, g, cfg.outlier_ratio) for name, a in ck.items()}
            cv = {name: _pad_piece(a, name, "value", n_pre, cp, g, cfg.outlier_ratio) for name, a in cv.items()}
            rest = n - n_pre
            kb = jnp.zeros_like(kbuf0).at[:rest].set(knew[n_pre:].astype(kbuf0.dtype))
            vb = jnp.zeros_like(vbuf0).at[:rest].set(vnew[n_pre:].astype(vbuf0.dtype))
            return ck, cv, kb, vb

        ck, cv, kb_p, vb_p = jax.vmap(jax.vmap(prefill_row))(keys, values, layer.k_buf, layer.v_buf)
        empty = layer.lengths == 0                                     # [B, H]
        sel = lambda a, b: jnp.where(empty.reshape(empty.shape + (1,) * (a.ndim - 2)), a, b)
        pk = {name: sel(ck[name], layer.pk[name]) for name in _PIECE}
        pv = {name: sel(cv[name], layer.pv[name]) for name in _PIECE}
        sk = {name: sel(layer.sk[name], sk[name]) for name in _PIECE}
        sv = {name: sel(layer.sv[name], sv[name]) for name in _PIECE}
        kbuf, vbuf = sel(kb_p, kbuf), sel(vb_p, vbuf)
        blen = jnp.where(empty, n - n_pre, blen)
        slen = jnp.where(empty, layer.s_len, slen)
        pre_len = jnp.where(empty, n_pre, layer.pre_len)
    return dataclasses.replace(
        layer, pk=pk, pv=pv, sk=sk, sv=sv, k_buf=kbuf, v_buf=vbuf, pre_len=pre_len.astype(jnp.int32),
        s_len=slen.astype(jnp.int32), buf_len=blen.astype(jnp.int32), lengths=layer.lengths + n,
        pos_offset=_update_offset(layer.pos_offset, layer.lengths, positions))


def _pad_piece(a, name, kind, n, cap, g, ratio):
    """Pad a prefill piece compressed from n rows to the region's `cap` rows (key outliers: from
    outlier_count(n) to outlier_count(cap) per side, the extra ones marked unused by index >= cap)."""
    if name in ("codes", "q") or (kind == "value" and name in ("scale", "min", "oval", "oidx")):
        return _pad_rows(a, cap, 0)
    if name in ("scale", "min"):
        return _pad_rows(a, cap // g, 0)
    if name in ("oval", "oidx"):
        extra = 2 * (outlier_count(cap, ratio) - outlier_count(n, ratio))
        if extra:
            fill = np.iinfo(np.int32).max if name == "oidx" else 0
            return jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], fill, a.dtype)], axis=0)
    return a


def _write_blocks(dst, arr, bidx, name, kind, nb, g):
    """Scatter per-block compressed arrays `arr [blocks, ...]` into a stream region at block `bidx`."""
    if name == "p" or (kind == "key" and name in ("oval", "oidx")):
        return dst.at[bidx].set(arr.astype(dst.dtype), mode="drop")
    rows = nb // g if (kind == "key" and name in ("scale", "min")) else nb
    flat_idx = (bidx[:, None] * rows + jnp.arange(rows)[None, :]).reshape(-1)
    return dst.at[flat_idx].set(arr.reshape((-1,) + arr.shape[2:]).astype(dst.dtype), mode="drop")


def dequantize(layer: GEARCache, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Dense keys, values `[..., kv_heads, Cp + Cs + n_b, d]` in slot order: prefill region, stream
    region, buffer (slots not holding tokens are masked by `positions`)."""
    cfg = layer.config
    nb, g, bits = cfg.streaming_gap, cfg.group, cfg.bits
    lead = layer.lengths.shape

    def flat(tree, extra):
        return {k: v.reshape((-1,) + v.shape[len(lead) + extra:]) for k, v in tree.items()}

    def unflat(x):
        return x.reshape(lead + x.shape[1:])

    pk = unflat(jax.vmap(lambda c: decompress(c, "key", bits, g))(flat(layer.pk, 0)))
    pv = unflat(jax.vmap(lambda c: decompress(c, "value", bits, g))(flat(layer.pv, 0)))

    def stream(tree, kind):
        nbs = tree["p"].shape[-3]

        def blocks(c):  # one row: split the region into its blocks
            if kind == "key":
                per = dict(codes=c["codes"].reshape(nbs, nb, -1), scale=c["scale"].reshape(nbs, nb // g, -1),
                           min=c["min"].reshape(nbs, nb // g, -1), oval=c["oval"], oidx=c["oidx"],
                           q=c["q"].reshape(nbs, nb, -1), p=c["p"])
            else:
                per = {k: (v if k == "p" else v.reshape((nbs, nb) + v.shape[1:])) for k, v in c.items()}
            return jax.vmap(lambda b: decompress(b, kind, bits, g))(per).reshape(nbs * nb, -1)

        return unflat(jax.vmap(blocks)(flat(tree, 0)))

    sk, sv = stream(layer.sk, "key"), stream(layer.sv, "value")
    k = jnp.concatenate([pk, sk, layer.k_buf.astype(jnp.float32)], axis=-2)
    v = jnp.concatenate([pv, sv, layer.v_buf.astype(jnp.float32)], axis=-2)
    return k.astype(dtype), v.astype(dtype)


def slot_positions(layer: GEARCache) -> jax.Array:
    """`[..., kv_heads, Cp + Cs + n_b]` int32 positions of the dense slots (-1 = empty/padding)."""
    cp, cs, nb = layer.prefill_capacity, layer.stream_capacity, layer.k_buf.shape[-2]
    pre, sl, bl = layer.pre_len[..., None], layer.s_len[..., None], layer.buf_len[..., None]
    i = lambda n: jnp.arange(n, dtype=jnp.int32)
    tok = jnp.concatenate([
        jnp.where(i(cp) < pre, i(cp), -1),
        jnp.where(i(cs) < sl, pre + i(cs), -1),
        jnp.where(i(nb) < bl, pre + sl + i(nb), -1)], axis=-1)
    pos = tok + layer.pos_offset[..., None]
    return jnp.where((tok >= 0) & (pos >= 0), pos, -1).astype(jnp.int32)
