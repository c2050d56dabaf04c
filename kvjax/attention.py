"""The one attention entry point: queries over whatever a layer's cache holds.

`attend` computes grouped-query attention of new queries over the cache slots, masking empty
slots (position -1) and slots from the future (slot position > query position). This is the XLA
reference path; Pallas kernels (pallas_kernels/) are dispatched from here when one exists for
the backend and the cache layout.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionStats:
    """What a policy may observe from one layer's attention (all optional, static flags).

    window: return probabilities of the last `window` queries over the cache slots.
    column_sums: return the sum over all new queries of the probabilities (H2O's score).
    """

    window: int = 0
    column_sums: bool = False


def attention_mask(slot_positions: jax.Array, query_positions: jax.Array) -> jax.Array:
    """`[batch, kv_heads, queries, slots]` bool: slot is live and not after the query.

    slot_positions: `[batch, kv_heads, slots]`; query_positions: `[batch, queries]` (-1 = padding,
    which sees nothing)."""
    sp = slot_positions[:, :, None, :]
    qp = query_positions[:, None, :, None]
    return (sp >= 0) & (sp <= qp)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, slot_positions: jax.Array,
           query_positions: jax.Array, *, scale: float | None = None,
           stats: AttentionStats = AttentionStats()) -> tuple[jax.Array, dict]:
    """Grouped-query attention over a cache (XLA reference, float32 softmax).

    q:               [batch, q_heads, queries, head_dim]
    keys:            [batch, kv_heads, slots, head_dim]
    values:          [batch, kv_heads, slots, value_dim]
    slot_positions:  [batch, kv_heads, slots] int32 (-1 = empty)
    query_positions: [batch, queries] int32 (-1 = padding)
    returns out [batch, q_heads, queries, value_dim] (zeros for queries that see no slot) and a
    dict of observations requested by `stats`:
        "window_probs" [batch, q_heads, window, slots], "column_sums" [batch, q_heads, slots].
    """
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    if hq % hkv:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={hkv}")
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32)) * scale
    mask = attention_mask(slot_positions, query_positions)[:, :, None]  # [b, hkv, 1, t, s]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with no live slot become all-zero, not uniform
    out = jnp.einsum("bhgts,bhsv->bhgtv", probs, values.astype(jnp.float32))
    out = out.reshape(b, hq, t, -1).astype(q.dtype)
    obs = {}
    if stats.window:
        w = min(stats.window, t)
        obs["window_probs"] = probs[:, :, :, t - w:].reshape(b, hq, w, -1)
    if stats.column_sums:
        obs["column_sums"] = probs.sum(axis=3).reshape(b, hq, -1)
    return out, obs
