"""Eviction x quantization: a scoring policy chooses the kept tokens, KIVI stores them.

    generate(params, config, prompts, compression=Compression(SnapKV(), Budget(ratio=0.3)), kv_quant="kivi4")
    python -m kvjax generate --policy snapkv --budget 0.3 --kv-quant kivi4 ...

Rule (which tokens, which precision):

* Prefill runs over a full-precision cache; the policy scores the slots from what it observes in
  the layer (full-precision q/k of the chunk, the `kvjax.observation.Observer`), exactly as without
  quantization, so the kept set is the unquantized policy's kept set ("prefill" and "chunk"
  schedules: the chunk schedule's working set of budget + chunk tokens stays full precision).
  After prefill the kept tokens of every head are quantized by `quantize_layer` into an
  `EvictedKIVICache` of the decode capacity: this is KIVI's own prefill rule (attention over the
  prompt in full precision, then quantize) applied to the kept sequence: keys per channel over new
  G-token groups of the kept tokens in slot order (the first `n - n mod R` kept keys; the rest is the
  fp key tail), values per token (the first `n - R`; the last R stay in the fp window).
* Decode-time compression ("decode" schedule) works over the quantized cache: the layer is
  dequantized (a transient full-precision copy of the budget-sized cache inside the compression
  step), scored from the buffered decode queries as a dense cache would be, gathered, and the kept
  tokens are **requantized into new groups** (dequantize kept tokens, regroup, quantize). Values are
  per token, so re-quantizing a kept value reproduces it up to the float16 rounding of its
  statistics; keys are regrouped with different neighbours (a second rounding for key tokens that
  were already quantized; tokens of the fp tail are quantized for the first time).

Positions: KIVI's own cache stores a contiguous position range (`pos_offset`); after eviction the
kept positions are arbitrary, so this cache keeps one int32 position per slot (`slot_pos`, counted
in `memory_bytes`). Live slots are always one contiguous range [first live, lengths) per head
(left padding first after a full prefill, live-first after a gather), which is what the fused KIVI
decode kernel reads; other steps dequantize and run the position-masked attention.

Budgets: uniform and per-head (AdaKV's padded layout: every head its own `lengths`, `k_len`,
`v_len`) budgets are supported; per-layer (PyramidKV) works on the padded stacked layout. The ragged
final layouts (AdaKV's head-packed pool, PyramidKV's per-layer caches) fall back to the padded
layout: KIVI's arrays are [batch, kv_heads, capacity] per layer, so a head-packed pool would need a
packed KIVI layout (not built). Policies with their own final layout (ThinK's pruned key channels,
RazorAttention / DuoAttention head splits) are refused with the reason. Only the KIVI presets are
supported: the other quantized caches of the registry tie positions to slots (or compress
themselves), see `check_combination`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.attention import attend
from kvjax.cache import KVCache, tree_bytes
from kvjax.quant import kivi, packing

KIVI_METHOD = "kivi"


@dataclasses.dataclass(frozen=True)
class EvictedKIVICache:
    """One layer (or a stack over layers, leading axis) of KIVI storage for an evicted token set.

    kivi: the KIVI codes / statistics / fp residuals and `k_len`, `v_len`, `lengths` (its
          `pos_offset` is unused); slot_pos [batch, kv_heads, Cq] int32: the token position held by
          each slot (-1 = empty or padding)."""

    kivi: kivi.KIVICache
    slot_pos: jax.Array

    @property
    def lengths(self) -> jax.Array:
        return self.kivi.lengths

    @property
    def capacity(self) -> int:
        return self.kivi.capacity

    @property
    def positions(self) -> jax.Array:
        t = jnp.arange(self.capacity, dtype=jnp.int32)
        return jnp.where(t < self.lengths[..., None], self.slot_pos, -1).astype(jnp.int32)

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    @property
    def keys(self) -> jax.Array:
        """Dequantized keys `[..., kv_heads, Cq, d]` (for policies that read the cache in a layer's
        observation; computed on use, so an unused view costs nothing under jit)."""
        return kivi.dequantize(self.kivi, self.kivi.k_resid.dtype)[0]

    @property
    def values(self) -> jax.Array:
        return kivi.dequantize(self.kivi, self.kivi.k_resid.dtype)[1]

    def memory_bytes(self) -> int:
        """Bytes of every array held: KIVI's codes, statistics, residuals, counters + slot positions."""
        return tree_bytes(self)

    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope: Optional[jax.Array] = None) -> "EvictedKIVICache":
        """keys (post-RoPE), values `[batch, kv_heads, new, d]`; positions `[batch, new]` (-1 = padding)."""
        slot = self.lengths[..., None] + jnp.arange(keys.shape[-2], dtype=jnp.int32)      # [b, h, n]
        pos = jnp.broadcast_to(positions[:, None, :], slot.shape).astype(jnp.int32)
        write = jax.vmap(jax.vmap(lambda buf, s, p: buf.at[s].set(p, mode="drop")))
        return EvictedKIVICache(kivi=self.kivi.append(keys, values, positions),
                                slot_pos=write(self.slot_pos, slot, pos))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q `[batch, q_heads, new, d]` post-RoPE -> (out, observations). A decode step runs the fused
        KIVI kernel over the live range [first live slot, lengths) where it applies; otherwise the
        dequantized K/V go through the position-masked `kvjax.attention.attend`."""
        pos = self.positions
        live = pos >= 0
        first = jnp.argmax(live, axis=-1).astype(jnp.int32)
        starts = jnp.where(live.any(axis=-1), first, self.lengths).astype(jnp.int32)
        fused = kivi.attend_kivi(dataclasses.replace(self.kivi, pos_offset=-starts), q, query_positions,
                                 observe, backend)
        if fused is not None:
            return fused
        k, v = kivi.dequantize(self.kivi, self.kivi.k_resid.dtype)
        return attend(q, k, v, pos, query_positions, observe=observe, backend=backend, lengths=self.lengths)

    def to_dense(self) -> KVCache:
        """The dequantized contents as a dense KVCache (same slots, positions and lengths)."""
        k, v = kivi.dequantize(self.kivi, self.kivi.k_resid.dtype)
        return KVCache(keys=k, values=v, positions=self.positions, lengths=self.lengths)

    def requantize(self, dense: KVCache) -> "EvictedKIVICache":
        """`dense` (same capacity, e.g. `to_dense()` after a gather) stored like this cache."""
        return quantize_layer(dense, self.kivi.config, self.capacity, self.kivi.k_resid.dtype)

    def resize(self, capacity: int) -> "EvictedKIVICache":
        new = kivi.resize(self.kivi, capacity)
        c = new.capacity
        sp = self.slot_pos[..., :c]
        sp = jnp.pad(sp, [(0, 0)] * (sp.ndim - 1) + [(0, c - sp.shape[-1])], constant_values=-1)
        return EvictedKIVICache(kivi=new, slot_pos=sp)


jax.tree_util.register_dataclass(EvictedKIVICache, data_fields=["kivi", "slot_pos"], meta_fields=[])


def quantize_layer(dense: KVCache, kcfg: kivi.KIVIConfig, capacity: int, dtype=jnp.float32) -> EvictedKIVICache:
    """Store one layer's dense cache (`keys [batch, kv_heads, S, d]`, live slots [.., lengths), live
    first after a gather or padding first after a full prefill) in KIVI form with `capacity` slots
    (rounded up to a multiple of G; >= S). Per row of n = lengths tokens (KIVI's prefill rule on the
    row's slot sequence): keys of slots [0, n - n mod R) quantized per channel over G-token groups,
    the rest in the fp key tail; values of slots [0, max(n - R, 0)) per token, the last
    min(n, R) in the fp window. Codes and statistics past those counts are zero."""
    kcfg.validate(dense.keys.shape[-1])
    g, r = kcfg.group, kcfg.residual
    cq = kivi.quantized_capacity(capacity, g)
    b, h, s, d = dense.keys.shape
    if s > cq:
        raise ValueError(f"a cache of {s} slots does not fit {capacity} quantized slots")
    n = dense.lengths.astype(jnp.int32)
    k_len = n - n % r
    v_len = jnp.maximum(n - r, 0)
    pad = lambda x, extra: jnp.pad(x.astype(jnp.float32), [(0, 0), (0, 0), (0, cq + extra - s), (0, 0)])
    keys, values = pad(dense.keys, r), pad(dense.values, r)                 # [b, h, cq + r, d]
    t = jnp.arange(cq, dtype=jnp.int32)
    k_codes, k_scale, k_min = kivi.quantize_keys(keys[..., :cq, :], kcfg.k_bits, g)
    v_codes, v_scale, v_min = kivi.quantize_values(values[..., :cq, :], kcfg.v_bits, g)
    k_tok = (t < k_len[..., None])[..., None]
    k_grp = (jnp.arange(cq // g, dtype=jnp.int32) * g < k_len[..., None])[..., None]
    v_tok = (t < v_len[..., None])[..., None]
    zero = lambda x, keep: jnp.where(keep, x, jnp.zeros_like(x))

    def tail(buf, start, count):      # buf [cq + r, d] -> rows [start, start + count) as [r, d]
        win = jax.lax.dynamic_slice(buf, (start, 0), (r, d))
        return jnp.where((jnp.arange(r) < count)[:, None], win, 0.0)

    rows = jax.vmap(jax.vmap(tail))
    store = kivi.KIVICache(
        k_codes=zero(k_codes, k_tok), k_scale=zero(k_scale, k_grp), k_min=zero(k_min, k_grp),
        v_codes=zero(v_codes, v_tok), v_scale=zero(v_scale, v_tok), v_min=zero(v_min, v_tok),
        k_resid=rows(keys, k_len, n - k_len).astype(dtype), v_resid=rows(values, v_len, n - v_len).astype(dtype),
        k_len=k_len, v_len=v_len, lengths=n, pos_offset=jnp.zeros_like(n),
        k_bits=kcfg.k_bits, v_bits=kcfg.v_bits, group=g, residual=r)
    slot_pos = jnp.pad(dense.positions[..., :s], [(0, 0), (0, 0), (0, cq - s)], constant_values=-1)
    t_s = jnp.arange(cq, dtype=jnp.int32)
    slot_pos = jnp.where(t_s < n[..., None], slot_pos, -1).astype(jnp.int32)
    return EvictedKIVICache(kivi=store, slot_pos=slot_pos)


quantize_layer_jit = jax.jit(quantize_layer, static_argnames=("kcfg", "capacity", "dtype"))


# ----------------------------------------------------------------------------------------------
# What combinations work, and the conversion the engine applies after prefill.

@dataclasses.dataclass(frozen=True)
class EvictQuant:
    """A checked eviction x quantization plan: `compression` (ragged layouts switched to padded)
    and the KIVI config of the storage; `quantize(cache)` converts the engine's dense per-layer
    cache after prefill. dtype: of the fp residuals (an explicit `dtype=` option of the cache);
    None = the engine's cache dtype (the dense layers' dtype: bf16 for a bf16 model), as
    `make_cache_init` gives plain KIVI."""

    compression: object
    kcfg: kivi.KIVIConfig
    name: str
    dtype: object = None

    def quantize(self, cache):
        """A uniform LayerwiseCache of dense KVCache layers -> the same of EvictedKIVICache layers
        (capacity rounded up to a multiple of G)."""
        from kvjax.layerwise import LayerwiseCache
        dense = lambda lc: getattr(lc, "kept", lc)     # kvjax.quant.demote.DemotedLayer: its kept region
        if not isinstance(cache, LayerwiseCache) or not all(isinstance(dense(lc), KVCache) for lc in cache.layers):
            kinds = sorted({type(lc).__name__ for lc in getattr(cache, "layers", (cache,))})
            raise ValueError(f"{self.name} stores the kept tokens of dense per-layer caches; the policy built {kinds}")
        cap = kivi.quantized_capacity(cache.capacity, self.kcfg.group)
        dtype = self.dtype if self.dtype is not None else dense(cache.layers[0]).keys.dtype

        def store(lc):
            q = quantize_layer_jit(dense(lc), self.kcfg, cap, dtype)
            return dataclasses.replace(lc, kept=q) if lc is not dense(lc) else q
        return LayerwiseCache(layers=tuple(store(lc) for lc in cache.layers), capacity=cap, uniform=True)


def check_policy_class(cls) -> None:
    """ValueError for a policy class whose own final layout (ThinK's pruned key channels,
    RazorAttention / DuoAttention head splits) KIVI's [batch, kv_heads, slots] storage cannot hold.
    Ragged layouts (AdaKV, PyramidKV: a `ragged` field) fall back to their padded layout instead."""
    from kvjax.policies.base import ScoringPolicy
    own_layout = cls.finalize is not ScoringPolicy.finalize
    if own_layout and "ragged" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{cls.__name__} builds its own cache layout (pruned key channels or split heads), which "
                         f"KIVI's per-channel key groups over [batch, kv_heads, slots] cannot store: use it without "
                         f"a quantized cache (--kv-quant)")


def check_combination(compression, cache_init) -> EvictQuant:
    """Plan `compression` over the quantized cache `cache_init` (from `kvjax.quant.make_cache_init`),
    or ValueError naming why the combination cannot work."""
    name, kw = check_cache_init(cache_init)
    policy = compression.policy
    check_policy_class(type(policy.policy if getattr(policy, "demotes", False) else policy))
    if getattr(policy, "ragged", False):
        compression = dataclasses.replace(compression, policy=dataclasses.replace(policy, ragged=False))
    kcfg = kivi.KIVIConfig(kw.get("k_bits") or kw["bits"], kw.get("v_bits") or kw["bits"], kw["group"],
                           kw["residual"])
    return EvictQuant(compression=compression, kcfg=kcfg, name=name, dtype=kw.get("dtype"))


def check_cache_init(cache_init) -> tuple[str, dict]:
    """(registry name, resolved options) of a KIVI `cache_init`, or ValueError naming why an evicted
    token set cannot be stored in it."""
    from kvjax.quant import QUANT_CACHES
    name = getattr(cache_init, "quant_name", None)
    if name is None:
        raise ValueError("compression with cache_init needs a registered quantized cache "
                         "(kvjax.quant.make_cache_init(name)) to combine eviction with quantization")
    spec = QUANT_CACHES[name]
    if spec.method != KIVI_METHOD:
        raise ValueError(f"eviction x {name} is not supported: only the KIVI caches ({KIVI_METHOD}2/{KIVI_METHOD}4) "
                         f"store an evicted token set (per-slot positions, per-head lengths); {name}'s layout "
                         f"ties positions to slots or re-compresses itself")
    kw = spec.resolve(getattr(cache_init, "overrides", {}))
    if kw.get("sink"):
        raise ValueError(f"eviction x {name} with sink tokens is not supported (the sink wrapper keeps the first "
                         f"tokens by slot, not by position)")
    return name, kw


def dense_view(cache):
    """For decode-time compression: (a uniform LayerwiseCache of dense layers, a function mapping
    the compressed dense cache back to this cache's storage). Dense caches map to themselves."""
    from kvjax.layerwise import LayerwiseCache
    if not any(isinstance(lc, EvictedKIVICache) for lc in cache.layers):
        return cache, lambda new: new
    dense = LayerwiseCache(layers=tuple(lc.to_dense() for lc in cache.layers), capacity=cache.capacity,
                           room=cache.room, uniform=cache.uniform)

    def back(new):
        layers = tuple(old.requantize(nl) for old, nl in zip(cache.layers, new.layers))
        return dataclasses.replace(new, layers=layers)
    return dense, back
