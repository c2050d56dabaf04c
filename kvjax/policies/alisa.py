"""ALISA (Zhao, Wu, Wang, 2024, "ALISA: Accelerating Large Language Model Inference via
Sparsity-Aware KV Caching", arXiv 2403.17312, ISCA'24): Sparse Window Attention (SWA).

SWA keeps two kinds of tokens per head:
    locally static:    the newest floor(local * budget) tokens;
    globally dynamic:  the rest of the budget, by the attention weights summed over the last
                       `window` steps: score_j = sum_{i in window} softmax(q_i k^T / sqrt(d))_j
                       (mean over the GQA group), no pooling.
It is meant to run during generation (`--when decode`: the window is the last decoded queries);
after prefill the window is the prompt's last queries. No public code; the spec file has no
entry: from the paper [unverified]. Defaults: window 8 steps and an even local / global split of
the budget are our reading of the paper; its KV compression (INT8) and CPU/GPU scheduling are
system parts not reproduced here.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy, group_reduce, window_scores
from kvjax.policies.keyformer import newest_per_row


@dataclasses.dataclass(frozen=True)
class ALISA(ScoringPolicy):
    """window: steps whose attention is summed (8); local: budget share of the newest tokens (0.5)."""

    window: int = 8
    local: float = 0.5

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if not 0 <= self.local <= 1:
            raise ValueError(f"local must be a share of the budget in [0, 1], got {self.local}")

    @property
    def observe(self) -> Observe:
        return Observe(window=self.window)

    def score(self, obs: Observation) -> jax.Array:
        return group_reduce(window_scores(obs, self.window), obs.cache.positions.shape[2], "mean")

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        n_local = jnp.floor(self.local * n_keep + 1e-6).astype(jnp.int32)
        return jnp.where(newest_per_row(obs.cache.positions, n_local), jnp.inf, scores)
