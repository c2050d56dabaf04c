"""When and how much a policy compresses: the `Compression` spec used by generate and eval.

    Compression(policy=SnapKV(), budget=Budget(ratio=0.25))               # once, after prefill
    Compression(policy=KNorm(), budget=Budget(tokens=512), when="chunk")   # after every prefill chunk
    Compression(policy=KNorm(), budget=Budget(tokens=512), when="decode", interval=64)

- "prefill": the whole prompt is prefilled, then the cache is compressed once to the budget
  (query-aware when the prompt ends with the question). Peak memory: the full prompt.
- "chunk": after every prefill chunk the cache is compressed back to the budget, so peak memory
  is budget + chunk (Locret-style chunked prefill with eviction).
- "decode": after prefill the cache is compressed to the budget, then every time `interval` new
  tokens have filled the room above it, it is compressed back (kvpress's DecodingPress).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.policies.base import Budget, Observation, ScoringPolicy, compress
from models.config import ModelConfig
from models.llama import Observe

WHEN = ("prefill", "chunk", "decode")


@dataclasses.dataclass(frozen=True)
class Compression:
    policy: ScoringPolicy
    budget: Budget
    when: str = "prefill"
    interval: int = 64

    def __post_init__(self):
        if self.when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {self.when!r}")
        if self.interval <= 0:
            raise ValueError(f"interval must be positive, got {self.interval}")

    @property
    def observe(self) -> Observe:
        """What the forward must return: the policy's needs (+ column sums to accumulate)."""
        o = self.policy.observe
        if self.policy.accumulates and not o.column_sums:
            o = dataclasses.replace(o, column_sums=True)
        return o

    @property
    def decode_observe(self) -> Observe:
        """Observation during decode: at most the one new query."""
        o = self.observe
        return dataclasses.replace(o, window=min(o.window, 1), qkv=o.qkv)

    def __str__(self):
        return f"{type(self.policy).__name__}@{self.budget}/{self.when}"


@functools.partial(jax.jit, static_argnames=("policy", "config", "capacity", "max_keep"))
def compress_cache(policy: ScoringPolicy, config: ModelConfig, cache, obs: dict, n_keep: jax.Array,
                   capacity: int, max_keep: int, state: Optional[jax.Array] = None):
    """Jitted `policies.base.compress` from a forward's observation dict."""
    observation = Observation.from_forward(cache, config, obs, accumulated=state)
    return compress(policy, observation, n_keep, capacity, max_keep, state)


def accumulate(policy: ScoringPolicy, config: ModelConfig, cache, obs: dict, state):
    """Add the policy's per-slot increment to the running state (no-op for other policies)."""
    if not policy.accumulates:
        return state
    return state + policy.accumulate(Observation.from_forward(cache, config, obs, accumulated=state))
