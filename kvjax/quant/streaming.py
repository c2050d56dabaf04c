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
* scores the buffered tokens with the **real queries**, observed inside the layer: the model calls
  a cache's `attend_and_update` (as for `kvjax.selection`), so every forward's queries update the
  running statistics `stats` of the buffer slots before the layer ends (nothing leaves the layer):
  - ZipCache: normalized attention saliency (`zipcache.normalized_saliency`): the attention the
    probe queries pay to each buffered token over the number of probe queries that see it; probes
    are the last 5 % + a random 5 % of each forward's queries (one forward for a prompt up to the
    engine's chunk, else per chunk) and every decode query.
  - MiKV: accumulated attention (H2O-style, one of MiKV's scorers) of the last `MIKV_WINDOW` (16)
    queries of each forward (SnapKV's observation window of a prefill; each decode query), summed
    over the GQA group; the channel balancer b_c = sqrt(max|q_c| / max|k_c|) from the queries seen
    up to the first round (the prompt's: MiKV's prefill statistics).
  `scorer="keys"` keeps the former query-free variants (ZipCache: the buffered keys as probe
  queries; MiKV: KNorm, no balancer) for comparison (`make_cache_init("zipcache", scorer="keys")`).

Layout: `inner` is the `zipcache.MixedCache` (see that module); stats: "score" [.., B, H, Cb] float32
(summed probe / window attention per buffer slot), "count" [.., B, H, Cb] float32 (probes that saw
the slot), "q_max" [.., B, H, d] float32 (max RoPE-pair query magnitude per kv-head); `interval`,
`scorer` ("zipcache" | "mikv" | "zipcache-keys" | "knorm") and `pool_tokens` are static.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from kvjax.quant import mikv, packing, zipcache

MIKV_WINDOW = 16          # queries of each forward whose attention scores MiKV's buffered tokens
QUERY_SCORERS = ("zipcache", "mikv")


@dataclasses.dataclass(frozen=True)
class StreamingMixedCache:
    inner: zipcache.MixedCache
    stats: dict
    interval: int = 100
    scorer: str = "zipcache"     # "zipcache" | "mikv" (real queries) | "zipcache-keys" | "knorm" (query-free)
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
        inner, stats = jax.lax.cond(full, lambda c, st: compress_round(c, self.scorer, st), lambda c, st: (c, st),
                                    self.inner, self.stats)
        return dataclasses.replace(self, inner=inner.append(keys, values, positions), stats=stats)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        return self.inner.attend(q, query_positions, observe=observe, backend=backend)

    def attend_and_update(self, q, query_positions, *, observe, backend="auto", rope=None):
        """`attend` (q post-RoPE [B, Hq, T, d], positions [B, T]) + the queries' statistics of the
        buffered tokens (`observe_queries`). returns (out, observations, cache)."""
        out, obs = self.attend(q, query_positions, observe=observe, backend=backend)
        if self.scorer not in QUERY_SCORERS:
            return out, obs, self
        return out, obs, dataclasses.replace(self, stats=observe_queries(self.inner, self.stats, q, query_positions,
                                                                         self.scorer))

    def resize(self, capacity: int) -> "StreamingMixedCache":
        """Compress the buffer (the prompt after a prefill) and shrink it to `interval` slots.
        `capacity` (the total tokens the caller will hold) must fit the pools."""
        if capacity > self.pool_tokens + self.buffer_size:
            raise ValueError(f"cannot grow the {self.scorer} cache to {capacity} tokens: its pools were built for "
                             f"{self.pool_tokens}")
        inner, stats = _compress_stacked(self.inner, self.scorer, self.stats)
        b = min(self.interval, self.buffer_size)
        inner = dataclasses.replace(inner, buf_k=inner.buf_k[..., :b, :], buf_v=inner.buf_v[..., :b, :],
                                    buf_pos=inner.buf_pos[..., :b])
        stats = dict(stats, score=stats["score"][..., :b], count=stats["count"][..., :b])
        return dataclasses.replace(self, inner=inner, stats=stats)


jax.tree_util.register_dataclass(StreamingMixedCache, data_fields=["inner", "stats"],
                                 meta_fields=["interval", "scorer", "pool_tokens"])


def init_stats(inner: zipcache.MixedCache) -> dict:
    """Empty query statistics for the buffer of `inner` (any leading axes)."""
    lead = inner.buf_pos.shape
    return dict(score=jnp.zeros(lead, jnp.float32), count=jnp.zeros(lead, jnp.float32),
                q_max=jnp.zeros(lead[:-1] + (inner.buf_k.shape[-1],), jnp.float32))


def observe_queries(cache: zipcache.MixedCache, stats: dict, q: jax.Array, q_pos: jax.Array, scorer: str) -> dict:
    """Add one forward's queries (post-RoPE q [B, Hq, T, d], positions [B, T], -1 = padding) to the
    statistics of one layer slice's buffered tokens (after the forward's tokens entered the buffer).
    ZipCache: probe attention and the probes that see each slot; MiKV: the attention of the last
    `MIKV_WINDOW` queries, and the running max RoPE-pair magnitude of every query (balancer)."""
    t = q.shape[2]
    cb = cache.buf_pos.shape[-1]
    if scorer == "zipcache":
        cfg = cache.method
        idx = zipcache.probe_indices(t, cfg.probe_recent, cfg.probe_random, cfg.seed) if t > 1 else [0]
    else:
        idx = list(range(max(t - MIKV_WINDOW, 0), t))
    idx = jnp.asarray(idx, jnp.int32)
    qp, pp = q[:, :, idx], q_pos[:, idx]
    probs = zipcache.probe_attention(cache, qp, pp)[..., -cb:]                  # [B, H, P, Cb]
    sp = cache.buf_pos[..., None, :]
    sees = (sp >= 0) & (sp <= pp[:, None, :, None]) & (pp >= 0)[:, None, :, None]
    out = dict(stats, score=stats["score"] + jnp.sum(jnp.where(sees, probs, 0.0), axis=-2),
               count=stats["count"] + jnp.sum(sees, axis=-2).astype(jnp.float32))
    if scorer == "mikv":
        b, hq, _, d = q.shape
        h = cache.buf_pos.shape[1]
        mag = jnp.where((q_pos >= 0)[:, None, :, None], mikv.pair_norms(q.astype(jnp.float32)), 0.0)
        out["q_max"] = jnp.maximum(stats["q_max"], mag.reshape(b, h, -1, d).max(2))
    return out


def key_probe_saliency(cache: zipcache.MixedCache) -> jax.Array:
    """ZipCache's normalized attention saliency of the buffered tokens of one layer slice, with the
    buffered keys (post-RoPE) as probe queries -> [B, H, Cb]."""
    q = cache.buf_k.astype(jnp.float32)                                  # [B, H, Cb, d] (group of 1)
    q_pos = cache.buf_pos[:, 0, :]                                        # same for every head
    probs = zipcache.probe_attention(cache, q, q_pos)                     # [B, H, Cb, S]
    sal = zipcache.normalized_saliency(probs, jnp.broadcast_to(q_pos[:, None, :], probs.shape[:3]),
                                       cache.positions)
    return sal[..., -cache.buf_pos.shape[-1]:]


def compress_round(cache: zipcache.MixedCache, scorer: str, stats: dict):
    """One round on a layer slice: buffered tokens -> high/low precision pools, ranked by the
    queries' statistics (`observe_queries`) or, for the query-free scorers, by the keys.
    returns (cache, stats reset for the emptied buffer)."""
    if scorer == "zipcache":                 # normalized attention: 0 where no probe saw the token
        sal = jnp.where(stats["count"] > 0, stats["score"] / jnp.maximum(stats["count"], 1.0), 0.0)
    elif scorer == "mikv":
        sal = stats["score"]
        if cache.method.balance:             # set once, from the queries before the first round
            valid = cache.buf_pos >= 0
            kmax = jnp.max(jnp.where(valid[..., None], mikv.pair_norms(cache.buf_k.astype(jnp.float32)), 0.0), axis=-2)
            ok = (kmax > 0) & (stats["q_max"] > 0)
            b_new = jnp.where(ok, jnp.sqrt(stats["q_max"] / jnp.where(ok, kmax, 1.0)), 1.0)
            first = (cache.n_rounds == 0)[..., None]
            bal = jnp.where(first, b_new, cache.rounds["balance"].astype(jnp.float32)).astype(jnp.float16)
            cache = dataclasses.replace(cache, rounds=dict(cache.rounds, balance=bal))
    elif scorer == "zipcache-keys":
        sal = key_probe_saliency(cache)
    elif scorer == "knorm":
        sal = -jnp.linalg.norm(cache.buf_k.astype(jnp.float32), axis=-1)
    else:
        raise ValueError(f"unknown scorer {scorer!r}")
    reset = dict(stats, score=jnp.zeros_like(stats["score"]), count=jnp.zeros_like(stats["count"]))
    return zipcache.compress_layer(cache, sal), reset


def _compress_stacked(cache: zipcache.MixedCache, scorer: str, stats: dict):
    """A round on every layer: a cache stacked over layers (buf_pos [L, B, H, Cb]) or, in the
    engine's per-layer layout (`kvjax.layerwise.LayerwiseCache`), one layer slice ([B, H, Cb])."""
    if cache.buf_pos.ndim == 3:
        return jax.jit(lambda c, st: compress_round(c, scorer, st))(cache, stats)
    return jax.jit(jax.vmap(lambda c, st: compress_round(c, scorer, st)))(cache, stats)


def _bits_cfg(method: str, kw: dict):
    if method == "zipcache":
        names = {f.name for f in dataclasses.fields(zipcache.ZipCacheConfig)}
        cfg = {k: v for k, v in kw.items() if k in names}
        if "interval" in kw:
            cfg["streaming_gap"] = kw["interval"]
        return zipcache.ZipCacheConfig(**cfg)
    names = {f.name for f in dataclasses.fields(mikv.MiKVConfig)}
    cfg = {k: v for k, v in kw.items() if k in names}
    if kw.get("scorer") == "keys":
        cfg.setdefault("balance", False)
        if cfg["balance"]:
            raise ValueError("MiKV's channel balancer needs the queries: scorer='keys' (KNorm) runs without it")
    return mikv.MiKVConfig(**cfg)


def init_streaming_cache(method: str, config, batch: int, capacity: int, interval: int = 100,
                         dtype=jnp.float32, scorer: str = "queries", **kw) -> StreamingMixedCache:
    """A self-compressing ZipCache ("zipcache") or MiKV ("mikv") cache for a ModelConfig: pools for
    `capacity` tokens, a `capacity`-token buffer during prefill (shrunk to `interval` by `resize`).
    scorer: "queries" (the real queries, observed in the layer) or "keys" (query-free)."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    if scorer not in ("queries", "keys"):
        raise ValueError(f"scorer must be 'queries' or 'keys', got {scorer!r}")
    cfg = _bits_cfg(method, dict(kw, interval=interval, scorer=scorer))
    L, H, d = config.n_layers, config.n_kv_heads, config.head_dim
    if method == "zipcache":
        inner = zipcache.init_zipcache(cfg, L, batch, H, d, capacity, capacity, dtype)
        name = "zipcache" if scorer == "queries" else "zipcache-keys"
    else:
        inner = mikv.init_mikv_cache(cfg, L, batch, H, d, capacity, capacity, dtype)
        name = "mikv" if scorer == "queries" else "knorm"
    return StreamingMixedCache(inner, init_stats(inner), interval, name, capacity)


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
