"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv 2407.11550; FFY0/AdaKV `adaptive_snapkv/.../snapkv_utils.py`).

Head-adaptive budgets inside a layer, over ANY scorer (`AdaKV(scorer=ExpectedAttention())`):

    w_h   = tokens the scorer protects in head h (+inf: SnapKV's window, sinks)
    Bbase = n_keep - w_h ;  floor = int(alpha * Bbase)
    cnt_h = #{entries of head h among the top sum_h Bbase scores of the layer's unprotected slots}
    b_h   = w_h + floor + round(cnt_h * (1 - alpha)),  with the rounding remainders settled so
            that sum_h b_h = Hkv * n_keep exactly (largest fractional parts first)

Scores are compared across heads as the scorer returns them (AdaKV's `normalize` option is not
applied). As in the official code the window is outside the adaptive part; kvjax's budget n_keep
includes it (official C = Bbase + w).

Memory: after the final compression (the "prefill" schedule) the kept tokens are packed into a
`kvjax.packed.PackedCache`: the kv heads of a layer share one slot pool, so after generate's
`resize` a layer allocates sum_h b_h = Hkv * n_keep slots (+ Hkv per decode token), exactly the
bytes of a uniform cache of the same budget (+ a 2-byte head tag per slot). Selection itself runs
on a padded [.., Hkv, max_keep] gather bounded by `max_keep` (transient, under jit). With the
"chunk" / "decode" schedules the cache must be observed again, so `Compression` switches
`ragged` off and the padded layout (capacity = the largest head's bound) is kept.
Over PyramidKV (`AdaKV(scorer=PyramidKV(...))`) each layer's total is PyramidKV's layer budget,
distributed over its heads adaptively; the result is one packed pool per layer (LayerwiseCache).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.layerwise import LayerwiseCache
from kvjax.packed import pack
from kvjax.policies.base import Observation, ScoringPolicy
from kvjax.policies.snapkv import SnapKV
from kvjax.observation import Observe


def adaptive_budgets(scores: jax.Array, n_keep: jax.Array, alpha: float) -> jax.Array:
    """Per-head budgets [L, B, Hkv] summing to Hkv * n_keep per layer.

    scores [L, B, Hkv, S] (invalid slots -inf, protected slots +inf), n_keep [B] int, or the
    scorer's per-head budgets [L, B, Hkv] (e.g. PyramidKV's layer budgets: the layer total is kept).
    Protected slots (the scorer's window / sinks) are kept outside the adaptive part, as the
    official code keeps the window outside Bbase: Bbase_h = n_keep - protected_h."""
    lead = scores.shape[:2]
    hkv, s = scores.shape[2], scores.shape[3]
    prot = jnp.sum(jnp.isposinf(scores), axis=-1).astype(jnp.int32)             # [L, B, Hkv]
    n_keep = n_keep[None, :, None] if n_keep.ndim == 1 else n_keep
    bbase = jnp.maximum(n_keep - prot, 0)
    flat = jnp.where(jnp.isposinf(scores), -jnp.inf, scores).reshape(*lead, hkv * s)
    total = bbase.sum(-1)                                                       # [L, B]
    order = jnp.argsort(-flat, axis=-1, stable=True)                            # best first
    rank = jnp.argsort(order, axis=-1)                                          # rank of every entry
    chosen = (rank < total[..., None]) & (flat > -jnp.inf)
    cnt = chosen.reshape(*lead, hkv, s).sum(-1).astype(jnp.float32)             # [L, B, Hkv]
    floor = jnp.floor(alpha * bbase).astype(jnp.int32)
    # the counts sum to sum_h Bbase_h (given enough live slots): distribute what the floors leave
    share = cnt * (1.0 - alpha)
    rest = total[..., None] - floor.sum(-1, keepdims=True)
    base = jnp.floor(share + 1e-4).astype(jnp.int32)
    left = rest - base.sum(-1, keepdims=True)                                   # remainders
    frac = jnp.round((share - base) * 1e3)      # ties (equal in exact arithmetic) -> lower head first
    pos = jnp.argsort(jnp.argsort(-frac, axis=-1, stable=True), axis=-1)
    return prot + floor + base + left // hkv + (pos < left % hkv).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class AdaKV(ScoringPolicy):
    """scorer: any scoring policy (official: SnapKV window 32, kernel 7, max pooling);
    alpha: the per-head floor fraction (official config_compress 0.5; KVCache-Factory 0.2)."""

    scorer: ScoringPolicy = SnapKV(window=32, kernel=7, pool="max")
    alpha: float = 0.5
    kv_heads: int = 0  # the model's kv heads, to size the cache tightly (0: bound by the context)
    ragged: bool = True  # pack the final cache per head (False: padded to the largest head)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if isinstance(self.scorer, AdaKV):
            raise ValueError("AdaKV cannot wrap another AdaKV")

    @property
    def observe(self) -> Observe:
        return self.scorer.observe

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.scorer.accumulates

    @property
    def rerotate(self) -> bool:  # type: ignore[override]
        return self.scorer.rerotate

    def accumulate(self, obs: Observation) -> jax.Array:
        return self.scorer.accumulate(obs)

    def score(self, obs: Observation) -> jax.Array:
        return jnp.where(obs.cache.valid, self.scorer.score(obs), -jnp.inf)

    def adjust_scores(self, scores, obs, n_keep):
        return self.scorer.adjust_scores(scores, obs, n_keep)

    def head_budgets(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
        if self.kv_heads and self.kv_heads != scores.shape[2]:
            raise ValueError(f"AdaKV(kv_heads={self.kv_heads}) but the cache has {scores.shape[2]} kv heads")
        # the scorer's own allocation (uniform, or PyramidKV's per layer) sets each layer's total
        return adaptive_budgets(scores, self.scorer.head_budgets(scores, n_keep), self.alpha)

    def max_keep(self, n_keep: int, context: int) -> int:
        """Static bound on the largest head budget: floor + (1 - alpha) * min(Hkv * n_keep, context)
        (a head is picked at most Hkv * n_keep times and holds at most `context` tokens)."""
        n_keep = self.scorer.max_keep(n_keep, context)     # the largest layer's budget (PyramidKV)
        picks = context if self.kv_heads <= 0 else min(self.kv_heads * n_keep, context)
        worst = math.floor(self.alpha * n_keep) + math.ceil((1 - self.alpha) * picks) + 1
        return int(min(context, max(worst, n_keep)))

    def finalize(self, new, obs, idx):
        scorer = self.scorer
        if hasattr(scorer, "ragged"):                  # PyramidKV: per-layer caches iff we are ragged
            scorer = dataclasses.replace(scorer, ragged=self.ragged)
        new = scorer.finalize(new, obs, idx)
        if not self.ragged:
            return new
        if isinstance(new, kvcache.KVCache):
            return pack(new)
        if isinstance(new, LayerwiseCache) and all(isinstance(lc, kvcache.KVCache) for lc in new.layers):
            return dataclasses.replace(new, layers=tuple(pack(lc) for lc in new.layers))
        return new                                     # a scorer's own layout (ThinK) stays
