"""KNorm (Devoto et al., 2024, arXiv 2406.11430): keep the keys with the smallest L2 norm."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy


@dataclasses.dataclass(frozen=True)
class KNorm(ScoringPolicy):
    """score = -||k||_2 per kv-head, in float32 so low-precision caches do not tie.
    (RoPE preserves norms, so post-RoPE keys give the same score.)"""

    def score(self, obs: Observation) -> jax.Array:
        return -jnp.linalg.norm(obs.cache.keys.astype(jnp.float32), axis=-1)
