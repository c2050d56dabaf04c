"""CaM (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference";
KVCache-Factory `CAMKVCluster`): evict, then merge each evicted token's VALUE into the following
kept tokens with a probability given by its attention.

Selection is SnapKV's (observation-window attention, pooled; the window always kept; KVCache-Factory
defaults window 32, kernel 5, avg pooling). Then, per head, for every evicted token e:

    p_e    = clip(A_e / max_{r kept} A_r, 0, 1)           A: the selection score (window attention)
    m_e    ~ Bernoulli(p_e)                               (or m_e = p_e with stochastic=False)
    v_r   += m_e * v_e / M   for the M kept tokens r that follow e (M = merge_budget, default window)

Keys are not changed. In CaM's streaming setting the M tokens after an evicted one are the recent
window (all kept); with a top-k kept set they are the next M kept slots in token order. Evicted
tokens receive nothing, so merges do not cascade through them.
The divisor is a max, as in KVCache-Factory's `CAMKVCluster` (checked: `mean_attn = torch.max(cat(
attn_score[:, :start_budget], attn_score[:, -recent_budget:]))`, the max over the sink (first 10%)
and recent tokens' mean window attention). The round before used the mean over kept tokens, which
made p_e ~ 1 for most evicted tokens and added their full value mass (SmolLM2 KL 0.623 vs SnapKV
0.134 at 25%). Here the window's own tokens are protected (+inf, no finite score), so the max runs
over the kept scored tokens (the heavy hitters, sinks included when kept): every evicted token
scores below it, p_e in [0, 1]. Like the reference, merged values are not renormalised.
The Bernoulli draws use `jax.random.fold_in(PRNGKey(seed), layer)` ([B, Hkv, S] uniforms):
deterministic, different per layer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.policies.merging import apply_weights, evicted_mask, kept_mask, one_hot_kept
from kvjax.policies.snapkv import SnapKV


def merge_draws(seed: int, layer: int, shape) -> jax.Array:
    """The uniforms [B, Hkv, S] of layer `layer`'s Bernoulli merge decisions (m_e = u_e < p_e)."""
    return jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), layer), shape)


@dataclasses.dataclass(frozen=True)
class CAM(SnapKV):
    """window 32, kernel 5, avg (KVCache-Factory); merge_budget M (0 = window); stochastic:
    Bernoulli merge decisions (CaM) or their expectation p_e."""

    window: int = 32
    merge_budget: int = 0
    stochastic: bool = True
    seed: int = 0

    merges = True

    def __post_init__(self):
        super().__post_init__()
        if self.merge_budget < 0:
            raise ValueError(f"merge_budget must be >= 0 (0 = the window), got {self.merge_budget}")

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        s = old.capacity
        m = self.merge_budget or self.window
        kept = kept_mask(idx, s)
        ev = evicted_mask(old, idx)
        finite = kept & jnp.isfinite(scores)
        top = jnp.max(jnp.where(finite, scores, 0.0), -1)                       # [B, Hkv] max kept score
        p = jnp.clip(jnp.where(ev, scores, 0.0) / jnp.maximum(top[..., None], 1e-30), 0.0, 1.0)
        if self.stochastic:
            p = (merge_draws(self.seed, layer, p.shape) < p).astype(jnp.float32)
        p = jnp.where(ev, p, 0.0)
        # kept-rank of the first kept slot after each slot: number of kept slots before it
        rank = jnp.cumsum(kept, -1) - kept                                        # [B, Hkv, S]
        j = jnp.arange(idx.shape[-1])[:, None]                                    # kept row j
        into = (j >= rank[..., None, :]) & (j < rank[..., None, :] + m)          # [B, Hkv, K, S]
        into &= (idx >= 0)[..., None]
        eye = one_hot_kept(idx, s)
        wv = eye + jnp.where(into, p[..., None, :] / m, 0.0)
        return apply_weights(old, eye, wv)
