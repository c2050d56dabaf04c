"""Per-layer caches of different sizes: `LayerwiseCache`, a tuple of one cache per layer.

Layer-wise budgets (PyramidKV) and head-wise layouts whose shape differs per layer (DuoAttention /
RazorAttention with a different number of retrieval heads per layer) cannot be stacked on a
leading layer axis without padding every layer to the largest. Here each layer is its own cache
pytree of its own size -- a single-layer `KVCache` ([batch, kv_heads, capacity_l, dim]), a
`PackedCache` or a `HeadSplitCache` -- and `models.llama.forward` loops over the layers in Python
when it is given one (instead of `lax.scan`): the compiled program grows with depth (compile time
~ linear in layers), the run time does not change.

Sizes: the policy builds the layers under jit at a static bound; `resize` (eager, as generate and
the eval harness call it right after compression) reads each layer's live tokens and allocates
exactly those plus `room` slots per head. The protocol's `capacity` is per head: `resize(c)` adds
`c - capacity` tokens of room for every head of every layer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerwiseCache:
    layers: tuple
    capacity: int = dataclasses.field(metadata=dict(static=True), default=0)
    room: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def lengths(self) -> jax.Array:
        """[layers, batch, kv_heads] live tokens per head."""
        return jnp.stack([lc.lengths for lc in self.layers])

    @property
    def positions(self) -> jax.Array:
        """[layers, batch, rows, slots] every layer's slot positions, padded with -1 to the
        largest layer (computed on use; rows are kv heads, or a head-split layer's rows)."""
        ps = [lc.positions for lc in self.layers]
        rows = max(p.shape[-2] for p in ps)
        slots = max(p.shape[-1] for p in ps)
        pad = lambda p: jnp.pad(p, [(0, 0), (0, rows - p.shape[-2]), (0, slots - p.shape[-1])],
                                constant_values=-1)
        return jnp.stack([pad(p) for p in ps])

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    def memory_bytes(self) -> int:
        return kvcache.tree_bytes(self)

    def resize(self, capacity: int) -> "LayerwiseCache":
        """Eager: every layer keeps its live tokens plus `room + capacity - self.capacity` free
        slots per head."""
        room = self.room + capacity - self.capacity
        if room < 0:
            raise ValueError(f"cannot resize a layer-wise cache to {capacity}: that is less room than it "
                             f"holds (capacity {self.capacity}, room {self.room})")
        return LayerwiseCache(layers=tuple(fit_layer(lc, room) for lc in self.layers),
                              capacity=capacity, room=room)


def fit_kv(layer: kvcache.KVCache, room: int) -> kvcache.KVCache:
    """A (live-first) KVCache at its longest head + `room` slots (eager; works with 0 heads)."""
    size = max(int(jnp.max(layer.lengths, initial=0)) + room, 1)
    if size >= layer.capacity:
        return kvcache.resize(layer, size)
    return kvcache.KVCache(keys=layer.keys[..., :size, :], values=layer.values[..., :size, :],
                           positions=layer.positions[..., :size], lengths=layer.lengths)


def fit_layer(layer, room: int):
    """One layer's cache at its live size + `room` free slots per head (eager)."""
    if isinstance(layer, kvcache.KVCache):
        return fit_kv(layer, room)
    return layer.fit(room)


def from_stacked(cache: kvcache.KVCache) -> LayerwiseCache:
    """Split a stacked KVCache [L, B, Hkv, S, d] into L single-layer caches of S slots."""
    n = cache.keys.shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda x: x[i], cache) for i in range(n))
    return LayerwiseCache(layers=layers, capacity=cache.capacity, room=0)
