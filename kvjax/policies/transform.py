"""Cache transforms: policies that rewrite the whole prompt cache once, after prefill, keeping every
token (MiniCache's cross-layer merge, KV-head merging). Their memory is set by the transform, not
by a token budget: the budget must be 100% of the context, and `kvjax.generate.plan_cache` runs
them even though such a budget evicts nothing (`transforms_cache`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.policies.base import Observation, ScoringPolicy


@dataclasses.dataclass(frozen=True)
class CacheTransform(ScoringPolicy):
    """Base class: every token is kept (scores 0), `finalize` builds the transformed layout."""

    prefill_only = True      # one transform after prefill: the new layout is not compressed again
    transforms_cache = True  # runs at a 100% budget (kvjax.generate.plan_cache)

    def score(self, obs: Observation) -> jax.Array:
        if not isinstance(obs.cache, kvcache.KVCache):
            raise ValueError(f"{type(self).__name__} transforms the cache once, after prefill (Compression "
                             f"when='prefill'); its cache cannot be compressed again")
        return jnp.zeros(obs.cache.positions.shape, jnp.float32)

    def max_keep(self, n_keep: int, context: int) -> int:
        if np.any(np.asarray(n_keep) < context):
            raise ValueError(f"{type(self).__name__} keeps every token (its size is set by the transform), so the "
                             f"budget must be 100% of the context ({context}), got {int(np.min(n_keep))} tokens")
        return context
