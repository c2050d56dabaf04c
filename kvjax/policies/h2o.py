"""H2O (Zhang et al., 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent.

hh_score_j = sum over every query seen so far of softmax(q k^T / sqrt(d))_j (per query head,
summed over the GQA group), accumulated across prefill chunks and decode steps; the `recent`
newest tokens are always kept and the rest of the budget goes to the heaviest hitters.
"""
from __future__ import annotations

import dataclasses

import jax

from kvjax.policies.base import Observation, ScoringPolicy, group_reduce, newest_mask, protect


@dataclasses.dataclass(frozen=True)
class H2O(ScoringPolicy):
    """recent: newest tokens kept (the paper splits the budget 50/50 heavy/recent: 0.1 + 0.1)."""

    recent: int = 32
    reduce: str = "sum"

    accumulates = True

    def accumulate(self, obs: Observation) -> jax.Array:
        s = group_reduce(obs.column_sums, obs.cache.keys.shape[2], "mean")
        return s * (obs.column_sums.shape[2] // obs.cache.keys.shape[2]) if self.reduce == "sum" else s

    def score(self, obs: Observation) -> jax.Array:
        return protect(obs.accumulated, newest_mask(obs.cache.positions, self.recent))
