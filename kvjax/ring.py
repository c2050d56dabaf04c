"""Sliding-window layers' cache: a ring buffer of the window, and the split of an engine cache into
the layers policies act on (global) and the bounded local layers (Gemma 3; `models.local_attention`).

A local layer's query at position p sees the keys at positions (p - window, p], so its cache never
needs more than `window` tokens: `RingCache` holds R = min(window, context) slots and writes the
token at position p into slot p mod R, overwriting the one that just left the window. Its memory is
bounded by the window, not the context, so compression policies (eviction, merging, quantized
caches) act only on the global layers: `policy_part` is the engine cache's global layers as a
`LayerwiseCache` of their own (the policy sees a model of those layers, `policy_config`), and
`with_policy_part` puts a compressed / quantized part back between the untouched rings.

Positions: the ring stores true token positions. A re-rotating policy (StreamingLLM's pos-shift)
moves the global layers' kept keys to contiguous positions, and new tokens are then fed at the
global layers' next position; a ring adds its `offset` [batch] (true minus fed position, set by
`sync_offsets` after every such compression) so its RoPE (the local base) and window mask keep
the true distances.

Shapes (one layer): keys / values [batch, kv_heads, R, d], positions [batch, kv_heads, R] int32
(-1 = empty), offset [batch] int32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.cache import tree_bytes
from kvjax.layerwise import LayerwiseCache, from_stacked
from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingCache:
    """One sliding-window layer's cache: the last R = keys.shape[-2] tokens (R <= window)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    offset: jax.Array
    window: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    @property
    def lengths(self) -> jax.Array:
        """[batch, kv_heads] live slots (slots 0..n-1 until the ring is full, then all)."""
        return jnp.sum(self.valid, axis=-1).astype(jnp.int32)

    def memory_bytes(self) -> int:
        return tree_bytes(self)

    def true_positions(self, positions: jax.Array) -> jax.Array:
        """Fed positions [batch, new] -> true token positions (-1 stays -1)."""
        return jnp.where(positions >= 0, positions + self.offset[:, None], -1).astype(jnp.int32)

    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope: Optional[jax.Array] = None) -> "RingCache":
        """Write keys / values [batch, kv_heads, new, d] at true positions [batch, new] (-1 = padding):
        token p goes to slot p mod R; of a chunk longer than R only the last R tokens are written."""
        r = self.capacity
        newest = jnp.max(positions, axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > newest - r)
        slot = jnp.where(keep, positions % r, r)                              # r: dropped
        slot = jnp.broadcast_to(slot[:, None, :], keys.shape[:3])
        pos = jnp.broadcast_to(positions[:, None, :], keys.shape[:3]).astype(jnp.int32)

        def write(buf, upd):
            return jax.vmap(jax.vmap(lambda b, s, u: b.at[s].set(u, mode="drop")))(buf, slot, upd)

        return dataclasses.replace(self, keys=write(self.keys, keys.astype(self.keys.dtype)),
                                   values=write(self.values, values.astype(self.values.dtype)),
                                   positions=write(self.positions, pos))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend: str = "auto", rope=None):
        """One query per row (post-RoPE [batch, q_heads, 1, d]) over the ring's window."""
        from kvjax.attention import attend
        return attend(q, self.keys, self.values, self.positions, query_positions, observe=observe,
                      backend=backend, lengths=self.lengths, window=self.window)

    def append_attend(self, q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array, *,
                      observe, backend: str = "auto"):
        """Append the new tokens and attend their queries `q [batch, q_heads, new, d]` (all at true
        positions): a decode step writes first and attends over the ring (its window is exactly the
        ring); a chunk attends over the ring's old tokens and its own (the earliest queries still need
        tokens it overwrites), then is written. returns (out, observations, cache)."""
        from kvjax.attention import attend
        ring = self.append(keys, values, positions)
        if q.shape[2] == 1:
            out, obs = ring.attend(q, positions, observe=observe, backend=backend)
            return out, obs, ring
        cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=-2)
        pos = jnp.concatenate([self.positions, jnp.broadcast_to(positions[:, None, :], keys.shape[:3])], axis=-1)
        out, obs = attend(q, cat(self.keys, keys), cat(self.values, values), pos, positions, observe=observe,
                          backend=backend, window=self.window)
        return out, obs, ring

    def resize(self, capacity: int) -> "RingCache":
        """Bounded by the window: the engine's capacity changes do not apply."""
        return self

    def fit(self, room: int) -> "RingCache":
        return self


def ring_slots(config: ModelConfig, context: int) -> int:
    """Slots of a local layer's ring for a context of `context` positions: min(window, context)."""
    return max(1, min(config.sliding_window, context))


def init_ring(config: ModelConfig, batch: int, context: int, dtype=jnp.float32) -> RingCache:
    """An empty ring for one local layer of `config` holding up to `ring_slots(config, context)` tokens."""
    r = ring_slots(config, context)
    shape = (batch, config.n_kv_heads, r)
    return RingCache(keys=jnp.zeros(shape + (config.head_dim,), dtype), values=jnp.zeros(shape + (config.head_dim,), dtype),
                     positions=jnp.full(shape, -1, jnp.int32), offset=jnp.zeros((batch,), jnp.int32),
                     window=config.sliding_window)


# ----------------------------------------------------------------------------------------------
# The layers policies act on.

def global_layers(config: ModelConfig) -> tuple[int, ...]:
    """Indices of the layers compression acts on: every layer but the sliding-window ones."""
    local = set(config.local_layers)
    return tuple(i for i in range(config.n_layers) if i not in local)


@functools.lru_cache(maxsize=None)
def policy_config(config: ModelConfig) -> ModelConfig:
    """The model as a policy sees it: its global layers only (global RoPE base, no window)."""
    if not config.local_layers:
        return config
    return dataclasses.replace(config, n_layers=len(global_layers(config)), local_layers=(), sliding_window=0)


def policy_index(config: ModelConfig, layer: int) -> Optional[int]:
    """Layer `layer`'s index among the global layers (None for a local layer)."""
    if layer in config.local_layers:
        return None
    return global_layers(config).index(layer) if config.local_layers else layer


def has_local(cache, config: ModelConfig) -> bool:
    return bool(config.local_layers) and isinstance(cache, LayerwiseCache)


def policy_part(cache, config: ModelConfig):
    """The engine cache's global layers as a LayerwiseCache (the cache itself without local layers)."""
    if not has_local(cache, config):
        return cache
    return dataclasses.replace(cache, layers=tuple(cache.layers[i] for i in global_layers(config)))


def with_policy_part(cache, part, config: ModelConfig, rerotated: bool = False):
    """`cache` with its global layers replaced by `part` (a LayerwiseCache, or a cache stacked over
    the global layers: a policy's own final layout); rerotated: re-sync the rings' offsets."""
    if not has_local(cache, config):
        return part
    if not isinstance(part, LayerwiseCache):
        part = from_stacked(part, uniform=True)
    layers = list(cache.layers)
    for i, lc in zip(global_layers(config), part.layers):
        layers[i] = lc
    out = dataclasses.replace(part, layers=tuple(layers))
    return sync_offsets(out, config) if rerotated else out


def policy_positions(cache) -> jax.Array:
    """[layers, batch, kv_heads, slots] slot positions of the layers policies act on (a cache's
    `positions` without its rings): the fed positions new tokens continue from."""
    if isinstance(cache, LayerwiseCache) and any(isinstance(lc, RingCache) for lc in cache.layers):
        cache = dataclasses.replace(cache, layers=tuple(lc for lc in cache.layers if not isinstance(lc, RingCache)))
    return cache.positions


def sync_offsets(cache: LayerwiseCache, config: ModelConfig) -> LayerwiseCache:
    """After a re-rotating compression of the global layers: every ring's offset = its next true
    position minus the global layers' next (fed) position, per batch row."""
    fed_next = jnp.max(policy_positions(cache), axis=(0, 2, 3)) + 1                          # [batch]
    layers = tuple(
        dataclasses.replace(lc, offset=(jnp.max(lc.positions, axis=(1, 2)) + 1 - fed_next).astype(jnp.int32))
        if isinstance(lc, RingCache) else lc for lc in cache.layers)
    return dataclasses.replace(cache, layers=layers)


def first_policy_layer(cache):
    """The first non-ring layer of a LayerwiseCache (what the engine's checks look at)."""
    return next((lc for lc in cache.layers if not isinstance(lc, RingCache)), cache.layers[0])
