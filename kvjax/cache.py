"""The KV-cache pytree and its pure operations.

One `KVCache` holds every layer, stacked on a leading axis so the model can `lax.scan` over
layers; the same class also describes a single layer's slice (inside the scan), where the
leading layer axis is absent. Shapes (stacked form):

    keys       [layers, batch, kv_heads, capacity, key_dim]
    values     [layers, batch, kv_heads, capacity, value_dim]
    positions  [layers, batch, kv_heads, capacity]  int32; the token position of each slot, -1 = empty
    lengths    [layers, batch, kv_heads]            int32; slots in use (the next write offset)

Capacity is static (so everything jits) and is what is really allocated: a compressed cache is
built at the size of its budget (see `gather`), never as a full-size array with a mask.
Heads are ragged: every (layer, batch, kv-head) has its own `lengths` and its own slot
positions, so per-head budgets and per-head eviction are representable.

Validity of a slot is `positions >= 0`. Padding tokens of a left-padded batch are written with
position -1 and are therefore never attended to. Keys are stored post-RoPE with their original
positions (the default regime); a policy that needs re-rotated in-cache positions says so.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (what a cache of any type really allocates)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


@runtime_checkable
class LayerCache(Protocol):
    """What the model needs of one layer's cache, whatever it stores (dense, quantized codes,
    head-packed pools, pruned channels, ...). Shapes: `[batch, kv_heads, ...]` for one layer; the
    same class stacked over layers carries a leading `[layers]` axis on every array.

    append: write the new tokens' post-RoPE keys / values `[batch, kv_heads, new, d]` at positions
            `[batch, new]` (-1 = padding); `keys_pre_rope` for caches that store pre-RoPE keys.
    attend: new post-RoPE queries `[batch, q_heads, new, d]` over everything held, returning
            (out `[batch, q_heads, new, d]`, what `observe` asks for); the cache picks its own
            implementation (XLA reference or a Pallas kernel, per the static `backend`).
    lengths `[batch, kv_heads]`: slots in use; positions `[batch, kv_heads, capacity]` (-1 = empty);
    capacity: slots per head; memory_bytes(): bytes really allocated.
    """

    lengths: jax.Array

    @property
    def positions(self) -> jax.Array: ...

    @property
    def capacity(self) -> int: ...

    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope: Optional[jax.Array] = None) -> "LayerCache": ...

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend: str = "auto",
               rope: Optional[Callable] = None) -> tuple[jax.Array, dict]: ...

    def memory_bytes(self) -> int: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    @property
    def valid(self) -> jax.Array:
        """`[..., kv_heads, capacity]` bool: slot holds a live token."""
        return self.positions >= 0

    def memory_bytes(self) -> int:
        """Bytes of every array this cache holds (what is really allocated)."""
        return tree_bytes(self)

    # The cache protocol the model uses (any cache type -- dense, quantized, ... -- provides these
    # on a single layer's slice): append new tokens, then attend new queries over the contents.
    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope: jax.Array | None = None) -> "KVCache":
        """keys: post-RoPE `[batch, kv_heads, new, dim]`; keys_pre_rope is ignored by this cache."""
        return append(self, keys, values, positions)

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE `[batch, q_heads, new, dim]` -> (out, observations); see kvjax.attention
        (a decode step runs the Pallas dense kernel on gpu/tpu)."""
        from kvjax.attention import attend
        return attend(q, self.keys, self.values, self.positions, query_positions, observe=observe, backend=backend,
                      lengths=self.lengths)


class OlderRecent:
    """Mixin of the caches that hold older tokens in their own form (slot positions `old_positions
    [..., S_old]`, -1 = empty) and the newest / decoded tokens full width in `recent` (a KVCache):
    the protocol's positions, lengths, valid, capacity, memory_bytes and append (new tokens go to
    `recent`). Used by ThinK's pruned, CSKV's low-rank and MiniCache's merged layers."""

    @property
    def positions(self) -> jax.Array:
        return jnp.concatenate([self.old_positions, self.recent.positions], axis=-1)

    @property
    def lengths(self) -> jax.Array:
        return jnp.sum(self.old_positions >= 0, axis=-1).astype(jnp.int32) + self.recent.lengths

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    @property
    def capacity(self) -> int:
        return self.old_positions.shape[-1] + self.recent.capacity

    def memory_bytes(self) -> int:
        return tree_bytes(self)

    def append(self, keys, values, positions, keys_pre_rope=None):
        """New tokens (post-RoPE `[batch, kv_heads, new, dim]`) go full width into `recent`."""
        return dataclasses.replace(self, recent=append(self.recent, keys, values, positions))


def init_cache(n_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
               dtype=jnp.float32, value_dim: int | None = None) -> KVCache:
    """An empty cache with `capacity` slots per (layer, batch, kv-head)."""
    if min(n_layers, batch, kv_heads, capacity, head_dim) <= 0:
        raise ValueError(f"cache dimensions must be positive, got layers={n_layers} batch={batch} "
                         f"kv_heads={kv_heads} capacity={capacity} head_dim={head_dim}")
    value_dim = head_dim if value_dim is None else value_dim
    lead = (n_layers, batch, kv_heads, capacity)
    return KVCache(
        keys=jnp.zeros(lead + (head_dim,), dtype),
        values=jnp.zeros(lead + (value_dim,), dtype),
        positions=jnp.full(lead, -1, jnp.int32),
        lengths=jnp.zeros(lead[:3], jnp.int32),
    )


def append(layer: KVCache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KVCache:
    """Write new tokens after the live slots of every head of one layer.

    layer: a single layer's cache (`keys [batch, kv_heads, capacity, dim]`).
    keys, values: `[batch, kv_heads, new, dim]`; positions: `[batch, new]` (-1 marks padding).
    Each (batch, kv-head) writes at its own offset `lengths[b, h]`. Writes past capacity are
    dropped, so callers must check capacity beforehand (`generate` does).
    """
    new = keys.shape[-2]
    slot = layer.lengths[..., None] + jnp.arange(new, dtype=jnp.int32)  # [batch, kv_heads, new]

    def write(buf, upd):  # buf [cap, ...], upd [new, ...], per (batch, head)
        return jax.vmap(jax.vmap(lambda b, s, u: b.at[s].set(u, mode="drop")))(buf, slot, upd)

    pos_new = jnp.broadcast_to(positions[:, None, :], slot.shape).astype(jnp.int32)
    return KVCache(
        keys=write(layer.keys, keys.astype(layer.keys.dtype)),
        values=write(layer.values, values.astype(layer.values.dtype)),
        positions=write(layer.positions, pos_new),
        lengths=layer.lengths + new,
    )


def gather(cache: KVCache, indices: jax.Array, capacity: int | None = None) -> KVCache:
    """Keep the slots `indices` of every head, in a new cache of `capacity` slots.

    indices: `[..., kv_heads, kept]` slot indices per head (same leading axes as `lengths`);
    an index < 0 marks "no token" (heads with fewer kept tokens than others).
    capacity: slots of the new cache (>= kept; defaults to kept). Extra slots are left empty so
    decode can append; the result's arrays are allocated at this size, so memory really shrinks.
    """
    kept = indices.shape[-1]
    capacity = kept if capacity is None else capacity
    if capacity < kept:
        raise ValueError(f"capacity {capacity} is smaller than the number of kept slots {kept}")
    safe = jnp.clip(indices, 0, cache.capacity - 1)
    present = indices >= 0
    pos = jnp.take_along_axis(cache.positions, safe, axis=-1)
    pos = jnp.where(present, pos, -1)
    keys = jnp.take_along_axis(cache.keys, safe[..., None], axis=-2)
    values = jnp.take_along_axis(cache.values, safe[..., None], axis=-2)
    # Live slots first so that `lengths` is a true write offset: sort by "empty" flag (stable).
    order = jnp.argsort(pos < 0, axis=-1, stable=True)
    pos = jnp.take_along_axis(pos, order, axis=-1)
    keys = jnp.take_along_axis(keys, order[..., None], axis=-2)
    values = jnp.take_along_axis(values, order[..., None], axis=-2)
    pad = capacity - kept
    if pad:
        widths = [(0, 0)] * (keys.ndim - 2) + [(0, pad), (0, 0)]
        keys, values = jnp.pad(keys, widths), jnp.pad(values, widths)
        pos = jnp.pad(pos, widths[:-1], constant_values=-1)
    return KVCache(keys=keys, values=values, positions=pos,
                   lengths=jnp.sum(pos >= 0, axis=-1).astype(jnp.int32))


def resize(cache: KVCache, capacity: int) -> KVCache:
    """Same live tokens, new capacity (grow for decode room, or shrink to the live maximum).

    Shrinking below the longest head is an error (it would drop live tokens)."""
    if not isinstance(cache, KVCache):  # additive (issue 3): other layouts (ThinK, Razor) resize themselves
        return cache.resize(capacity)
    cur = cache.capacity
    if capacity >= cur:
        pad = capacity - cur
        widths = [(0, 0)] * (cache.keys.ndim - 2) + [(0, pad), (0, 0)]
        return KVCache(keys=jnp.pad(cache.keys, widths), values=jnp.pad(cache.values, widths),
                       positions=jnp.pad(cache.positions, widths[:-1], constant_values=-1),
                       lengths=cache.lengths)
    longest = int(jnp.max(cache.lengths))
    if capacity < longest:
        raise ValueError(f"cannot shrink cache to {capacity} slots: a head holds {longest} tokens")
    return KVCache(keys=cache.keys[..., :capacity, :], values=cache.values[..., :capacity, :],
                   positions=cache.positions[..., :capacity], lengths=cache.lengths)


def reset(cache: KVCache) -> KVCache:
    """Empty every slot, keeping shapes (for reuse across prompts without re-jitting)."""
    return KVCache(keys=jnp.zeros_like(cache.keys), values=jnp.zeros_like(cache.values),
                   positions=jnp.full_like(cache.positions, -1), lengths=jnp.zeros_like(cache.lengths))
