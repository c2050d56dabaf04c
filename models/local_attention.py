"""Interleaved local (sliding-window) and global attention layers, as in Gemma 3.

A local layer's query at position p sees the keys at positions (p - sliding_window, p]; its RoPE
uses `config.rope_local_theta`. The layer index is a Python int in the per-layer loop (the choice is
static: global layers keep every attention path) and a traced int inside `lax.scan` (the choice is a
`jnp.where`; global layers then get a window longer than any context).

In the engine's per-layer cache (`kvjax.generate.init_engine_cache`) a local layer keeps a ring
buffer of its window (`kvjax.ring.RingCache`: min(window, context) slots, memory bounded by the
window), and compression policies act on the global layers only (`kvjax.ring.policy_part`). A
dense `KVCache` (a cache stacked over layers, scanned) also works: it holds every token, a decode
step hides the slots its window has left (the kernels read what remains), several queries take the
XLA path with the window in the mask. Both attend through `kvjax.attention.attend(..., window=)`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.rope import apply_rope

Layer = Union[int, jax.Array]
UNBOUNDED = 2 ** 30     # a "window" no context reaches (global layers inside a scan)


def local_mask(config: ModelConfig) -> np.ndarray:
    """[n_layers] bool: which layers are sliding-window layers."""
    mask = np.zeros(config.n_layers, bool)
    mask[list(config.local_layers)] = True
    return mask


def layer_window(config: ModelConfig, layer: Layer) -> Optional[Union[int, jax.Array]]:
    """The layer's sliding window (None: a global layer of a static index, or no local layers)."""
    if not config.local_layers:
        return None
    if isinstance(layer, (int, np.integer)):
        return config.sliding_window if int(layer) in config.local_layers else None
    return jnp.where(jnp.asarray(local_mask(config))[layer], config.sliding_window, UNBOUNDED)


def layer_rope(config: ModelConfig, layer: Layer) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`rope(x [batch, heads, seq, head_dim], positions)` with the layer's RoPE base."""
    if not config.local_layers:
        return lambda x, pos: apply_rope(x, pos, config)
    if isinstance(layer, (int, np.integer)):
        local = int(layer) in config.local_layers
        return lambda x, pos: apply_rope(x, pos, config, local)
    is_local = jnp.asarray(local_mask(config))[layer]
    return lambda x, pos: jnp.where(is_local, apply_rope(x, pos, config, True), apply_rope(x, pos, config))


def attend_local(layer_cache, q: jax.Array, positions: jax.Array, window, *, observe, backend: str):
    """q [batch, q_heads, new, head_dim] (post-RoPE) over a dense layer cache with a sliding window
    -> (out [batch, q_heads, new, head_dim], observations)."""
    from kvjax.attention import attend
    from kvjax.cache import KVCache
    if not isinstance(layer_cache, KVCache):
        raise ValueError(f"sliding-window layers need a dense KVCache, got {type(layer_cache).__name__} "
                         f"(compress or quantize a model with local layers through a dense cache)")
    return attend(q, layer_cache.keys, layer_cache.values, layer_cache.positions, positions, observe=observe,
                  backend=backend, lengths=layer_cache.lengths, window=window)
