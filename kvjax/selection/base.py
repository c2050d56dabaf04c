"""Query-aware sparse decode: the selection interface and the cache that applies it.

A *selector* (a frozen, hashable dataclass: Quest, TokenSelect, ...) is three pure functions:

    init_meta(kv, config)                   -> meta     per-cache metadata built from a full cache
    append_meta(meta, kv_before, keys, positions, keys_pre_rope) -> meta   kept up to date on append
    select(meta, kv, q, query_positions)    -> (indices, valid)   the query-dependent part
    forced(meta, kv)                        -> (indices, valid)   recomputed every step (sink / local)

`indices [batch, kv_heads, n]` are page indices (`page_size` > 1, page i = slots [i*P, (i+1)*P))
or slot indices (`page_size` 1); `valid [batch, kv_heads, n]` marks the entries that count.

`SelectiveCache` wraps one layer's dense `KVCache` (or, for Quest and LouisKV, a KIVI layer:
`kvjax.selection.quantized`) with the selector's metadata (part of the
pytree, so counted in `memory_bytes()`) and a `SelectState` (the last selection, for reuse). A
decode step (one query per row) calls `select` only for the rows whose `reuse` rule says so (every
`interval` steps, or TokenSelect's query-similarity test; under `lax.cond`, so a step that reuses
everything does not pay for scoring), appends the `forced` part, and attends over the selection
with `pallas_kernels.sparse_decode` (page mode, or token mode when a selected page holds padding
slots). Prefill and observed steps attend densely. A selector whose budget covers the capacity
is never called: the layer attends densely (equal to the full cache).

The model's layer calls `attend_and_update` when a cache has it (so the selection state can be
carried); `wrap(selector, cache, config)` turns the engine's per-layer cache into selective layers
(the first `dense_layers` stay dense), which is what `generate(..., selection=)` and
`decode_loop(..., selection=)` do after prefill.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kvjax import cache as kvcache
from kvjax.attention import decode_impl, dense_kernel_ok, is_decode_step, mask_padded_queries
from kvjax.layerwise import LayerwiseCache


EMPTY_AGE = 1 << 30      # SelectState.age of a row that has no selection yet


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectState:
    """The last query-dependent selection of one layer (reused while the selector allows).

    indices, valid: [batch, kv_heads, n_select]; fingerprint: [batch, q_heads * head_dim] float32,
    the query it was made for; age: [batch] int32 decode steps since it was made."""

    indices: jax.Array
    valid: jax.Array
    fingerprint: jax.Array
    age: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectiveCache:
    """One layer: a dense KVCache [batch, kv_heads, capacity, d] (or a KIVICache) + the selector's
    metadata + state."""

    kv: kvcache.KVCache
    meta: Any
    state: SelectState
    selector: Any = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def lengths(self) -> jax.Array:
        return self.kv.lengths

    @property
    def positions(self) -> jax.Array:
        return self.kv.positions

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def keys(self) -> jax.Array:
        return self.kv.keys

    @property
    def values(self) -> jax.Array:
        return self.kv.values

    def memory_bytes(self) -> int:
        """Bytes of the K/V, the metadata and the selection state."""
        return kvcache.tree_bytes(self)

    def meta_bytes(self) -> int:
        return kvcache.tree_bytes(self.meta)

    def hand_over(self):
        """The selection this layer passes to the layers after it (DELTA's Δ-layers), else None."""
        return self.state if getattr(self.selector, "hands_over", False) else None

    def receive(self, carry: SelectState) -> "SelectiveCache":
        """Take the selection of the last Δ-layer before this one (selectors with `receives`)."""
        if not getattr(self.selector, "receives", False):
            return self
        return dataclasses.replace(self, state=carry)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "SelectiveCache":
        meta = self.selector.append_meta(self.meta, self.kv, keys, positions, keys_pre_rope)
        return dataclasses.replace(self, kv=self.kv.append(keys, values, positions), meta=meta)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        out, obs, _ = self.attend_and_update(q, query_positions, observe=observe, backend=backend, rope=rope)
        return out, obs

    def attend_and_update(self, q, query_positions, *, observe, backend="auto", rope=None):
        """q [batch, q_heads, new, d] post-RoPE -> (out, observations, cache with the new state)."""
        sel = self.selector
        if not is_decode_step(q, observe) or sel.covers(self.capacity):
            out, obs = self.kv.attend(q, query_positions, observe=observe, backend=backend, rope=rope)
            return out, obs, self
        state = self.state
        fp = q[:, :, 0].reshape(q.shape[0], -1).astype(jnp.float32)
        need = ~sel.reuse(state, fp)                                           # [batch]

        def fresh(_):
            idx, valid = sel.select(self.meta, self.kv, q, query_positions)
            return (jnp.where(need[:, None, None], idx, state.indices),
                    jnp.where(need[:, None, None], valid, state.valid))

        if sel.always_fresh:
            idx, valid = sel.select(self.meta, self.kv, q, query_positions)
        else:
            idx, valid = lax.cond(jnp.any(need), fresh, lambda _: (state.indices, state.valid), None)
        new_state = SelectState(indices=idx, valid=valid,
                                fingerprint=jnp.where(need[:, None], fp, state.fingerprint),
                                age=jnp.where(need, 0, state.age + 1).astype(jnp.int32))
        own = getattr(sel, "attend_selected", None)      # selectors with their own attention (ShadowKV)
        if getattr(sel, "dense_attention", False):       # DELTA's Δ-layers: select, attend to everything
            out, _ = self.kv.attend(q, query_positions, observe=observe, backend=backend, rope=rope)
        elif own is not None:
            out = own(self.meta, self.kv, q, idx, valid, rope)
        else:
            f_idx, f_valid = sel.forced(self.meta, self.kv)
            all_idx = jnp.concatenate([idx, f_idx], axis=-1)
            all_valid = jnp.concatenate([valid, f_valid], axis=-1)
            if isinstance(self.kv, kvcache.KVCache):
                out = sparse_attend(q, self.kv, all_idx, all_valid, sel.page_size, backend)
            else:                                        # a KIVI layer: gather + dequantize the selection
                from kvjax.selection.quantized import sparse_attend_quantized
                out = sparse_attend_quantized(q, self.kv, all_idx, all_valid, sel.page_size, backend)
        out = mask_padded_queries(out, query_positions)
        return out, {}, dataclasses.replace(self, state=new_state)


def compact(indices: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Valid entries first (stable): (indices [b, h, n], counts [b, h]) for `sparse_decode`."""
    order = jnp.argsort(~valid, axis=-1, stable=True)
    return jnp.take_along_axis(indices, order, axis=-1), jnp.sum(valid, axis=-1).astype(jnp.int32)


def sparse_attend(q: jax.Array, kv: kvcache.KVCache, indices: jax.Array, valid: jax.Array, page_size: int,
                  backend: str = "auto") -> jax.Array:
    """One decode query per row over the selected pages / slots only.

    q [batch, q_heads, 1, d]; indices, valid [batch, kv_heads, n] -> out [batch, q_heads, 1, d].
    Runs `pallas_kernels.sparse_decode` (the GPU kernel where `backend` picks it, else its XLA
    reference). Page mode when no selected page holds an empty/padding slot below `lengths`,
    token mode over the live slots of the selected pages otherwise (left padding)."""
    import pallas_kernels
    from pallas_kernels.reference import sparse_slots
    impl = decode_impl("sparse_decode", backend)
    if impl is not None and not dense_kernel_ok(kv.keys.shape[-1], kv.keys.dtype, impl[0]):
        impl = None
    kw = dict(impl="reference") if impl is None else dict(impl=impl[0], interpret=impl[1])
    q1 = q[:, :, 0]
    idx, counts = compact(indices, valid)

    def run(idx, counts, p):
        return pallas_kernels.sparse_decode(q1, kv.keys, kv.values, idx, counts, kv.lengths, page_size=p, **kw)

    if page_size == 1:
        return run(idx, counts, 1)[:, :, None]
    slots, in_sel = sparse_slots(idx, counts, kv.lengths, page_size, kv.capacity)
    live = in_sel & (jnp.take_along_axis(kv.positions, slots, axis=-1) >= 0)
    s_idx, s_counts = compact(slots, live)
    out = lax.cond(jnp.all(live == in_sel), lambda: run(idx, counts, page_size), lambda: run(s_idx, s_counts, 1))
    return out[:, :, None]


def init_state(selector, kv: kvcache.KVCache, q_heads: int) -> SelectState:
    """An empty selection that every row replaces at its first decode step."""
    b, h, _, d = kv.keys.shape
    n = selector.n_select(kv.capacity)
    return SelectState(indices=jnp.zeros((b, h, n), jnp.int32), valid=jnp.zeros((b, h, n), bool),
                       fingerprint=jnp.zeros((b, q_heads * d), jnp.float32),
                       age=jnp.full((b,), EMPTY_AGE, jnp.int32))


def wrap_layer(selector, kv, config, source: kvcache.KVCache | None = None) -> SelectiveCache:
    """A dense (or KIVI) layer cache -> a SelectiveCache with metadata built from its contents.

    kv: a dense KVCache, or a KIVICache for selectors with `quantized_ok` (Quest, LouisKV; see
    `kvjax.selection.quantized`); source: optional full-precision dense layer with the same slots as
    a KIVI `kv` (the prefill's dense cache) to build the metadata from, instead of the dequantized keys."""
    if not isinstance(kv, kvcache.KVCache):
        from kvjax.selection.quantized import check_quantized, dense_view
        check_quantized(selector, kv)
        view = dense_view(kv, source)
    elif source is not None:
        raise ValueError("source= (full-precision keys for the metadata) applies to a quantized layer only")
    else:
        view = kv
    selector.check_capacity(kv.capacity)
    return SelectiveCache(kv=kv, meta=selector.init_meta(view, config), state=init_state(selector, view, config.n_heads),
                          selector=selector)


def check_selection(selector, config) -> None:
    """Errors a selector can raise before any model runs (generate calls it first)."""
    if selector.dense_layers >= config.n_layers:
        raise ValueError(f"{type(selector).__name__}: dense_layers={selector.dense_layers} leaves no sparse layer "
                         f"in a model of {config.n_layers} layers")


def is_wrapped(cache) -> bool:
    """The engine cache already has selective layers (`wrap` was applied)."""
    return isinstance(cache, LayerwiseCache) and any(isinstance(lc, SelectiveCache) for lc in cache.layers)


def wrap(selector, cache, config, source=None):
    """The engine's per-layer cache with layers >= `selector.dense_layers` made selective (the
    first ones stay as they are); an already selective cache is returned as is. source: for a KIVI
    cache, optional per-layer dense cache (LayerwiseCache) of the same slots in full precision to
    build the metadata from (see `wrap_layer`)."""
    if not isinstance(cache, LayerwiseCache):
        raise TypeError(f"selection wraps the engine's LayerwiseCache, got {type(cache).__name__}")
    if is_wrapped(cache):
        return cache
    check_selection(selector, config)
    per_layer = getattr(selector, "for_layer", lambda i, config: selector)    # DELTA: a role per layer
    src = (None,) * len(cache.layers) if source is None else source.layers
    layers = tuple(lc if i < selector.dense_layers else wrap_layer(per_layer(i, config), lc, config, src[i])
                   for i, lc in enumerate(cache.layers))
    return dataclasses.replace(cache, layers=layers)


def read_bytes_per_step(cache) -> dict:
    """Analytical bytes a decode step reads from the cache (K/V + metadata), per generate call.

    dense layers: every slot's K and V (a KIVI layer: its bytes per slot, residual amortised);
    selective layers: the selected tokens' K and V plus the
    selector's `meta_read_bytes` (amortised over its reuse interval). Returns
    {"selected": bytes, "dense": bytes of the same cache read densely, "ratio": selected / dense}."""
    layers = cache.layers if isinstance(cache, LayerwiseCache) else (cache,)
    sel, dense = 0, 0
    for lc in layers:
        kv = lc.kv if isinstance(lc, SelectiveCache) else lc
        if isinstance(kv, kvcache.KVCache):
            per_tok = kv.keys.dtype.itemsize * kv.keys.shape[-1] + kv.values.dtype.itemsize * kv.values.shape[-1]
        else:                                                    # KIVI: codes + stats + residual per slot
            from kvjax.selection.quantized import slot_bytes
            per_tok = slot_bytes(kv)
        b, h, cap = kv.positions.shape
        full = b * h * cap * per_tok
        dense += full
        if isinstance(lc, SelectiveCache) and not lc.selector.covers(cap):
            s = lc.selector
            sel += b * h * s.tokens_read(cap) * per_tok + s.meta_read_bytes(lc.meta, kv) // max(s.interval, 1)
        else:
            sel += full
    return {"selected": int(sel), "dense": int(dense), "ratio": sel / dense if dense else 1.0}


@dataclasses.dataclass(frozen=True)
class SelectorBase:
    """Shared static fields and defaults of the selectors.

    budget: attended tokens per (batch, kv-head) per step; page_size: 1 (tokens) or P (pages);
    interval: reselect every `interval` decode steps (1: every step); dense_layers: the first layers
    attend densely."""

    budget: int = 1024
    page_size: int = 1
    interval: int = 1
    dense_layers: int = 0

    def __post_init__(self):
        for name in ("budget", "page_size", "interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if self.dense_layers < 0:
            raise ValueError(f"{type(self).__name__}: dense_layers must be >= 0, got {self.dense_layers}")

    @property
    def always_fresh(self) -> bool:
        return self.interval == 1

    def covers(self, capacity: int) -> bool:
        """The budget holds the whole capacity: attend densely (equal to the full cache)."""
        return self.budget >= capacity

    def check_capacity(self, capacity: int) -> None:
        if capacity % self.page_size:
            raise ValueError(f"{type(self).__name__}: page size {self.page_size} does not divide the cache "
                             f"capacity {capacity} (generate rounds the capacity up; pass a multiple)")

    def reuse(self, state: SelectState, fingerprint: jax.Array) -> jax.Array:
        """[batch] bool: keep the previous selection (younger than `interval` steps)."""
        return state.age + 1 < self.interval

    def tokens_read(self, capacity: int) -> int:
        return min(self.budget, capacity)

    def meta_read_bytes(self, meta, kv) -> int:
        return kvcache.tree_bytes(meta)

    def append_meta(self, meta, kv, keys, positions, keys_pre_rope=None):
        return meta

    def init_meta(self, kv, config):
        return ()


def scatter_slots(kv: kvcache.KVCache, new: int) -> jax.Array:
    """[batch, kv_heads, new] the slots an append of `new` tokens writes (as `kvjax.cache.append`)."""
    return kv.lengths[..., None] + jnp.arange(new, dtype=jnp.int32)


def live_range(kv: kvcache.KVCache) -> tuple[jax.Array, jax.Array]:
    """(start [b, h] first live slot, n [b, h] live tokens) of a cache whose live slots are
    [start, lengths) (the engine's invariant: left padding first)."""
    from kvjax.attention import live_starts
    start = live_starts(kv.positions, kv.lengths)
    return start, kv.lengths.astype(jnp.int32) - start


def sink_and_local(kv: kvcache.KVCache, n_sink: int, n_local: int) -> tuple[jax.Array, jax.Array]:
    """(slots, valid) [b, h, n_sink + n_local]: the first `n_sink` and the last `n_local` live
    tokens (none twice: a local slot that is also a sink slot is invalid)."""
    start, n = live_range(kv)
    init = start[..., None] + jnp.arange(n_sink, dtype=jnp.int32)
    init_ok = jnp.arange(n_sink) < n[..., None]
    local = kv.lengths[..., None] - n_local + jnp.arange(n_local, dtype=jnp.int32)
    local_ok = local >= (start + n_sink)[..., None]
    return (jnp.clip(jnp.concatenate([init, local], -1), 0, kv.capacity - 1),
            jnp.concatenate([init_ok, local_ok], -1))


def middle_candidates(kv: kvcache.KVCache, n_sink: int, n_local: int) -> jax.Array:
    """[b, h, capacity] bool: live slots in [start + n_sink, lengths - n_local) (not sink, not local)."""
    start, _ = live_range(kv)
    t = jnp.arange(kv.capacity, dtype=jnp.int32)
    return (t >= (start + n_sink)[..., None]) & (t < kv.lengths[..., None] - n_local) & (kv.positions >= 0)


def pre_rope_keys(kv: kvcache.KVCache, config) -> jax.Array:
    """[b, h, capacity, d] float32: the live post-RoPE keys rotated back to position 0 (0 elsewhere)."""
    from models.rope import apply_rope
    live = kv.positions >= 0
    k_pre = apply_rope(kv.keys.astype(jnp.float32), jnp.where(live, -kv.positions, 0), config)
    return jnp.where(live[..., None], k_pre, 0.0)


def cosine_reuse(state: SelectState, fingerprint: jax.Array, threshold: float) -> jax.Array:
    """[batch] bool: cos(fingerprint, the fingerprint of the last selection) >= threshold (float32);
    a row without a selection yet (`init_state`'s age) never reuses."""
    prev = state.fingerprint
    cos = jnp.sum(prev * fingerprint, -1) / jnp.maximum(
        jnp.linalg.norm(prev, axis=-1) * jnp.linalg.norm(fingerprint, axis=-1), 1e-30)
    return (cos >= threshold) & (state.age < EMPTY_AGE)


def neg_inf_topk(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """top-k over the last axis -> (indices int32, valid = finite score); k is clipped to the axis."""
    k = min(k, scores.shape[-1])
    vals, idx = lax.top_k(scores, k)
    return idx.astype(jnp.int32), vals > -jnp.inf

