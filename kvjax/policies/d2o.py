"""D2O (Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient Long-Context
Inference of Large Language Models", arXiv 2406.13035; AIoT-MLSys-Lab/d2o): H2O eviction, then the
evicted tokens that are close enough to a kept one are merged into it.

Token level (per head, after H2O's selection: accumulated attention + the newest `recent` share of
the budget, the paper's hh/recent split 0.1/0.1 -> recent=0.5):

    c_e  = max_{r kept} cos(k_e, k_r),   r*(e) = argmax_r cos(k_e, k_r)      (e evicted)
    tau  = mean_e c_e            (the first call's threshold; `threshold` fixes it instead)
    k_r <- (k_r + sum_{e: r*(e) = r, c_e >= tau} c_e k_e) / (1 + #{those e})          (same for v)

i.e. the scatter-mean of {k_r} and the weighted {c_e k_e} merged into r. tau is the mean over the
layer's evicted tokens of every kv head (per batch row).
Layer level (`layer_budgets=True`, computed at compression from the accumulated attention):

    v_l   = mean_h minmax_h( var_j( A_l[h, j] ) )      A: column sums of attention (H2O's state)
    r_l   = clip(softmax_l(-v)_l * L * rho, 0.01, 1)   rho = n_keep / context (the uniform kept share)
    b_l   = clip(floor(r_l * context), 1, context);    layers 0, 1 and L-1 keep everything

(the layers whose attention is spread evenly, low variance, keep more). The recent share applies
to each layer's own budget. The variance runs over the live slots, per kv head (the state is summed
over the GQA group; the code's heads are query heads), min-max normalised over the kv heads (0 when
they are all equal). The uncompressed layers make D2O's cache larger than a uniform one of the
same `rho` (memory_bytes says by how much): that is the method's own trade, kept as the spec
gives it. After a "prefill" compression the layers become one cache each (`kvjax.layerwise`,
as PyramidKV), so each layer allocates its own budget. `layer_budgets=False`: uniform budgets.
Not implemented here ([code] differences, said plainly):
- the EMA of tau across compressions (tau <- alpha tau + beta mean(c)): each compression uses its
  own mean (with the "prefill" schedule there is one compression, the code's first call).
- the code decides a merge by the mean over heads of c_e; here each head decides for its own
  evicted tokens (heads evict different tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.layerwise import from_stacked
from kvjax.policies.base import Observation
from kvjax.policies.merging import HeavyRecent, apply_weights, into_rows, nearest_kept, one_hot_kept


def layer_ratios(accumulated: jax.Array, valid: jax.Array, rho: jax.Array) -> jax.Array:
    """D2O's per-layer kept shares [L, B] from the accumulated attention [L, B, Hkv, S], live slots
    valid [L, B, Hkv, S] and the uniform kept share rho [B]; layers 0, 1 and L-1 get 1."""
    n_layers = accumulated.shape[0]
    a = jnp.where(valid, accumulated.astype(jnp.float32), 0.0)
    n = jnp.maximum(valid.sum(-1), 1)
    mean = a.sum(-1) / n
    var = jnp.sum(jnp.where(valid, (a - mean[..., None]) ** 2, 0.0), -1) / n            # [L, B, Hkv]
    lo, hi = var.min(-1, keepdims=True), var.max(-1, keepdims=True)
    v = jnp.mean(jnp.where(hi > lo, (var - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0), -1)   # [L, B]
    r = jnp.clip(jax.nn.softmax(-v, axis=0) * n_layers * rho[None, :], 0.01, 1.0)
    full = jnp.isin(jnp.arange(n_layers), jnp.array([0, 1, n_layers - 1]))
    return jnp.where(full[:, None], 1.0, r)


def layer_budgets(obs: Observation, n_keep: jax.Array) -> jax.Array:
    """Kept tokens per layer and batch row [L, B] (D2O's layer level)."""
    valid = obs.cache.positions >= 0
    context = valid.sum(-1).max(-1)                                                      # [L, B]
    rho = n_keep / jnp.maximum(context[0], 1)
    r = layer_ratios(obs.accumulated, valid, rho)
    return jnp.clip(jnp.floor(r * context + 1e-6), 1, context).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class D2O(HeavyRecent):
    """recent: share of the budget given to the newest tokens (0.5: H2O/D2O 0.1 + 0.1);
    threshold: a fixed tau (None = the mean similarity of the evicted tokens)."""

    threshold: Optional[float] = None
    layer_budgets: bool = True
    ragged: bool = True   # final cache as one cache per layer of its own budget (False: stacked)

    merges = True

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")

    def max_keep(self, n_keep: int, context: int) -> int:
        return context if self.layer_budgets else n_keep     # layers 0, 1, L-1 keep everything

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        if not self.layer_budgets:
            return super().adjust_scores(scores, obs, n_keep)
        b = layer_budgets(obs, n_keep)                                                   # [L, B]
        n_recent = jnp.floor(self.recent * b + 1e-6).astype(jnp.int32)
        pos = obs.cache.positions
        newest = (pos >= 0) & (pos > pos.max(-1, keepdims=True) - n_recent[..., None, None])
        return jnp.where(newest, jnp.inf, scores)

    def budgets(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        if not self.layer_budgets:
            return self.head_budgets(scores, n_keep)
        return jnp.broadcast_to(layer_budgets(obs, n_keep)[..., None], scores.shape[:3])

    def finalize(self, new, obs, idx):
        if self.layer_budgets and self.ragged and isinstance(new, kvcache.KVCache):
            return from_stacked(new)
        return new

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        s = old.capacity
        c, row, ev = nearest_kept(old, idx)                                       # [B, Hkv, S] each
        if self.threshold is None:
            tau = jnp.sum(c, (1, 2)) / jnp.maximum(ev.sum((1, 2)), 1)             # [B]
        else:
            tau = jnp.full(c.shape[:1], self.threshold, jnp.float32)
        go = ev & (c >= tau[:, None, None])                                       # merged evicted tokens
        into = into_rows(row, go, idx.shape[-1])                                  # [B, Hkv, K, S]
        w = into * c[..., None, :]                                                # [B, Hkv, K, S]
        eye = one_hot_kept(idx, s)
        count = 1.0 + into.sum(-1, keepdims=True)
        wt = (eye + w) / count
        return apply_weights(old, wt, wt)
