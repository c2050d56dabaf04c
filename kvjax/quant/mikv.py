"""MiKV: importance-aware mixed-precision KV cache -- evicted tokens are kept at low precision.

Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
Precision Quantization", arXiv 2402.18096. Spec: shared/methods/quantization_and_sparse_attention.md
§5 (MiKV; secondary sources only, no official code).

* Importance comes from any eviction scorer of `kvjax.policies` (H2O's accumulated attention,
  SnapKV's observation window, ...): of the tokens compressed in a round, the `keep_ratio` with the
  highest scores -- the ones the policy would keep at that budget -- stay at high precision
  (float16 by default, or per-token int8/int4), the others -- the ones it would evict -- are
  **retained** with per-token asymmetric RTN at `lo_bits` (2) instead of being dropped.
* Outlier-aware channel balancer from prefill statistics: b_c = sqrt(max|q_c| / max|k_c|); keys
  are stored as k * b (quantized per token) and divided by b after dequantization (equivalently
  the queries are divided by b), which leaves q.k unchanged while flattening key outlier channels.
  The cache holds post-RoPE keys, so |q_c| and |k_c| are taken as the norms of the RoPE pairs
  (c, c + d/2) -- the same b for both members of a pair commutes with RoPE.

The storage is `kvjax.quant.zipcache.MixedCache` (full-precision buffer + a high and a low
precision pool with token positions): prefill tokens wait in the buffer during the prefill forward,
then `compress` scores them with the policy and moves them into the pools; decode tokens
accumulate in the buffer until the caller compresses again.

Pool layout (per layer slice; stacked caches add a leading `layers` axis):
    hi (hi_bits 16): k, v [B, H, Ch, d] float16
    hi (hi_bits 8/4) and lo: k_codes, v_codes [B, H, C, d*bits/8] uint8, k_scale, k_min, v_scale,
        v_min [B, H, C, d/G] float16 (G = head_dim by default: per token)
    rounds["balance"] [B, H, d] float16 (1 = no balancing; set at the first compression)

Bad input -> ValueError: bits unsupported, G not dividing head_dim, keep_ratio outside [0, 1],
a policy without the observations it needs, NaN/inf (eager calls).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.observation import Observation, Observe, Observer
from kvjax.policies.base import ScoringPolicy
from kvjax.quant import packing
from kvjax.quant.zipcache import MixedCache, compress_layer, dense_view, init_mixed_cache, scatter_rows

MIKV_HI_BITS = (4, 8, 16)
MIKV_LO_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class MiKVConfig:
    """MiKV hyperparameters: keep_ratio of the tokens at high precision (fp16), the rest at 2-bit
    per token, channel balancer on."""

    keep_ratio: float = 0.2
    hi_bits: int = 16
    lo_bits: int = 2
    group: Optional[int] = None
    balance: bool = True

    def group_size(self, d: int) -> int:
        return d if self.group is None else self.group

    @property
    def hi_fraction(self) -> float:
        return self.keep_ratio

    def validate(self, head_dim: int) -> None:
        if self.hi_bits not in MIKV_HI_BITS:
            raise ValueError(f"MiKV hi_bits={self.hi_bits} is not supported: choose one of {MIKV_HI_BITS}")
        if self.lo_bits not in MIKV_LO_BITS:
            raise ValueError(f"MiKV lo_bits={self.lo_bits} is not supported: choose one of {MIKV_LO_BITS}")
        g = self.group_size(head_dim)
        if g <= 0 or head_dim % g:
            raise ValueError(f"MiKV group size {g} must be positive and divide head_dim={head_dim}")
        if not 0 <= self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in [0, 1], got {self.keep_ratio}")

    # ------------------------------------------------------------- MixedCache pool protocol
    def pool_arrays(self, lead, cap, d, which):
        bits = self.hi_bits if which == "hi" else self.lo_bits
        z = lambda *s, dt=jnp.float16: jnp.zeros(lead + s, dt)
        if bits == 16:
            return dict(k=z(cap, d), v=z(cap, d))
        g = self.group_size(d)
        pb = packing.packed_size(d, bits)
        return dict(k_codes=z(cap, pb, dt=jnp.uint8), k_scale=z(cap, d // g), k_min=z(cap, d // g),
                    v_codes=z(cap, pb, dt=jnp.uint8), v_scale=z(cap, d // g), v_min=z(cap, d // g))

    def round_arrays(self, lead, r, d):
        return dict(balance=jnp.ones(lead + (d,), jnp.float16))

    def quantize_into(self, pool, rounds, which, k, v, mask, rows, n_rounds, pool_len, extra=None):
        bits = self.hi_bits if which == "hi" else self.lo_bits
        b = rounds["balance"].astype(jnp.float32)[..., None, :]
        kb = k * b
        pool = dict(pool)
        if bits == 16:
            pool["k"] = scatter_rows(pool["k"], rows, kb.astype(jnp.float16))
            pool["v"] = scatter_rows(pool["v"], rows, v.astype(jnp.float16))
            return pool, rounds
        g = self.group_size(k.shape[-1])
        for name, x in (("k", kb), ("v", v)):
            codes, scale, mn = packing.quantize(x, bits, g, axis=-1)
            pool[f"{name}_codes"] = scatter_rows(pool[f"{name}_codes"], rows, packing.pack(codes, bits))
            pool[f"{name}_scale"] = scatter_rows(pool[f"{name}_scale"], rows, scale)
            pool[f"{name}_min"] = scatter_rows(pool[f"{name}_min"], rows, mn)
        return pool, rounds

    def dequantize_pool(self, pool, rounds, which):
        bits = self.hi_bits if which == "hi" else self.lo_bits
        b = rounds["balance"].astype(jnp.float32)[..., None, :]
        if bits == 16:
            k, v = pool["k"].astype(jnp.float32), pool["v"].astype(jnp.float32)
        else:
            g = self.group_size(pool["k_codes"].shape[-1] * 8 // bits)
            k = packing.dequantize(packing.unpack(pool["k_codes"], bits), pool["k_scale"], pool["k_min"], g, axis=-1)
            v = packing.dequantize(packing.unpack(pool["v_codes"], bits), pool["v_scale"], pool["v_min"], g, axis=-1)
        return k / b, v


# ----------------------------------------------------------------------------- pure pieces

def pair_norms(x: jax.Array) -> jax.Array:
    """RoPE-pair magnitude of every channel: [..., d] -> [..., d], entry c = ||(x_c, x_{c +- d/2})||."""
    h = x.shape[-1] // 2
    r = jnp.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
    return jnp.concatenate([r, r], axis=-1)


def channel_balancer(q: jax.Array, k: jax.Array, k_mask: jax.Array) -> jax.Array:
    """b_c = sqrt(max|q_c| / max|k_c|) per kv-head (RoPE-pair magnitudes; 1 where undefined).

    q [B, Hq, T, d] (the queries of the GQA group of each kv-head), k [B, H, S, d], k_mask [B, H, S]
    -> [B, H, d] float32."""
    b, hq, t, d = q.shape
    h = k.shape[1]
    qmax = pair_norms(q.astype(jnp.float32)).reshape(b, h, hq // h * t, d).max(2)
    kmax = jnp.max(jnp.where(k_mask[..., None], pair_norms(k.astype(jnp.float32)), 0.0), axis=2)
    ok = (kmax > 0) & (qmax > 0)
    return jnp.where(ok, jnp.sqrt(qmax / jnp.where(ok, kmax, 1.0)), 1.0)


def quantize_dequantize_tokens(x: jax.Array, bits: int, group: int, balance: Optional[jax.Array] = None):
    """Per-token asymmetric RTN round trip of x [..., T, d] (keys: pass the balancer [..., d])."""
    packing.check_finite("MiKV keys/values", x)
    xf = x.astype(jnp.float32)
    b = jnp.ones(x.shape[-1], jnp.float32) if balance is None else balance.astype(jnp.float32)[..., None, :]
    codes, scale, mn = packing.quantize(xf * b, bits, group, axis=-1)
    return packing.dequantize(packing.unpack(packing.pack(codes, bits), bits), scale, mn, group, axis=-1) / b


# ----------------------------------------------------------------------------- cache

def init_mikv_cache(cfg: MiKVConfig, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                    buffer: int, dtype=jnp.float32) -> MixedCache:
    """MiKV cache stacked over layers: pools for `capacity` compressed tokens (high pool
    ceil(keep_ratio * capacity) + rounding slack of half a token per compression round, for up to
    max(8, capacity // 50) rounds) and a `buffer`-token fp buffer (`zipcache.check_buffer` raises
    if a pool or the buffer overflowed)."""
    if capacity <= 0 or buffer <= 0:
        raise ValueError(f"capacity and buffer must be positive, got {capacity}, {buffer}")
    slack = max(8, capacity // 50)
    hi_cap = min(capacity, math.ceil(cfg.keep_ratio * capacity) + slack)
    lo_cap = min(capacity, math.ceil((1 - cfg.keep_ratio) * capacity) + slack)
    return init_mixed_cache(cfg, n_layers, batch, kv_heads, head_dim, hi_cap, lo_cap, buffer, 1, dtype)


def dense_cache(cache: MixedCache) -> kvcache.KVCache:
    """The cache as a dense `KVCache` (dequantized; slot order = the order `attend` uses)."""
    k, v = dense_view(cache)
    return kvcache.KVCache(keys=k, values=v, positions=cache.positions, lengths=cache.lengths)


def observe_for(policy: ScoringPolicy) -> Observe:
    """The per-token observations a forward returns for `compress`: the pre-RoPE queries (channel
    balancer; also the policy's `qkv`) and the policy's `hidden`. Attention statistics are reduced
    inside the layers: pass `observer=observer_for(policy)` to the same forward."""
    return Observe(qkv=True, hidden=policy.observe.hidden)


def observer_for(policy: ScoringPolicy) -> Observer:
    """The forward's in-layer reduction for `compress`: the policy's scores `[L, B, H, S]` over the
    cache's slots (hi pool, lo pool, buffer) after the forward's tokens entered the buffer."""
    return Observer(policy)


def compress(cache: MixedCache, obs: dict, policy: ScoringPolicy, config, accumulated=None) -> MixedCache:
    """One MiKV round on a stacked cache after a forward run with `observe_for(policy)` (and,
    for policies that observe attention, `observer=observer_for(policy)`).

    obs: that forward's outputs: "scores" `[layers, B, H, slots]` reduced inside the layers (used
    as they are when present), else the scores are computed here from the dequantized cache and the
    per-token observations (policies that need only keys / q, k, v, e.g. KNorm); "q_pre" for the
    balancer. config: the model config; accumulated: the running score of accumulating policies
    (H2O) `[layers, B, H, slots]` over this cache's slots when the scores are computed here. The
    buffered tokens are ranked by the scores; the top keep_ratio go to the high-precision pool."""
    cfg = cache.method
    if obs.get("scores") is not None:
        scores = obs["scores"]                                          # [L, B, H, S] from the layers
        if scores.shape[-1] != cache.capacity:
            raise ValueError(f"scores cover {scores.shape[-1]} slots, the cache has {cache.capacity}: pass the "
                             "outputs of the forward that filled this cache")
    else:
        if policy.accumulates and accumulated is None:
            raise ValueError(f"{type(policy).__name__} accumulates scores: pass `accumulated` (or the forward's "
                             "in-layer scores, observer=observer_for(policy))")
        if policy.observe.wants_attention:
            raise ValueError(f"{type(policy).__name__} observes attention, which is reduced inside the layers: run "
                             "the forward with observer=observer_for(policy) and pass its outputs")
        observation = Observation(cache=dense_cache(cache), config=config, q_pre=obs.get("q_pre"),
                                  k_pre=obs.get("k_pre"), v=obs.get("v"), hidden=obs.get("hidden"),
                                  accumulated=accumulated, n_layers=cache.lengths.shape[0])
        scores = policy.score(observation)                              # [L, B, H, S]
    cb = cache.buf_pos.shape[-1]
    sal = scores[..., -cb:]
    if cfg.balance:
        if obs.get("q_pre") is None:
            raise ValueError("the MiKV balancer needs the queries: run the forward with observe_for(policy)")
        valid = cache.buf_pos >= 0
        b_new = jax.vmap(channel_balancer)(obs["q_pre"], cache.buf_k, valid)  # pair norms: RoPE-free
        first = (cache.n_rounds == 0)[..., None]
        bal = jnp.where(first, b_new, cache.rounds["balance"].astype(jnp.float32)).astype(jnp.float16)
        cache = dataclasses.replace(cache, rounds=dict(cache.rounds, balance=bal))
    return jax.vmap(compress_layer)(cache, sal)
