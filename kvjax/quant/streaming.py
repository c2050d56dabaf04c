"""Self-compressing ZipCache / MiKV caches: their compression rounds run inside `append`, so they
work as `generate(..., cache_init=...)` caches with no caller-side `compress` calls.

`kvjax.quant.zipcache` and `kvjax.quant.mikv` keep new tokens in a full-precision buffer and move
them into mixed-precision pools when the *caller* runs a compression round with the queries of the
last forward (ZipCache's probe queries; MiKV's scorer observations). `generate` has no such hook, and
the cache protocol hands a cache only keys and values (`append`) and, separately, queries (`attend`,
whose result cannot update the cache). So this wrapper:

* runs a round **lazily at the start of an `append`** whose tokens would not fit the buffer (a
  `lax.cond`: decode steps that do not fill it cost nothing extra), and in `resize` -- which generate
  calls once, right after the prefill -- where it also shrinks the buffer from the prompt size to
  `interval` slots. The prompt is therefore attended exactly during prefill (it waits in the buffer),
  as in ZipCache, and then compressed; decode tokens are compressed every `interval` tokens.
* scores tokens **without queries** (a deviation, forced by the protocol):
  - ZipCache: normalized attention saliency (`zipcache.normalized_saliency`) with the buffered
    **keys as probe queries** (all of them, causal), instead of the last 5 % + random 5 % queries.
  - MiKV: the KNorm scorer (`kvjax.policies.knorm`: small key norm = important, Devoto et al. 2024),
    one of the eviction issue's scorers that needs only keys; the query/key channel balancer is off
    (it needs max |q_c|).
  What generate would need for the faithful versions: forward with `Observe(qkv=True)` (ZipCache) or
  `mikv.observe_for(policy)` + `observer=mikv.observer_for(policy)` (MiKV: the scorer's scores are
  reduced inside the layers over the MixedCache's slots) during prefill and decode, keep the last `interval` decode queries
  (`kvjax.compression.QueryBuffer` does this for decode-time eviction), and call
  `cache = zipcache.compress(cache, queries_from_obs(...), positions)` / `mikv.compress(cache, obs,
  policy, config)` after the prefill and every `interval` decode steps -- e.g. a
  `cache.compress_round(obs, config)` hook next to `kvjax.compression.decode_compress`.

Layout: `inner` is the `zipcache.MixedCache` (see that module); `interval` and `scorer` are static.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from kvjax.quant import mikv, packing, zipcache


@dataclasses.dataclass(frozen=True)
class StreamingMixedCache:
    inner: zipcache.MixedCache
    interval: int = 100
    scorer: str = "zipcache"     # "zipcache" (key-probe saliency) | "knorm" (MiKV)
    pool_tokens: int = 0         # tokens the pools were sized for

    lengths = property(lambda self: self.inner.lengths)
    positions = property(lambda self: self.inner.positions)
    capacity = property(lambda self: self.inner.capacity)
    head_dim = property(lambda self: self.inner.head_dim)

    @property
    def buffer_size(self) -> int:
        return self.inner.buf_pos.shape[-1]

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def append(self, keys, values, positions, keys_pre_rope=None) -> "StreamingMixedCache":
        """keys (post-RoPE), values `[batch, kv_heads, new, d]`; a compression round first if the new
        tokens do not fit the buffer. Works on a layer slice (inside the model's scan)."""
        packing.check_finite("append keys/values", keys, values)
        n = keys.shape[-2]
        if n > self.buffer_size:
            raise ValueError(f"{n} new tokens do not fit the {self.buffer_size}-token buffer: append fewer at a time "
                             "(decode) or build the cache with a larger capacity (prefill)")
        full = jnp.max(self.inner.buf_len) + n > self.buffer_size
        inner = jax.lax.cond(full, lambda c: compress_round(c, self.scorer), lambda c: c, self.inner)
        return dataclasses.replace(self, inner=inner.append(keys, values, positions))

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        return self.inner.attend(q, query_positions, observe=observe, backend=backend)

    def resize(self, capacity: int) -> "StreamingMixedCache":
        """Compress the buffer (the prompt after a prefill) and shrink it to `interval` slots.
        `capacity` (the total tokens the caller will hold) must fit the pools."""
        if capacity > self.pool_tokens + self.buffer_size:
            raise ValueError(f"cannot grow the {self.scorer} cache to {capacity} tokens: its pools were built for "
                             f"{self.pool_tokens}")
        inner = _compress_stacked(self.inner, self.scorer)
        b = min(self.interval, self.buffer_size)
        inner = dataclasses.replace(inner, buf_k=inner.buf_k[..., :b, :], buf_v=inner.buf_v[..., :b, :],
                                    buf_pos=inner.buf_pos[..., :b])
        return dataclasses.replace(self, inner=inner)


jax.tree_util.register_dataclass(StreamingMixedCache, data_fields=["inner"],
                                 meta_fields=["interval", "scorer", "pool_tokens"])


def key_probe_saliency(cache: zipcache.MixedCache) -> jax.Array:
    """ZipCache's normalized attention saliency of the buffered tokens of one layer slice, with the
    buffered keys (post-RoPE) as probe queries -> [B, H, Cb]."""
    q = cache.buf_k.astype(jnp.float32)                                  # [B, H, Cb, d] (group of 1)
    q_pos = cache.buf_pos[:, 0, :]                                        # same for every head
    probs = zipcache.probe_attention(cache, q, q_pos)                     # [B, H, Cb, S]
    sal = zipcache.normalized_saliency(probs, jnp.broadcast_to(q_pos[:, None, :], probs.shape[:3]),
                                       cache.positions)
    return sal[..., -cache.buf_pos.shape[-1]:]


def compress_round(cache: zipcache.MixedCache, scorer: str) -> zipcache.MixedCache:
    """One round on a layer slice: buffered tokens -> high/low precision pools."""
    if scorer == "zipcache":
        sal = key_probe_saliency(cache)
    elif scorer == "knorm":
        sal = -jnp.linalg.norm(cache.buf_k.astype(jnp.float32), axis=-1)
    else:
        raise ValueError(f"unknown scorer {scorer!r}")
    return zipcache.compress_layer(cache, sal)


def _compress_stacked(cache: zipcache.MixedCache, scorer: str) -> zipcache.MixedCache:
    """A round on every layer: a cache stacked over layers (buf_pos [L, B, H, Cb]) or, in the
    engine's per-layer layout (`kvjax.layerwise.LayerwiseCache`), one layer slice ([B, H, Cb])."""
    if cache.buf_pos.ndim == 3:
        return jax.jit(lambda c: compress_round(c, scorer))(cache)
    return jax.jit(jax.vmap(lambda c: compress_round(c, scorer)))(cache)


def _bits_cfg(method: str, kw: dict):
    if method == "zipcache":
        names = {f.name for f in dataclasses.fields(zipcache.ZipCacheConfig)}
        cfg = {k: v for k, v in kw.items() if k in names}
        if "interval" in kw:
            cfg["streaming_gap"] = kw["interval"]
        return zipcache.ZipCacheConfig(**cfg)
    names = {f.name for f in dataclasses.fields(mikv.MiKVConfig)}
    cfg = {k: v for k, v in kw.items() if k in names}
    cfg.setdefault("balance", False)
    if cfg["balance"]:
        raise ValueError("MiKV's channel balancer needs the queries, which a cache does not see inside generate: "
                         "balance=False here (use kvjax.quant.mikv.compress for the balanced variant)")
    return mikv.MiKVConfig(**cfg)


def init_streaming_cache(method: str, config, batch: int, capacity: int, interval: int = 100,
                         dtype=jnp.float32, **kw) -> StreamingMixedCache:
    """A self-compressing ZipCache ("zipcache") or MiKV ("mikv") cache for a ModelConfig: pools for
    `capacity` tokens, a `capacity`-token buffer during prefill (shrunk to `interval` by `resize`)."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    cfg = _bits_cfg(method, dict(kw, interval=interval))
    L, H, d = config.n_layers, config.n_kv_heads, config.head_dim
    if method == "zipcache":
        inner = zipcache.init_zipcache(cfg, L, batch, H, d, capacity, capacity, dtype)
        scorer = "zipcache"
    else:
        inner = mikv.init_mikv_cache(cfg, L, batch, H, d, capacity, capacity, dtype)
        scorer = "knorm"
    return StreamingMixedCache(inner, interval, scorer, capacity)


def bytes_per_token(method: str, head_dim: int, interval: int = 100, **kw) -> float:
    """Compressed bytes per token per kv-head, K + V, at the configured high/low split: codes, fp16
    per-token stats, int32 position; per-round (per-channel) stats amortised over `interval` tokens."""
    cfg = _bits_cfg(method, dict(kw, interval=interval))
    d = head_dim
    f = cfg.hi_fraction

    def tok(bits, per_token_stats):
        return 2 * d * bits / 8 + per_token_stats + 4

    if method == "zipcache":
        # keys: per-channel scale/min per round (2*2*d B per round), values: f16 step/min per token
        # + f16 channel divisor per round
        per = lambda bits: tok(bits, 2 * 2) + (2 * 2 * d + 2 * d) / interval
        return f * per(cfg.hi_bits) + (1 - f) * per(cfg.lo_bits)
    g = cfg.group_size(d)
    lo = tok(cfg.lo_bits, 2 * 2 * 2 * d / g)
    hi = 2 * 2 * d + 4 if cfg.hi_bits == 16 else tok(cfg.hi_bits, 2 * 2 * 2 * d / g)
    return f * hi + (1 - f) * lo
