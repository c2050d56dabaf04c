"""The policy interface: scores -> kept slots -> a smaller cache.

A scoring policy is a frozen dataclass of hyperparameters (hashable: a static jit argument) with

    observe: models.llama.Observe        what the forward pass must return for it
    score(obs: Observation) -> [layers, batch, kv_heads, slots] float32, higher = keep
    accumulates: bool                     True if it adds a per-slot running score (H2O, Keyformer)

Shared code here turns scores and a budget into a compressed cache (`compress`): empty slots
are never kept, ties break toward older slots, kept indices are sorted chronologically, and the
new cache is allocated at the budget (plus room for what comes next), so memory really shrinks.
Budgets are uniform, per layer or per head (`head_budgets`: PyramidKV, AdaKV). Selection gathers
into a padded [L, B, Hkv, max_keep] cache (under jit); a policy's `finalize` then turns it into its
final layout: AdaKV a head-packed pool per layer (`kvjax.packed`), PyramidKV and DuoAttention /
RazorAttention one cache per layer (`kvjax.layerwise`), whose eager `resize` allocates exactly the
kept tokens (+ decode room), so per-head and per-layer budgets save real memory.

Position regimes: by default keys stay post-RoPE at their original positions. A policy with
`rerotate = True` has its kept keys re-rotated to contiguous in-cache positions 0..kept-1
(StreamingLLM's pos-shift, kvpress's KeyRerotationPress); new tokens then continue from there.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.layerwise import LayerwiseCache, from_stacked, layer_positions
from kvjax.observation import Observation, Observe
from models.config import ModelConfig
from models.rope import apply_rope

__all__ = ["Observation", "Observe", "ScoringPolicy", "Budget", "compress", "select"]

NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class ScoringPolicy:
    """Base class; subclasses set `observe` needs and implement `score`."""

    @property
    def observe(self) -> Observe:
        return Observe()

    accumulates = False
    rerotate = False

    def score(self, obs: Observation) -> jax.Array:  # [L, B, Hkv, S]
        raise NotImplementedError

    def accumulate(self, obs: Observation) -> jax.Array:
        """Per-slot increment of the running score after a forward ([L, B, Hkv, S])."""
        raise NotImplementedError

    def head_budgets(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
        """Tokens to keep per head `[L, B, Hkv]` given the uniform per-head budget `n_keep [B]`."""
        return jnp.broadcast_to(n_keep[None, :, None], scores.shape[:3])

    # --- Additive hooks (helper, issue 3: PyramidKV/AdaKV/Keyformer/ThinK/Razor/Duo); the
    # defaults leave every existing policy unchanged.
    def max_keep(self, n_keep: int, context: int) -> int:
        """Slots per head the compressed cache must hold when the uniform budget keeps `n_keep` of
        `context` tokens (policies whose per-layer/per-head budgets exceed it override this)."""
        return n_keep

    def adjust_scores(self, scores: jax.Array, obs: "Observation", n_keep: jax.Array) -> jax.Array:
        """Scores after the budget `n_keep [B]` is known (e.g. Keyformer's recent share of it)."""
        return scores

    def budgets(self, scores: jax.Array, obs: "Observation", n_keep: jax.Array) -> jax.Array:
        """Tokens to keep per head `[L, B, Hkv]` when the budget needs more than the scores (the
        accumulated state, the slot positions in `obs`: D2O's layer budgets). Default: head_budgets."""
        return self.head_budgets(scores, n_keep)

    # --- Additive hook (helper, issue 18: merging methods CAM/D2O/KVMerger/...): a policy with
    # `merges = True` folds evicted tokens into the kept ones.
    merges = False

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        """Merged keys and values of the kept slots of ONE layer.

        old: the layer's cache before compression (keys [B, Hkv, S, d]); idx: its kept slots
        [B, Hkv, K] (sorted, -1 = none); scores: its selection scores [B, Hkv, S] (+inf = protected).
        returns (keys [B, Hkv, K, d], values [B, Hkv, K, dv]) written into the kept slots (rows of
        idx = -1 are ignored). Only called when `merges` is True."""
        raise NotImplementedError

    def finalize(self, new: kvcache.KVCache, obs: "Observation", idx: jax.Array):
        """Turn the gathered cache into the policy's own cache layout (ThinK, RazorAttention).
        idx: the kept slots of `obs.cache` per head [L, B, Hkv, max_keep] (-1 = none)."""
        return new


# ----------------------------------------------------------------------------------------------
# Shared helpers used by the methods.

def group_reduce(x: jax.Array, kv_heads: int, how: str = "mean") -> jax.Array:
    """Reduce a per-query-head axis to kv heads: [..., Hq, S] with Hq on axis -2 -> [..., Hkv, S]."""
    *lead, hq, s = x.shape
    g = x.reshape(*lead, kv_heads, hq // kv_heads, s)
    return g.mean(-2) if how == "mean" else g.max(-2)


def window_scores(obs: Observation, window: int) -> jax.Array:
    """Observation-window attention summed over the last `window` queries: [L, B, Hq, S].

    Keys inside the window are excluded later by protecting the most recent tokens."""
    if obs.window_probs is None:
        raise ValueError("this policy needs window attention probabilities (Observe(window=...))")
    return obs.window_probs[..., -window:, :].sum(-2)


def newest_mask(positions: jax.Array, n: int) -> jax.Array:
    """[..., S] bool: slot holds one of the `n` highest positions of its (layer, batch, head)."""
    if n <= 0:
        return jnp.zeros(positions.shape, bool)
    latest = positions.max(-1, keepdims=True)
    return (positions >= 0) & (positions > latest - n)


def oldest_mask(positions: jax.Array, n: int) -> jax.Array:
    """[..., S] bool: slot holds one of the first `n` token positions (attention sinks)."""
    return (positions >= 0) & (positions < n)


def protect(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Force-keep masked slots (their score becomes +inf)."""
    return jnp.where(mask, jnp.inf, scores)


# ----------------------------------------------------------------------------------------------
# Budgets.

@dataclasses.dataclass(frozen=True)
class Budget:
    """How many tokens each head keeps: a kept `ratio` of the context (0 < ratio <= 1) or `tokens`.

    Note kvpress's `compression_ratio` is the fraction removed: our ratio 0.25 = kvpress 0.75."""

    ratio: Optional[float] = None
    tokens: Optional[int] = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("give exactly one of Budget(ratio=...) or Budget(tokens=...)")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"budget must be a positive token count, got {self.tokens}")

    @staticmethod
    def parse(value) -> "Budget":
        """'0.25' / '25%' -> ratio, '512' / '512tok' -> tokens; '1.5' is an error
        (`kvjax.budget_parse.parse_budget`, the one budget syntax of every entry point)."""
        from kvjax.budget_parse import parse_budget
        return parse_budget(value)

    def kept(self, context: int) -> int:
        """Tokens kept out of `context` (never more than the context)."""
        # floor, as kvpress (int(k_len * (1 - compression_ratio))); the epsilon absorbs float error
        n = self.tokens if self.tokens is not None else max(1, int(self.ratio * context + 1e-6))
        return min(n, context)

    def __str__(self):
        return f"{self.ratio:g}" if self.ratio is not None else f"{self.tokens}tok"


# ----------------------------------------------------------------------------------------------
# Selection.

def select(scores: jax.Array, valid: jax.Array, counts: jax.Array, max_keep: int) -> jax.Array:
    """Top-`counts` slots per head, sorted by slot; -1 pads heads that keep fewer.

    scores, valid: [L, B, Hkv, S]; counts: [L, B, Hkv] int; returns [L, B, Hkv, max_keep] int32."""
    s = jnp.where(valid, scores.astype(jnp.float32), NEG)
    # ties -> older slot first: lax.top_k is stable (lower index wins among equals)
    _, idx = jax.lax.top_k(s, max_keep)
    rank = jnp.arange(max_keep)
    ok = (rank < counts[..., None]) & jnp.take_along_axis(valid, idx, axis=-1)
    idx = jnp.where(ok, idx, jnp.iinfo(jnp.int32).max)
    idx = jnp.sort(idx, axis=-1)
    return jnp.where(idx == jnp.iinfo(jnp.int32).max, -1, idx).astype(jnp.int32)


def rerotate_keys(cache: kvcache.KVCache, config: ModelConfig) -> kvcache.KVCache:
    """Move every live key from its stored position to its slot index (contiguous positions).

    RoPE composes additively, so rotating a post-RoPE key by (new - old) equals rotating the
    pre-RoPE key by new."""
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)
    new_pos = jnp.where(cache.valid, slot, -1)
    delta = jnp.where(cache.valid, new_pos - cache.positions, 0)
    lead = cache.keys.shape[:-2]
    k = cache.keys.reshape((-1,) + cache.keys.shape[-3:])       # [L*B, Hkv, S, d]
    rot = apply_rope(k, delta.reshape((-1,) + delta.shape[-2:]), config).reshape(cache.keys.shape)
    del lead
    return dataclasses.replace(cache, keys=rot, positions=new_pos)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PositionsView:
    """What selection needs of a cache: slot positions `[L, B, Hkv, S]` (-1 = empty)."""

    positions: jax.Array

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    @property
    def lengths(self) -> jax.Array:
        return jnp.sum(self.valid, axis=-1).astype(jnp.int32)


def merge_layer(policy: ScoringPolicy, old: kvcache.KVCache, new: kvcache.KVCache, idx: jax.Array,
                scores: jax.Array, layer: int) -> kvcache.KVCache:
    """Write the policy's merged keys/values (`policy.merge`) into the kept slots of one gathered
    layer `new` (its first K slots hold idx's tokens in idx's order: `select` sorts them, -1 last)."""
    k, v = policy.merge(old, idx, scores, layer)
    kept = idx.shape[-1]
    present = (idx >= 0)[..., None]
    keys = new.keys.at[..., :kept, :].set(jnp.where(present, k.astype(new.keys.dtype), new.keys[..., :kept, :]))
    values = new.values.at[..., :kept, :].set(
        jnp.where(present, v.astype(new.values.dtype), new.values[..., :kept, :]))
    return dataclasses.replace(new, keys=keys, values=values)


def _custom_finalize(policy) -> bool:
    return type(policy).finalize is not ScoringPolicy.finalize


def compress(policy: ScoringPolicy, config: ModelConfig, cache, scores: jax.Array, n_keep: jax.Array,
             capacity: int, max_keep: int, state: Optional[jax.Array] = None,
             queries: Optional[jax.Array] = None):
    """Keep each head's best `n_keep` (or the policy's per-head allocation) slots.

    cache: the engine's per-layer cache (`LayerwiseCache` of KVCache layers) or a stacked KVCache;
    scores: `[L, B, Hkv, S]` the policy's scores, reduced inside the layers by the forward
    (`kvjax.observation.Observer`); n_keep: [B] int tokens per head for each batch row
    (<= max_keep); capacity: slots of the new cache (>= max_keep, the rest is room for new tokens);
    state: optional running per-slot score [L, B, Hkv, S] gathered along; queries: the last window
    queries `[L, B, Hq, w, d]` for policies whose layout needs them (ThinK).
    Selection and gathering run layer by layer: nothing cache-sized is stacked, except for policies
    with their own final layout (`finalize`: ThinK, RazorAttention, DuoAttention, AdaKV/PyramidKV
    ragged), which get the gathered (budget-sized) cache stacked. Returns (cache, state)."""
    per_layer = isinstance(cache, LayerwiseCache)
    layers = cache.layers if per_layer else None
    positions = layer_positions(cache)
    view = Observation(cache=PositionsView(positions), config=config, accumulated=state, window_queries=queries,
                       n_layers=positions.shape[0])
    scores = policy.adjust_scores(scores, view, n_keep)
    counts = policy.budgets(scores, view, n_keep)
    idx = select(scores, positions >= 0, counts, max_keep)
    if per_layer:
        new_layers = [kvcache.gather(lc, idx[i], capacity) for i, lc in enumerate(layers)]
        if policy.merges:
            new_layers = [merge_layer(policy, lc, nl, idx[i], scores[i], i)
                          for i, (lc, nl) in enumerate(zip(layers, new_layers))]
        if policy.rerotate:
            new_layers = [rerotate_keys(lc, config) for lc in new_layers]
        new = dataclasses.replace(cache, layers=tuple(new_layers), capacity=capacity)
    else:
        new = kvcache.gather(cache, idx, capacity)
        if policy.merges:
            one = lambda c, i: jax.tree_util.tree_map(lambda x: x[i], c)
            merged = [merge_layer(policy, one(cache, i), one(new, i), idx[i], scores[i], i)
                      for i in range(idx.shape[0])]
            new = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *merged)
        if policy.rerotate:
            new = rerotate_keys(new, config)
    if _custom_finalize(policy):
        stack = lambda c: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *c.layers) if per_layer else c
        full = Observation(cache=stack(cache), config=config, accumulated=state, window_queries=queries,
                           scores=scores, n_layers=positions.shape[0])
        new = policy.finalize(stack(new), full, idx)
        if per_layer and isinstance(new, kvcache.KVCache):
            new = from_stacked(new, uniform=True)   # other own layouts stay stacked (scanned)
    if state is not None:
        safe = jnp.clip(idx, 0, None)
        state = jnp.where(idx >= 0, jnp.take_along_axis(state, safe, axis=-1), 0.0)
        state = jnp.pad(state, [(0, 0)] * 3 + [(0, capacity - max_keep)])
    return new, state
