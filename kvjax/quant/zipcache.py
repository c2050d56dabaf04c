"""ZipCache: mixed-precision KV cache quantization driven by normalized attention saliency.

He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", arXiv 2405.14256 (code: ThisisBillhe/ZipCache). Spec:
shared/methods/quantization_and_sparse_attention.md §5 (ZipCache).

* Saliency = normalized attention p_j = sum_i A_ij / nnz(column j): the attention that the probe
  queries pay to token j divided by the number of probe queries that can see j (causal mask).
  Probe queries (FlashAttention-compatible approximation): the last 5 % of the new tokens plus 5 %
  sampled at random among the others; probe attention is summed over the GQA group of each kv-head.
* The least salient `unimportant_ratio` (0.4) of the tokens of a compression round are stored at
  2 bits, the rest at 4 bits.
* Keys: channel-wise quantization (min/max per channel over the round's tokens of one precision).
* Values: channel-separable token-wise quantization: divide channel c by s_c = sqrt(max_t |x_tc|)
  (over the same tokens), quantize per token with min/max over the channels, dequantize as
  (code * step + min) * s_c. (ZipCache takes the per-token min/max over all H*D channels; since
  the salient set differs per kv-head here, it is taken over the head's d channels.)
* Streaming: new tokens wait in a full-precision buffer; `compress` (called by the caller after
  the prefill forward and then every `streaming_gap` = 100 tokens) computes the saliency of the
  buffered tokens from the probe queries of the last forward and moves them into the two pools.

The cache (`MixedCache`, shared with `kvjax.quant.mikv`) is a full-precision buffer plus a
high-precision and a low-precision token pool; tokens are stored in pool order with their
positions (attention is order-free given the positions mask). Layout per layer slice (stacked
cache: leading `layers` axis; Ch, Cl pool capacities, Cb buffer capacity, R max rounds):

    hi["k_codes"] [B, H, Ch, d*hi_bits/8] uint8, hi["v_codes"] likewise, hi["v_scale"], hi["v_min"]
        [B, H, Ch, 1] f16 (per token); lo[...] the same with Cl rows at lo_bits
    rounds["hi_k_scale"], ["hi_k_min"], ["hi_v_chan"], ["lo_..."] [B, H, R, d] f16 (per round)
    rounds["hi_start"], ["lo_start"] [B, H, R] int32  first pool row of each round
    hi_pos [B, H, Ch], lo_pos [B, H, Cl], buf_pos [B, H, Cb] int32 (-1 = empty)
    buf_k, buf_v [B, H, Cb, d] cache dtype (post-RoPE keys)
    hi_len, lo_len, buf_len, n_rounds, lengths [B, H] int32

Bad input -> ValueError: bits not in {2, 4, 8}, ratio outside [0, 1], non-positive sizes, a
forward without the queries the saliency needs, NaN/inf (eager calls).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import tree_bytes
from kvjax.quant import packing

ZIP_BITS = (2, 4, 8)
BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class ZipCacheConfig:
    """ZipCache hyperparameters (official defaults: 4-bit salient / 2-bit rest, 40 % unimportant,
    5 % recent + 5 % random probe queries, re-compression every 100 decode steps)."""

    hi_bits: int = 4
    lo_bits: int = 2
    unimportant_ratio: float = 0.4
    probe_recent: float = 0.05
    probe_random: float = 0.05
    streaming_gap: int = 100
    seed: int = 0

    def validate(self, head_dim: int) -> None:
        for name, b in (("hi_bits", self.hi_bits), ("lo_bits", self.lo_bits)):
            if b not in ZIP_BITS:
                raise ValueError(f"ZipCache {name}={b} is not supported: choose one of {ZIP_BITS}")
            packing.packed_size(head_dim, b)
        if not 0 <= self.unimportant_ratio <= 1:
            raise ValueError(f"unimportant_ratio must be in [0, 1], got {self.unimportant_ratio}")
        if not (0 < self.probe_recent <= 1 and 0 <= self.probe_random <= 1):
            raise ValueError("probe fractions must be in (0, 1] (recent) and [0, 1] (random)")
        if self.streaming_gap <= 0:
            raise ValueError(f"streaming_gap must be positive, got {self.streaming_gap}")

    @property
    def hi_fraction(self) -> float:
        return 1.0 - self.unimportant_ratio

    # the pool protocol of `MixedCache` (implemented below)
    def pool_arrays(self, lead, cap, d, which):
        return _zip_pool_arrays(self, lead, cap, d, which)

    def round_arrays(self, lead, r, d):
        return _zip_round_arrays(self, lead, r, d)

    def quantize_into(self, pool, rounds, which, k, v, mask, rows, n_rounds, pool_len, extra=None):
        return _zip_quantize_into(self, pool, rounds, which, k, v, mask, rows, n_rounds, pool_len, extra)

    def dequantize_pool(self, pool, rounds, which):
        return _zip_dequantize_pool(self, pool, rounds, which)


# ----------------------------------------------------------------------------- pure quantizers

def quant_with_stats(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int):
    """Asymmetric RTN of x against given min `lo` and max `hi` (broadcastable to x):
    scale = f16((hi - lo) / (2^b - 1)), min = f16(lo), code = clip(round((x - min) / scale)).
    returns (codes uint8 like x, scale f16, min f16)."""
    levels = (1 << bits) - 1
    mn = lo.astype(jnp.float16)
    scale = ((hi - lo) / levels).astype(jnp.float16)
    s32, m32 = scale.astype(jnp.float32), mn.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.where(s32 > 0, jnp.clip(jnp.round((x.astype(jnp.float32) - m32) / safe), 0, levels), 0.0)
    return codes.astype(jnp.uint8), scale, mn


def _masked_minmax(x, mask, axis):
    lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, keepdims=True)
    hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
    ok = jnp.isfinite(lo)
    return jnp.where(ok, lo, 0.0), jnp.where(ok, hi, 0.0)


def quantize_keys_channelwise(k: jax.Array, mask: jax.Array, bits: int):
    """ZipCache keys: per-channel min/max over the masked tokens. k [T, d], mask [T] bool ->
    (codes uint8 [T, d] (unpacked), scale, min f16 [d])."""
    m = mask[:, None]
    lo, hi = _masked_minmax(k.astype(jnp.float32), m, 0)
    codes, scale, mn = quant_with_stats(k, lo, hi, bits)
    return codes, scale[0], mn[0]


def quantize_values_channel_separable(v: jax.Array, mask: jax.Array, bits: int):
    """ZipCache values: s_c = sqrt(max_t |v_tc|) over the masked tokens, then per-token min/max of
    v / s. v [T, d] -> (codes uint8 [T, d], step f16 [T, 1], min f16 [T, 1], s f16 [d])."""
    vf = v.astype(jnp.float32)
    amax = jnp.max(jnp.where(mask[:, None], jnp.abs(vf), 0.0), axis=0)
    chan = jnp.sqrt(amax).astype(jnp.float16)
    c32 = chan.astype(jnp.float32)
    y = vf / jnp.where(c32 > 0, c32, 1.0)
    lo, hi = jnp.min(y, -1, keepdims=True), jnp.max(y, -1, keepdims=True)
    codes, step, mn = quant_with_stats(y, lo, hi, bits)
    return codes, step, mn, chan


def dequantize_keys_channelwise(codes, scale, mn):
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + mn.astype(jnp.float32)


def dequantize_values_channel_separable(codes, step, mn, chan):
    c = chan.astype(jnp.float32)
    c = jnp.where(c > 0, c, 1.0)
    return (codes.astype(jnp.float32) * step.astype(jnp.float32) + mn.astype(jnp.float32)) * c


def normalized_saliency(probs: jax.Array, probe_pos: jax.Array, slot_pos: jax.Array) -> jax.Array:
    """ZipCache's normalized attention. probs [..., P, S] attention of P probe queries over S slots
    (already reduced to kv-heads), probe_pos [..., P], slot_pos [..., S] (-1 empty)
    -> [..., S] sum_i probs_ij / #{i : probe i sees slot j} (0 where no probe sees j)."""
    sees = (slot_pos[..., None, :] >= 0) & (slot_pos[..., None, :] <= probe_pos[..., :, None])
    nnz = jnp.sum(sees, axis=-2)
    tot = jnp.sum(jnp.where(sees, probs, 0.0), axis=-2)
    return jnp.where(nnz > 0, tot / jnp.maximum(nnz, 1), 0.0)


def probe_indices(n: int, recent: float, random: float, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the probe queries among n new queries: the last ceil(recent*n) plus
    int(random*n) drawn without replacement from the others (static: depends on n only)."""
    n_rec = min(n, max(1, math.ceil(recent * n)))
    rest = n - n_rec
    n_rand = min(rest, int(random * n))
    rng = np.random.default_rng(seed)
    rand = rng.choice(rest, size=n_rand, replace=False) if n_rand else np.zeros(0, np.int64)
    return np.sort(np.concatenate([rand, np.arange(rest, n)])).astype(np.int32)


# ----------------------------------------------------------------------------- the shared mixed cache

@dataclasses.dataclass(frozen=True)
class MixedCache:
    """Buffer + high/low precision pools (see the module docstring); `method` (static) is the
    config object that decides the pools' quantizers (ZipCacheConfig or mikv.MiKVConfig)."""

    hi: dict
    lo: dict
    rounds: dict
    hi_pos: jax.Array
    lo_pos: jax.Array
    buf_k: jax.Array
    buf_v: jax.Array
    buf_pos: jax.Array
    hi_len: jax.Array
    lo_len: jax.Array
    buf_len: jax.Array
    n_rounds: jax.Array
    lengths: jax.Array
    method: Any = None

    @property
    def head_dim(self) -> int:
        return self.buf_k.shape[-1]

    @property
    def capacity(self) -> int:
        return self.hi_pos.shape[-1] + self.lo_pos.shape[-1] + self.buf_pos.shape[-1]

    @property
    def positions(self) -> jax.Array:
        return jnp.concatenate([self.hi_pos, self.lo_pos, self.buf_pos], axis=-1)

    @property
    def keys(self) -> jax.Array:
        """Dense post-RoPE keys `[..., kv_heads, Ch + Cl + Cb, d]` float32 (dequantized, matching
        `positions`): what a scoring policy's observation of this cache sees (e.g. inside a forward
        run with `observer=Observer(policy)`, MiKV's scorers)."""
        return dense_view(self)[0]

    @property
    def values(self) -> jax.Array:
        """Dense values, like `keys`."""
        return dense_view(self)[1]

    def memory_bytes(self) -> int:
        """Bytes of every array held: codes, stats, per-round stats, positions, buffer, counters."""
        return tree_bytes(self)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "MixedCache":
        """New post-RoPE keys and values `[batch, kv_heads, new, d]` enter the fp buffer (writes past
        its capacity are dropped: call `compress` in time; `check_buffer` says if it overflowed)."""
        if keys.shape != values.shape or keys.ndim != 4 or keys.shape[-1] != self.head_dim:
            raise ValueError(f"keys {keys.shape} / values {values.shape} must be [batch, kv_heads, new, "
                             f"{self.head_dim}]")
        packing.check_finite("append keys/values", keys, values)
        n = keys.shape[-2]
        slot = self.buf_len[..., None] + jnp.arange(n, dtype=jnp.int32)
        pos = jnp.broadcast_to(positions[:, None, :], slot.shape).astype(jnp.int32)

        def put(dst, src):
            return jax.vmap(jax.vmap(lambda a, s, u: a.at[s].set(u.astype(a.dtype), mode="drop")))(dst, slot, src)

        return dataclasses.replace(self, buf_k=put(self.buf_k, keys), buf_v=put(self.buf_v, values),
                                   buf_pos=put(self.buf_pos, pos), buf_len=self.buf_len + n,
                                   lengths=self.lengths + n)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        k, v = dense_view(self)
        return attend(q, k, v, self.positions, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(
    MixedCache, data_fields=["hi", "lo", "rounds", "hi_pos", "lo_pos", "buf_k", "buf_v", "buf_pos", "hi_len",
                             "lo_len", "buf_len", "n_rounds", "lengths"], meta_fields=["method"])


def check_buffer(cache: MixedCache) -> None:
    """ValueError (eager) if more tokens were appended than the buffer holds, or if compression
    rounds overflowed a pool or the per-round statistics (writes past a capacity are dropped
    inside jit, so this is the check to run between forwards)."""
    over = int(jnp.max(cache.buf_len))
    if over > cache.buf_pos.shape[-1]:
        raise ValueError(f"the full-precision buffer overflowed ({over} > {cache.buf_pos.shape[-1]} tokens): "
                         "compress more often or allocate a larger buffer")
    for name, length, cap in (("high-precision", cache.hi_len, cache.hi_pos.shape[-1]),
                              ("low-precision", cache.lo_len, cache.lo_pos.shape[-1])):
        if int(jnp.max(length)) > cap:
            raise ValueError(f"the {name} pool overflowed ({int(jnp.max(length))} > {cap} tokens): allocate a "
                             "larger capacity")
    starts = [v for k, v in cache.rounds.items() if k.endswith("_start")]
    if starts and int(jnp.max(cache.n_rounds)) > starts[0].shape[-1]:
        raise ValueError(f"more compression rounds ({int(jnp.max(cache.n_rounds))}) than the cache has statistics "
                         f"for ({starts[0].shape[-1]}): allocate a larger capacity or compress less often")


def init_mixed_cache(method, n_layers: int, batch: int, kv_heads: int, head_dim: int, hi_capacity: int,
                     lo_capacity: int, buffer: int, max_rounds: int, dtype=jnp.float32) -> MixedCache:
    """Empty mixed cache stacked over layers; `method.pool_arrays` shapes the pools."""
    method.validate(head_dim)
    if min(n_layers, batch, kv_heads, head_dim, buffer, max_rounds) <= 0 or min(hi_capacity, lo_capacity) < 0:
        raise ValueError("cache dimensions must be positive")
    lead = (n_layers, batch, kv_heads)
    z = lambda dt=jnp.int32: jnp.zeros(lead, dt)
    return MixedCache(
        hi=method.pool_arrays(lead, hi_capacity, head_dim, "hi"),
        lo=method.pool_arrays(lead, lo_capacity, head_dim, "lo"),
        rounds=method.round_arrays(lead, max_rounds, head_dim),
        hi_pos=jnp.full(lead + (hi_capacity,), -1, jnp.int32), lo_pos=jnp.full(lead + (lo_capacity,), -1, jnp.int32),
        buf_k=jnp.zeros(lead + (buffer, head_dim), dtype), buf_v=jnp.zeros(lead + (buffer, head_dim), dtype),
        buf_pos=jnp.full(lead + (buffer,), -1, jnp.int32),
        hi_len=z(), lo_len=z(), buf_len=z(), n_rounds=z(), lengths=z(), method=method)


def round_index(starts: jax.Array, rows: int) -> jax.Array:
    """Round of every pool row: starts [R] (BIG = unused round) -> [rows] int32 (>= 0)."""
    r = jnp.sum(jnp.arange(rows, dtype=jnp.int32)[:, None] >= starts[None, :], axis=-1) - 1
    return jnp.maximum(r, 0)


def dense_view(cache: MixedCache) -> tuple[jax.Array, jax.Array]:
    """Dense post-RoPE keys and values `[..., kv_heads, Ch + Cl + Cb, d]` (hi pool, lo pool,
    buffer), matching `cache.positions`."""
    m = cache.method
    kh, vh = m.dequantize_pool(cache.hi, cache.rounds, "hi")
    kl, vl = m.dequantize_pool(cache.lo, cache.rounds, "lo")
    k = jnp.concatenate([kh, kl, cache.buf_k.astype(jnp.float32)], axis=-2)
    v = jnp.concatenate([vh, vl, cache.buf_v.astype(jnp.float32)], axis=-2)
    return k, v


def split_buffer(saliency: jax.Array, valid: jax.Array, hi_fraction: float):
    """Rank buffered tokens by saliency (desc; ties -> older slot). saliency, valid [..., Cb] ->
    (rank [..., Cb] int32 (BIG for empty slots), n_hi [...] = round(hi_fraction * count))."""
    s = jnp.where(valid, saliency.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).astype(jnp.int32)
    count = jnp.sum(valid, -1)
    n_hi = jnp.round(hi_fraction * count).astype(jnp.int32)
    return jnp.where(valid, rank, BIG), n_hi


def compress_layer(cache: MixedCache, saliency: jax.Array, extra: Optional[dict] = None) -> MixedCache:
    """Move the buffered tokens of one layer slice into the pools: the round(hi_fraction * count)
    most salient to the high-precision pool, the rest to the low-precision pool (one new round).
    saliency: [B, H, Cb] over the buffer slots; extra: method-specific inputs (MiKV's balancer)."""
    m = cache.method
    valid = cache.buf_pos >= 0
    valid = valid & (jnp.arange(cache.buf_pos.shape[-1]) < cache.buf_len[..., None])
    rank, n_hi = split_buffer(saliency, valid, m.hi_fraction)
    is_hi = rank < n_hi[..., None]
    is_lo = valid & ~is_hi
    hi_row = jnp.where(is_hi, cache.hi_len[..., None] + rank, BIG)
    lo_row = jnp.where(is_lo, cache.lo_len[..., None] + rank - n_hi[..., None], BIG)
    kf, vf = cache.buf_k.astype(jnp.float32), cache.buf_v.astype(jnp.float32)
    rounds = dict(cache.rounds)
    hi, rounds = m.quantize_into(cache.hi, rounds, "hi", kf, vf, is_hi, hi_row, cache.n_rounds, cache.hi_len, extra)
    lo, rounds = m.quantize_into(cache.lo, rounds, "lo", kf, vf, is_lo, lo_row, cache.n_rounds, cache.lo_len, extra)

    def put(dst, rows, src):
        return jax.vmap(jax.vmap(lambda a, r, u: a.at[r].set(u, mode="drop")))(dst, rows, src)

    n_new_hi = jnp.sum(is_hi, -1).astype(jnp.int32)
    n_new_lo = jnp.sum(is_lo, -1).astype(jnp.int32)
    return dataclasses.replace(
        cache, hi=hi, lo=lo, rounds=rounds,
        hi_pos=put(cache.hi_pos, hi_row, cache.buf_pos), lo_pos=put(cache.lo_pos, lo_row, cache.buf_pos),
        buf_k=jnp.zeros_like(cache.buf_k), buf_v=jnp.zeros_like(cache.buf_v),
        buf_pos=jnp.full_like(cache.buf_pos, -1), hi_len=cache.hi_len + n_new_hi, lo_len=cache.lo_len + n_new_lo,
        buf_len=jnp.zeros_like(cache.buf_len),
        n_rounds=cache.n_rounds + (n_new_hi + n_new_lo > 0).astype(jnp.int32))


def scatter_rows(dst: jax.Array, rows: jax.Array, src: jax.Array) -> jax.Array:
    """dst [B, H, C, ...] .at[rows [B, H, Cb]].set(src [B, H, Cb, ...]) (out-of-range rows dropped)."""
    return jax.vmap(jax.vmap(lambda a, r, u: a.at[r].set(u.astype(a.dtype), mode="drop")))(dst, rows, src)


def set_round(dst: jax.Array, n_rounds: jax.Array, val: jax.Array) -> jax.Array:
    """dst [B, H, R, ...] with dst[b, h, n_rounds[b, h]] = val[b, h] (dropped past R)."""
    return jax.vmap(jax.vmap(lambda a, r, u: a.at[r].set(u.astype(a.dtype), mode="drop")))(dst, n_rounds, val)


# ----------------------------------------------------------------------------- ZipCache pools

def _zip_pool_arrays(self, lead, cap, d, which):
    bits = self.hi_bits if which == "hi" else self.lo_bits
    pb = packing.packed_size(d, bits)
    z = lambda *s, dt=jnp.float16: jnp.zeros(lead + s, dt)
    return dict(k_codes=z(cap, pb, dt=jnp.uint8), v_codes=z(cap, pb, dt=jnp.uint8),
                v_step=z(cap, 1), v_min=z(cap, 1))


def _zip_round_arrays(self, lead, r, d):
    z = lambda *s, dt=jnp.float16: jnp.zeros(lead + s, dt)
    out = {}
    for w in ("hi", "lo"):
        out.update({f"{w}_k_scale": z(r, d), f"{w}_k_min": z(r, d), f"{w}_v_chan": z(r, d),
                    f"{w}_start": jnp.full(lead + (r,), BIG, jnp.int32)})
    return out


def _zip_quantize_into(self, pool, rounds, which, k, v, mask, rows, n_rounds, pool_len, extra):
    bits = self.hi_bits if which == "hi" else self.lo_bits
    kc, ks, km = jax.vmap(jax.vmap(lambda x, mk: quantize_keys_channelwise(x, mk, bits)))(k, mask)
    vc, vs, vm, vch = jax.vmap(jax.vmap(lambda x, mk: quantize_values_channel_separable(x, mk, bits)))(v, mask)
    pool = dict(pool)
    pool["k_codes"] = scatter_rows(pool["k_codes"], rows, packing.pack(kc, bits))
    pool["v_codes"] = scatter_rows(pool["v_codes"], rows, packing.pack(vc, bits))
    pool["v_step"] = scatter_rows(pool["v_step"], rows, vs)
    pool["v_min"] = scatter_rows(pool["v_min"], rows, vm)
    rounds = dict(rounds)
    rounds[f"{which}_k_scale"] = set_round(rounds[f"{which}_k_scale"], n_rounds, ks)
    rounds[f"{which}_k_min"] = set_round(rounds[f"{which}_k_min"], n_rounds, km)
    rounds[f"{which}_v_chan"] = set_round(rounds[f"{which}_v_chan"], n_rounds, vch)
    rounds[f"{which}_start"] = set_round(rounds[f"{which}_start"], n_rounds, pool_len)
    return pool, rounds


def _zip_dequantize_pool(self, pool, rounds, which):
    bits = self.hi_bits if which == "hi" else self.lo_bits
    cap = pool["k_codes"].shape[-2]
    lead = pool["k_codes"].shape[:-2]
    starts = rounds[f"{which}_start"].reshape((-1,) + rounds[f"{which}_start"].shape[len(lead):])
    rid = jax.vmap(lambda s: round_index(s, cap))(starts).reshape(lead + (cap,))
    take = lambda a: jnp.take_along_axis(a, rid[..., None], axis=-2)             # [.., R, d] -> [.., cap, d]
    kc, vc = packing.unpack(pool["k_codes"], bits), packing.unpack(pool["v_codes"], bits)
    k = dequantize_keys_channelwise(kc, take(rounds[f"{which}_k_scale"]), take(rounds[f"{which}_k_min"]))
    v = dequantize_values_channel_separable(vc, pool["v_step"], pool["v_min"], take(rounds[f"{which}_v_chan"]))
    return k, v


def init_zipcache(cfg: ZipCacheConfig, n_layers: int, batch: int, kv_heads: int, head_dim: int,
                  capacity: int, buffer: int, dtype=jnp.float32) -> MixedCache:
    """ZipCache stacked over layers: pools sized for `capacity` compressed tokens (the 4-bit pool
    holds ceil(hi_fraction * capacity) + one round of rounding slack, the 2-bit pool the rest),
    a `buffer`-token fp buffer (>= the prompt, then >= streaming_gap), rounds for capacity / gap + 2."""
    if capacity <= 0 or buffer <= 0:
        raise ValueError(f"capacity and buffer must be positive, got {capacity}, {buffer}")
    max_rounds = capacity // cfg.streaming_gap + 2
    hi_cap = min(capacity, math.ceil(cfg.hi_fraction * capacity) + max_rounds)
    lo_cap = min(capacity, math.ceil(cfg.unimportant_ratio * capacity) + max_rounds)
    return init_mixed_cache(cfg, n_layers, batch, kv_heads, head_dim, hi_cap, lo_cap, buffer, max_rounds, dtype)


def probe_attention(cache: MixedCache, q: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Attention probabilities of probe queries over one layer's dense view, summed over the GQA
    group. q [B, Hq, P, d] post-RoPE, q_pos [B, P] -> [B, H, P, S]."""
    from kvjax.attention import attend
    from kvjax.observation import Observe
    k, v = dense_view(cache)
    p = q.shape[2]
    _, obs = attend(q, k, v, cache.positions, q_pos, observe=Observe(window=p))
    probs = obs["window_probs"]                                                  # [B, Hq, P, S]
    b, hq, _, s = probs.shape
    h = cache.lengths.shape[-1]
    return probs.reshape(b, h, hq // h, p, s).sum(2)


def compress(cache: MixedCache, q_post: jax.Array, q_positions: jax.Array) -> MixedCache:
    """ZipCache compression round for a stacked cache after a forward.

    q_post: post-RoPE queries of that forward's tokens [layers, B, Hq, T, d] (from
    `Observe(qkv=True)`'s q_pre rotated with `models.rope.apply_rope`, see `queries_from_obs`);
    q_positions [B, T]. The probe queries (last 5 % + random 5 %) score the buffered tokens."""
    cfg = cache.method
    if q_post is None:
        raise ValueError("ZipCache needs the queries of the last forward: run it with Observe(qkv=True)")
    t = q_post.shape[-2]
    idx = jnp.asarray(probe_indices(t, cfg.probe_recent, cfg.probe_random, cfg.seed))
    qp = q_post[..., idx, :]
    pp = q_positions[:, idx]
    cb = cache.buf_pos.shape[-1]

    def layer(c, ql):
        probs = probe_attention(c, ql, pp)
        sal = normalized_saliency(probs, jnp.broadcast_to(pp[:, None, :], probs.shape[:3]), c.positions)
        return compress_layer(c, sal[..., -cb:])

    return jax.vmap(layer)(cache, qp)


def queries_from_obs(obs: dict, positions: jax.Array, config) -> jax.Array:
    """Post-RoPE queries [layers, B, Hq, T, d] from a forward's `q_pre` observation."""
    from models.rope import apply_rope
    if "q_pre" not in obs:
        raise ValueError("ZipCache needs the queries of the last forward: run it with Observe(qkv=True)")
    q = obs["q_pre"]
    return jax.vmap(lambda x: apply_rope(x, positions, config))(q)
