"""Block geometry shared by the sparse-prefill block-mask builders, and the attention call.

A prefill chunk of T queries sits at cache slots `lengths - T .. lengths - 1` (the engine's
layout: live slots of every head are `[starts, lengths)`, the chunk's own keys last). Blocks of
`block_size` tokens:

    query block i   = chunk queries [i*bs, (i+1)*bs)            i < nqb = ceil(T / bs)
    key block j     = cache slots   [j*bs, (j+1)*bs)            j < nkb = ceil(S / bs)
    block diagonal  = qa_i - j, qa_i = (lengths - T + i*bs) // bs (the key block holding the
                      query block's first query: diagonal 0 is the causal diagonal block; when
                      lengths - T is not a multiple of bs a query block also reaches diagonal -1)

Diagonal vectors are indexed by d + 1 (entry 0 is diagonal -1): [b, h, nkb + 1].

A builder returns a bool mask [batch, heads, nqb, nkb] (per query head or per kv head); `attend`
unions it over the query heads of a kv head (the kernel shares one list per kv head), turns it
into the padded lists of `pallas_kernels.block_sparse_prefill` and runs it (the kernel applies the
element-wise causal / live mask inside the listed blocks).

Density = listed blocks that hold a slot some query of the block may see / all such blocks
("fraction of causal blocks computed").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import NEG_INF


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Block coordinates of one prefill chunk over the cache (arrays are per [batch, kv_heads])."""
    t: int                 # queries in the chunk
    s: int                 # cache slots
    block_size: int
    starts: jax.Array      # [b, hkv] first live slot
    lengths: jax.Array     # [b, hkv] one past the chunk's last query slot

    @property
    def nqb(self) -> int:
        return -(-self.t // self.block_size)

    @property
    def nkb(self) -> int:
        return -(-self.s // self.block_size)

    @property
    def offset(self) -> jax.Array:
        """[b, hkv] slot of the chunk's first query."""
        return self.lengths - self.t

    def query_slots(self) -> jax.Array:
        """[b, hkv, T] cache slot of every chunk query."""
        return self.offset[..., None] + jnp.arange(self.t, dtype=jnp.int32)

    def query_block_abs(self) -> jax.Array:
        """[b, hkv, nqb] qa_i: key block holding query block i's first query."""
        first = self.offset[..., None] + jnp.arange(self.nqb, dtype=jnp.int32) * self.block_size
        return first // self.block_size

    def live_blocks(self) -> jax.Array:
        """[b, hkv, nqb, nkb] bool: block (i, j) holds a slot s with starts <= s <= some query of i."""
        bs = self.block_size
        i = jnp.arange(self.nqb, dtype=jnp.int32)
        last_q = self.offset[..., None] + jnp.minimum((i + 1) * bs, self.t) - 1          # [b, h, nqb]
        j = jnp.arange(self.nkb, dtype=jnp.int32)
        lo_ok = (j + 1) * bs - 1 >= self.starts[..., None, None]
        return (j * bs <= last_q[..., None]) & lo_ok

    def diagonal(self) -> jax.Array:
        """[b, hkv, nqb, nkb] int32 block diagonal qa_i - j."""
        return self.query_block_abs()[..., None] - jnp.arange(self.nkb, dtype=jnp.int32)


def repeat_heads(x: jax.Array, group: int) -> jax.Array:
    """[b, hkv, ...] -> [b, hkv * group, ...] (query head h uses kv head h // group)."""
    return jnp.repeat(x, group, axis=1)


def last_query_probs(q: jax.Array, keys: jax.Array, geo: Geometry, n: int, scale: float):
    """Softmax of the chunk's last n queries over the live causal slots.

    q [b, hq, T, d] (post-RoPE), keys [b, hkv, S, d] -> (probs [b, hq, n, S] float32 (rows sum
    to 1), query slots [b, hq, n] int32)."""
    b, hq, t, _ = q.shape
    g = hq // keys.shape[1]
    n = min(n, t)
    qs = repeat_heads(geo.query_slots()[..., t - n:], g)                        # [b, hq, n]
    k = repeat_heads(keys, g).astype(jnp.float32)
    logits = jnp.einsum("bhnd,bhsd->bhns", q[:, :, t - n:].astype(jnp.float32), k) * scale
    s = jnp.arange(keys.shape[2], dtype=jnp.int32)
    ok = (s >= repeat_heads(geo.starts, g)[..., None, None]) & (s <= qs[..., None])
    probs = jax.nn.softmax(jnp.where(ok, logits, NEG_INF), axis=-1)
    return jnp.where(ok, probs, 0.0), qs


def slash_profile(probs: jax.Array, query_slots: jax.Array) -> jax.Array:
    """Sum along each diagonal: probs [b, h, n, S], query_slots [b, h, n] -> [b, h, S] where entry
    o = sum_r probs[r, slot_r - o] (o = 0: each query's own slot)."""
    s = probs.shape[-1]
    o = jnp.arange(s, dtype=jnp.int32)
    idx = query_slots[..., None] - o                                             # [b, h, n, S]
    vals = jnp.take_along_axis(probs, jnp.clip(idx, 0, s - 1), axis=-1)
    return jnp.where(idx >= 0, vals, 0.0).sum(axis=-2)


def diagonals_of_offsets(offsets_on: jax.Array, geo: Geometry) -> jax.Array:
    """Token offsets -> block diagonals: offsets_on [b, h, S] bool (offset o = query slot - key slot
    selected) -> [b, h, nkb + 1] bool over diagonals d = -1 .. nkb - 1 (index d + 1): a query
    block's slots minus o fall in the key blocks of 2 neighbouring diagonals (exact for any chunk
    offset)."""
    bs = geo.block_size
    b, h, s = offsets_on.shape
    g = h // geo.starts.shape[1]
    r0 = repeat_heads(geo.offset % bs, g)[..., None]                            # [b, h, 1]
    o = jnp.arange(s, dtype=jnp.int32)
    d_lo = -((r0 - o) // bs)                                                     # first query of the block
    d_hi = -((r0 + bs - 1 - o) // bs)                                            # last query of the block
    out = jnp.zeros((b, h, geo.nkb + 2), bool)
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    for d in (d_lo, d_hi):
        d = jnp.where(offsets_on & (d >= -1) & (d < geo.nkb), d + 1, geo.nkb + 1)
        out = out.at[bi, hi, d].max(True)
    return out[..., :geo.nkb + 1]


def from_diagonals(diag_on: jax.Array, geo: Geometry) -> jax.Array:
    """diag_on [b, h, nkb + 1] bool (index d + 1) -> [b, h, nqb, nkb] mask of the blocks on them."""
    g = diag_on.shape[1] // geo.starts.shape[1]
    d = repeat_heads(geo.diagonal(), g) + 1
    on = jnp.take_along_axis(diag_on[:, :, None, :], jnp.clip(d, 0, geo.nkb), axis=-1)
    return on & (d >= 0) & (d <= geo.nkb)


def from_columns(col_on: jax.Array, geo: Geometry) -> jax.Array:
    """col_on [b, h, nkb] bool key blocks -> [b, h, nqb, nkb] (at every query block; `block_mask`
    keeps the live ones: those with a query at or after the block's first slot)."""
    return jnp.broadcast_to(col_on[:, :, None, :], col_on.shape[:2] + (geo.nqb, geo.nkb))


def sink_local(geo: Geometry, sink: int, local: int) -> jax.Array:
    """[b, hkv, nqb, nkb]: key blocks holding one of the first `sink` live slots or one of the last
    `local` slots before some query of the block (query q sees [q - local + 1, q])."""
    bs = geo.block_size
    i = jnp.arange(geo.nqb, dtype=jnp.int32)
    first_q = geo.offset[..., None] + i * bs                                      # [b, h, nqb]
    last_q = geo.offset[..., None] + jnp.minimum((i + 1) * bs, geo.t) - 1
    j = jnp.arange(geo.nkb, dtype=jnp.int32)
    lo, hi = j * bs, (j + 1) * bs - 1
    st = geo.starts[..., None, None]
    in_sink = (lo < st + sink) & (hi >= st) & (sink > 0)
    in_local = (hi >= first_q[..., None] - local + 1) & (lo <= last_q[..., None]) & (local > 0)
    return in_sink | in_local


def pool_keys(keys: jax.Array, geo: Geometry) -> jax.Array:
    """Mean of the live keys of every key block: keys [b, hkv, S, d] -> [b, hkv, nkb, d] float32
    (live = starts <= slot < lengths; an empty block gives zeros)."""
    b, h, s, d = keys.shape
    bs, nkb = geo.block_size, geo.nkb
    slot = jnp.arange(nkb * bs, dtype=jnp.int32)
    live = (slot >= geo.starts[..., None]) & (slot < geo.lengths[..., None])     # [b, h, nkb*bs]
    k = jnp.pad(keys.astype(jnp.float32), ((0, 0), (0, 0), (0, nkb * bs - s), (0, 0)))
    k = jnp.where(live[..., None], k, 0.0).reshape(b, h, nkb, bs, d).sum(3)
    cnt = live.reshape(b, h, nkb, bs).sum(-1)[..., None]
    return k / jnp.maximum(cnt, 1)


def pool_queries(q: jax.Array, block_size: int) -> jax.Array:
    """Mean of every query block: q [b, h, T, d] -> [b, h, nqb, d] float32 (last block partial)."""
    b, h, t, d = q.shape
    nqb = -(-t // block_size)
    x = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, nqb * block_size - t), (0, 0)))
    cnt = jnp.minimum(block_size, t - jnp.arange(nqb) * block_size)[:, None]
    return x.reshape(b, h, nqb, block_size, d).sum(3) / cnt


def cover_count(x: jax.Array, gamma) -> jax.Array:
    """Minimal number of largest entries whose sum reaches gamma * total: x [..., n] -> [...] int32."""
    srt = -jnp.sort(-x, axis=-1)
    cum = jnp.cumsum(srt, axis=-1)
    return (jnp.sum(cum < gamma * cum[..., -1:], axis=-1) + 1).astype(jnp.int32)


def top_mask(score: jax.Array, k: jax.Array) -> jax.Array:
    """[..., n] bool: the k[...] largest entries of score (ties: lower index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < k[..., None]


def group_union(mask: jax.Array, kv_heads: int) -> jax.Array:
    """[b, hq, ...] -> [b, hkv, ...]: a block is listed for a kv head if any of its query heads wants it."""
    b, hq = mask.shape[:2]
    return mask.reshape(b, kv_heads, hq // kv_heads, *mask.shape[2:]).any(axis=2)


def to_lists(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[b, h, nqb, nkb] bool -> (block_indices [b, h, nqb, nkb] int32 with the listed blocks first,
    ascending, block_counts [b, h, nqb] int32): `pallas_kernels.block_sparse_prefill`'s lists."""
    order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
    return order, mask.sum(-1).astype(jnp.int32)


def density_counts(mask: jax.Array, geo: Geometry) -> jax.Array:
    """[b, hkv, 2] float32 (listed live blocks, live blocks) of a kv-head mask."""
    live = geo.live_blocks()
    return jnp.stack([(mask & live).sum((-1, -2)), live.sum((-1, -2))], -1).astype(jnp.float32)
