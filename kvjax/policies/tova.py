"""TOVA (Oren et al., 2024, arXiv 2401.06104): token omission via attention of the last query.

score_j = mean over ALL query heads of the last query's attention to j; one index set shared by
every kv-head of a layer (as in the reference `TOVACache.reduce`); the last token is always kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy, newest_mask, protect, window_scores
from kvjax.observation import Observe


@dataclasses.dataclass(frozen=True)
class TOVA(ScoringPolicy):
    @property
    def observe(self) -> Observe:
        return Observe(window=1)

    def score(self, obs: Observation) -> jax.Array:
        s = window_scores(obs, 1).mean(axis=2, keepdims=True)            # [L, B, 1, S]
        s = jnp.broadcast_to(s, obs.cache.positions.shape)
        return protect(s, newest_mask(obs.cache.positions, 1))
