"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + a recent window.

Keeps the first `n_sink` tokens and the most recent ones (as many as the budget allows).
`rerotate=True` gives the paper's pos-shift regime: kept keys are re-rotated to contiguous
in-cache positions and new tokens continue from there; False is kvpress's original-position variant.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy, oldest_mask, protect


@dataclasses.dataclass(frozen=True)
class StreamingLLM(ScoringPolicy):
    n_sink: int = 4
    rerotate: bool = False

    def score(self, obs: Observation) -> jax.Array:
        pos = obs.cache.positions.astype(jnp.float32)   # newer = higher score
        return protect(pos, oldest_mask(obs.cache.positions, self.n_sink))
