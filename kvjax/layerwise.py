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
    """layers: one cache per layer. uniform: every layer has the same type and capacity (the
    engine's layout: `resize` gives every layer exactly `capacity` slots); otherwise a ragged final
    layout (per-layer budgets) whose `resize` keeps each layer's live tokens + room."""

    layers: tuple
    capacity: int = dataclasses.field(metadata=dict(static=True), default=0)
    room: int = dataclasses.field(metadata=dict(static=True), default=0)
    uniform: bool = dataclasses.field(metadata=dict(static=True), default=False)

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

    # Additive hook (issue 18, MiniCache): state shared by several layers (a merged pair's one
    # direction cache) lives once on a subclass; `forward` asks for each layer's cache through
    # `enter` and hands it back through `leave`, so a layer can be given its shared part.
    def enter(self, i: int):
        """Layer i's cache as its attention sees it (default: as stored)."""
        return self.layers[i]

    def leave(self, i: int, layer):
        """Layer i's cache after the forward, as it is stored (default: as returned)."""
        return layer

    def resize(self, capacity: int) -> "LayerwiseCache":
        """Uniform: every layer gets exactly `capacity` slots (kvjax.cache.resize). Ragged (eager):
        every layer keeps its live tokens plus `room + capacity - self.capacity` free slots per head."""
        if self.uniform:
            layers = tuple(kvcache.resize(lc, capacity) for lc in self.layers)
            return dataclasses.replace(self, layers=layers, capacity=capacity)
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


def from_stacked(cache, uniform: bool = False) -> LayerwiseCache:
    """Split any cache stacked over layers (every array leaf has a leading layer axis: KVCache
    [L, B, Hkv, S, d], a quantized cache, ...) into one cache per layer."""
    n = jax.tree_util.tree_leaves(cache)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda x: x[i], cache) for i in range(n))
    return LayerwiseCache(layers=layers, capacity=cache.capacity, room=0, uniform=uniform)


def per_layer(cache) -> LayerwiseCache:
    """The engine's layout: a stacked cache split into a uniform LayerwiseCache (eager, one copy;
    a LayerwiseCache is returned as is). Each layer's arrays are then their own buffers, so a
    donated decode loop updates them in place."""
    if isinstance(cache, LayerwiseCache):
        return cache
    out = from_stacked(cache, uniform=True)
    return jax.tree_util.tree_map(jnp.array, out)   # own buffers (slices of the stack may alias it)


def stacked(cache):
    """A uniform LayerwiseCache back to one cache stacked over layers (other caches as they are)."""
    if not isinstance(cache, LayerwiseCache):
        return cache
    if not cache.uniform:
        raise ValueError("a ragged LayerwiseCache (layers of different sizes) cannot be stacked")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *cache.layers)


def layer_positions(cache) -> jax.Array:
    """[L, B, Hkv, S] slot positions of a uniform LayerwiseCache or a stacked cache (small: int32)."""
    if isinstance(cache, LayerwiseCache):
        return jnp.stack([lc.positions for lc in cache.layers])
    return cache.positions
