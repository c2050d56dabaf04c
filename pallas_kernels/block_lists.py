"""Block lists of `block_sparse_prefill`, prepared for the kernels (shared by GPU and TPU).

The kernels walk a row's listed key blocks in ascending order in three loops, exactly as the
dense flash prefill walks its live range: the blocks cut by `starts` (masked), the blocks that
every row of the query tile sees whole (no mask arithmetic) and the diagonal blocks (masked).
For that the wrapper (i) turns every row into a sorted, duplicate-free list padded with the
sentinel `n_key_blocks` (`normalize`), and (ii) computes, per query tile, the positions where
the three loops start and stop (`loop_bounds`): four int32 per (batch, kv-head, tile). Blocks
entirely before `starts` or after the tile's last query are dropped there, so a listed dead
block costs nothing. The vertical (column-gather) form adds per-row single key columns:
`normalize_columns` sorts them, drops dead ones and those inside a listed block (attended once),
and `column_bounds` counts, per tile, the leading columns at or before its last query.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(block_indices: jax.Array, block_counts: jax.Array, n_key_blocks: int,
              width: int) -> jax.Array:
    """[b, h, n_qb, m] lists + [b, h, n_qb] counts -> [b, h, n_qb, width] int32 sorted ascending,
    each valid block once, padded with `n_key_blocks` (width >= m; entries past the count or
    outside [0, n_key_blocks) are dropped: `reference.block_list_mask`'s set semantics)."""
    m = block_indices.shape[-1]
    pos = jnp.arange(m)
    idx = block_indices.astype(jnp.int32)
    valid = (pos < block_counts[..., None]) & (idx >= 0) & (idx < n_key_blocks)
    return sorted_set(jnp.where(valid, idx, n_key_blocks), n_key_blocks, width)


def sorted_set(x: jax.Array, sentinel: int, width: int) -> jax.Array:
    """Rows of x [..., m] (dropped entries already = sentinel, the largest value) -> [..., width]
    sorted ascending, each value once, padded with the sentinel (width >= m)."""
    x = jnp.sort(x, axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]], -1)
    x = jnp.sort(jnp.where(dup, sentinel, x), axis=-1)
    if width > x.shape[-1]:
        x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, width - x.shape[-1]),), constant_values=sentinel)
    return x


def loop_bounds(idx: jax.Array, starts: jax.Array, lengths: jax.Array, t_len: int,
                block_size: int, tile_q: int) -> jax.Array:
    """Loop positions per query tile of `tile_q` tokens (a divisor of block_size).

    idx: `normalize`'s [b, h, n_qb, width]; starts, lengths [b, h] (clamped to the capacity).
    returns [b, h, n_tiles, 4] int32 (p0, p1, p2, p3), n_tiles = n_qb * block_size / tile_q:
    the tile's row walks positions [p0, p1) masked (cut by starts), [p1, p2) unmasked (seen whole
    by every row), [p2, p3) masked (the diagonal); positions < p0 (before starts) and >= p3 (after
    the tile's last query, or the padding) are skipped."""
    b, h, n_qb, _ = idx.shape
    per = block_size // tile_q
    n_tiles = n_qb * per
    i0 = jnp.arange(n_tiles, dtype=jnp.int32) * tile_q                    # first query of a tile
    first = starts.astype(jnp.int32)[..., None]                          # [b, h, 1]
    length = lengths.astype(jnp.int32)[..., None]
    end = length - t_len + jnp.minimum(i0 + tile_q, t_len)               # one past the last slot
    bs = block_size
    lo = first // bs
    hi = jnp.where(end > first, -(-jnp.maximum(end, 0) // bs), lo)
    full_lo = -(-first // bs)                                            # first block all >= starts
    full_hi = jnp.maximum(length - t_len + i0 + 1, 0) // bs              # blocks row i0 sees whole
    a = jnp.clip(full_lo, lo, hi)
    bb = jnp.clip(full_hi, a, hi)
    rows = jnp.repeat(idx, per, axis=2)                                  # [b, h, n_tiles, width]
    count = lambda x: (rows < x[..., None]).sum(-1).astype(jnp.int32)
    return jnp.stack([count(lo), count(a), count(bb), count(hi)], axis=-1)


def listed_blocks(idx: jax.Array, n_key_blocks: int) -> jax.Array:
    """`normalize`'s [b, h, n_qb, width] -> [b, h, n_qb, n_key_blocks] bool (a scatter: no
    width x n_key_blocks comparison)."""
    b, h, n_qb, width = idx.shape
    grid = jnp.ix_(jnp.arange(b), jnp.arange(h), jnp.arange(n_qb), jnp.arange(width))[:3]
    out = jnp.zeros((b, h, n_qb, n_key_blocks + 1), bool).at[(*grid, idx)].set(True)
    return out[..., :n_key_blocks]


def normalize_columns(column_indices: jax.Array, column_counts: jax.Array, idx: jax.Array,
                      starts: jax.Array, lengths: jax.Array, block_size: int, cap: int,
                      width: int) -> jax.Array:
    """The vertical (column-gather) lists for the kernels: [b, h, n_qb, m] columns + [b, h, n_qb]
    counts -> [b, h, n_qb, width] int32 sorted ascending, each kept column once, padded with the
    sentinel `cap` (width >= m). Dropped: entries past the count, outside [starts, lengths) (dead
    or out of range) and columns whose key block is already listed in `idx` (`normalize`'s block
    lists: a slot is attended once, `reference.block_sparse_prefill`'s set union)."""
    m = column_indices.shape[-1]
    col = column_indices.astype(jnp.int32)
    nkb = -(-cap // block_size)
    in_block = jnp.take_along_axis(listed_blocks(idx, nkb), jnp.clip(col // block_size, 0, nkb - 1), axis=-1)
    valid = ((jnp.arange(m) < column_counts[..., None]) & (col >= starts[..., None, None])
             & (col < lengths[..., None, None]) & (col < cap) & ~in_block)
    return sorted_set(jnp.where(valid, col, cap), cap, width)


def column_bounds(cols: jax.Array, lengths: jax.Array, t_len: int, block_size: int,
                  tile_q: int) -> jax.Array:
    """Columns a query tile walks: `normalize_columns`' [b, h, n_qb, width] -> [b, h, n_tiles]
    int32 count of the row's leading columns at or before the tile's last query slot (the rest
    are causally masked for every row of the tile)."""
    per = block_size // tile_q
    n_tiles = cols.shape[2] * per
    i0 = jnp.arange(n_tiles, dtype=jnp.int32) * tile_q
    end = lengths.astype(jnp.int32)[..., None] - t_len + jnp.minimum(i0 + tile_q, t_len)   # [b, h, n_tiles]
    rows = jnp.repeat(cols, per, axis=2)
    return (rows < end[..., None]).sum(-1).astype(jnp.int32)
