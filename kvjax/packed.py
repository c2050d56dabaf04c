"""Head-packed KV cache: the kv heads of a layer share one slot pool sized by the layer's total
budget, so per-head (ragged) budgets allocate exactly what they keep.

A padded `KVCache` gives every head the slots of the largest head; here every slot of a pool
[batch, pool] belongs to one kv head, recorded in `heads`. Shapes (stacked form; inside the
model's layer scan the leading layer axis is absent):

    keys       [layers, batch, pool, key_dim]
    values     [layers, batch, pool, value_dim]
    positions  [layers, batch, pool]  int32 token position of a slot, -1 = empty
    heads      [layers, batch, pool]  int16 kv head that owns the slot
    used       [layers, batch]        int32 slots in use (the next write offset; live slots first)

Attention (XLA path) lets every kv head's queries score the whole pool and masks the slots of
other heads: compute is kv_heads x the pool, memory is the pool. A decode step writes one slot
per kv head (kv_heads slots) at `used`.

Sizes: `pack` (under jit) builds the pool at a static bound; `resize` (eager, as generate and the
eval harness call it right after compression) reads the live slot counts and allocates exactly
those plus `kv_heads * room` free slots (room = decode headroom per head). The cache protocol's
`capacity` is a per-head number: `resize(c)` adds `c - capacity` tokens of room per head.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import NEG_INF, attention_mask

HEAD_DTYPE = jnp.int16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedCache:
    keys: jax.Array
    values: jax.Array
    slot_positions: jax.Array
    heads: jax.Array
    used: jax.Array
    kv_heads: int = dataclasses.field(metadata=dict(static=True), default=1)
    capacity: int = dataclasses.field(metadata=dict(static=True), default=0)
    room: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def pool(self) -> int:
        return self.keys.shape[-2]

    def _owned(self) -> jax.Array:
        """[..., B, Hkv, pool] bool: slot is live and belongs to head h."""
        eye = jnp.arange(self.kv_heads, dtype=self.heads.dtype)[:, None]
        return (self.heads[..., None, :] == eye) & (self.slot_positions[..., None, :] >= 0)

    @property
    def lengths(self) -> jax.Array:
        """[..., B, Hkv] live tokens per kv head (derived, not stored)."""
        return jnp.sum(self._owned(), axis=-1).astype(jnp.int32)

    @property
    def positions(self) -> jax.Array:
        """[..., B, Hkv, pool] per-head view of the slot positions (-1 where another head owns it)."""
        return jnp.where(self._owned(), self.slot_positions[..., None, :], -1)

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    def memory_bytes(self) -> int:
        return kvcache.tree_bytes(self)

    # --- cache protocol (one layer: keys [B, pool, d]) -----------------------------------------
    def append(self, keys: jax.Array, values: jax.Array, positions: jax.Array,
               keys_pre_rope=None) -> "PackedCache":
        """keys, values [B, Hkv, new, d]; positions [B, new]. Head h's token t goes to slot
        used + h * new + t; writes past the pool are dropped (generate sizes the room)."""
        b, hkv, new, _ = keys.shape
        flat = lambda x: x.reshape(b, hkv * new, x.shape[-1])
        slot = self.used[:, None] + jnp.arange(hkv * new, dtype=jnp.int32)           # [B, Hkv*new]
        rows = jnp.arange(b)[:, None]
        tag = jnp.broadcast_to(jnp.repeat(jnp.arange(hkv, dtype=self.heads.dtype), new), slot.shape)
        pos = jnp.broadcast_to(jnp.tile(positions.astype(jnp.int32), (1, hkv)), slot.shape)
        return dataclasses.replace(
            self,
            keys=self.keys.at[rows, slot].set(flat(keys).astype(self.keys.dtype), mode="drop"),
            values=self.values.at[rows, slot].set(flat(values).astype(self.values.dtype), mode="drop"),
            slot_positions=self.slot_positions.at[rows, slot].set(pos, mode="drop"),
            heads=self.heads.at[rows, slot].set(tag, mode="drop"),
            used=jnp.minimum(self.used + hkv * new, self.pool))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d] -> (out [B, Hq, T, dv], {}): each query head attends over the
        live pool slots of its kv head that are not after the query (float32 softmax)."""
        if observe.window or observe.column_sums:
            raise ValueError("a head-packed cache (AdaKV's ragged layout) does not report attention "
                             "statistics: it is the final layout and cannot be compressed again")
        b, hq, t, d = q.shape
        g = hq // self.kv_heads
        qg = q.reshape(b, self.kv_heads, g, t, d).astype(jnp.float32)
        logits = jnp.einsum("bhgtd,bpd->bhgtp", qg, self.keys.astype(jnp.float32)) * d ** -0.5
        mask = attention_mask(self.positions, query_positions)[:, :, None]       # [B, Hkv, 1, T, pool]
        probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
        probs = jnp.where(mask, probs, 0.0)
        out = jnp.einsum("bhgtp,bpv->bhgtv", probs, self.values.astype(jnp.float32))
        return out.reshape(b, hq, t, -1).astype(q.dtype), {}

    def resize(self, capacity: int) -> "PackedCache":
        """Eager: keep the live slots and room for `room + capacity - self.capacity` new tokens per
        head; the pool becomes max(used) + kv_heads * room."""
        room = self.room + capacity - self.capacity
        if room < 0:
            raise ValueError(f"cannot resize a packed cache to {capacity}: that is less room than it holds "
                             f"(capacity {self.capacity}, room {self.room})")
        size = int(jnp.max(self.used, initial=0)) + self.kv_heads * room
        return dataclasses.replace(fit_pool(self, max(size, 1)), capacity=capacity, room=room)


    def fit(self, room: int) -> "PackedCache":
        """Eager, as a layer of a LayerwiseCache: the live slots + kv_heads * room free slots."""
        return fit_pool(self, max(int(jnp.max(self.used, initial=0)) + self.kv_heads * room, 1))


def fit_pool(cache: PackedCache, size: int) -> PackedCache:
    """Truncate (live slots are first) or pad the pool to `size` slots."""
    cur = cache.pool
    if size <= cur:
        return dataclasses.replace(cache, keys=cache.keys[..., :size, :], values=cache.values[..., :size, :],
                                   slot_positions=cache.slot_positions[..., :size], heads=cache.heads[..., :size])
    pad = size - cur
    w = [(0, 0)] * (cache.keys.ndim - 2) + [(0, pad), (0, 0)]
    return dataclasses.replace(cache, keys=jnp.pad(cache.keys, w), values=jnp.pad(cache.values, w),
                               slot_positions=jnp.pad(cache.slot_positions, w[:-1], constant_values=-1),
                               heads=jnp.pad(cache.heads, w[:-1]))


def pack(cache: kvcache.KVCache, pool: int | None = None) -> PackedCache:
    """Pack a (gathered, live-first) KVCache [..., B, Hkv, S, d] head by head into pools
    [..., B, pool, d]: head h's live slots follow those of heads < h, in their slot order.

    pool: static pool size (default Hkv * S, always enough); tokens past it are dropped, so give
    at least the largest total of live slots. `capacity` is set to S (the per-head bound)."""
    *lead, hkv, s = cache.positions.shape
    pool = hkv * s if pool is None else pool
    if pool <= 0:
        raise ValueError(f"pool must be positive, got {pool}")
    lengths = jnp.sum(cache.positions >= 0, axis=-1).astype(jnp.int32)          # [..., Hkv]
    offset = jnp.cumsum(lengths, axis=-1) - lengths                              # exclusive
    k = jnp.arange(s, dtype=jnp.int32)
    dest = jnp.where(k < lengths[..., None], offset[..., None] + k, pool)        # [..., Hkv, S]
    n = int(np.prod(lead))
    flat = lambda x: x.reshape((n, hkv * s) + x.shape[len(lead) + 2:])
    d = flat(dest)
    rows = jnp.arange(n)[:, None]

    def scatter(x, fill, dtype):
        buf = jnp.full((n, pool) + x.shape[len(lead) + 2:], fill, dtype)
        return buf.at[rows, d].set(flat(x).astype(dtype), mode="drop").reshape(tuple(lead) + buf.shape[1:])

    head_of = jnp.broadcast_to(jnp.arange(hkv, dtype=HEAD_DTYPE)[:, None], cache.positions.shape)
    return PackedCache(keys=scatter(cache.keys, 0, cache.keys.dtype),
                       values=scatter(cache.values, 0, cache.values.dtype),
                       slot_positions=scatter(cache.positions, -1, jnp.int32),
                       heads=scatter(head_of, 0, HEAD_DTYPE),
                       used=jnp.minimum(lengths.sum(-1), pool).astype(jnp.int32),
                       kv_heads=hkv, capacity=s, room=0)
