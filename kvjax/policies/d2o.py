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
Not implemented here ([code] differences, said plainly):
- D2O's layer-level budgets (variance of the attention column sums -> per-layer ratios, layers
  0, 1 and L-1 never compressed): every layer keeps the same budget here.
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
from kvjax.policies.merging import HeavyRecent, apply_weights, cosine, evicted_mask, one_hot_kept


@dataclasses.dataclass(frozen=True)
class D2O(HeavyRecent):
    """recent: share of the budget given to the newest tokens (0.5: H2O/D2O 0.1 + 0.1);
    threshold: a fixed tau (None = the mean similarity of the evicted tokens)."""

    threshold: Optional[float] = None

    merges = True

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        s = old.capacity
        ev = evicted_mask(old, idx)
        kept_keys = jnp.take_along_axis(old.keys, jnp.clip(idx, 0, s - 1)[..., None], axis=-2)
        sim = cosine(old.keys, kept_keys)                                         # [B, Hkv, S(e), K(r)]
        sim = jnp.where((idx >= 0)[..., None, :], sim, -jnp.inf)
        c = jnp.where(ev, sim.max(-1), 0.0)                                       # [B, Hkv, S]
        row = sim.argmax(-1)                                                      # kept row of r*(e)
        if self.threshold is None:
            tau = jnp.sum(c, (1, 2)) / jnp.maximum(ev.sum((1, 2)), 1)             # [B]
        else:
            tau = jnp.full(c.shape[:1], self.threshold, jnp.float32)
        go = ev & (c >= tau[:, None, None])                                       # merged evicted tokens
        into = (jnp.arange(idx.shape[-1])[:, None] == row[..., None, :]) & go[..., None, :]   # [B, Hkv, K, S]
        w = into * c[..., None, :]                                                # [B, Hkv, K, S]
        eye = one_hot_kept(idx, s)
        count = 1.0 + into.sum(-1, keepdims=True)
        wt = (eye + w) / count
        return apply_weights(old, wt, wt)
