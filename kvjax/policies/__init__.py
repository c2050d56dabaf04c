"""Compression policies: one module per method, selectable by name.

    from kvjax.policies import make_policy
    policy = make_policy("snapkv", window=32)
"""
from __future__ import annotations

from kvjax.policies.base import Budget, Observation, ScoringPolicy
from kvjax.policies.h2o import H2O
from kvjax.policies.knorm import KNorm
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.tova import TOVA

POLICIES: dict[str, type] = {
    "snapkv": SnapKV,
    "streaming_llm": StreamingLLM,
    "knorm": KNorm,
    "h2o": H2O,
    "tova": TOVA,
}


def make_policy(name: str, **kwargs) -> ScoringPolicy:
    """Instantiate a policy by registry name with hyperparameter overrides."""
    key = name.lower().replace("-", "_")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[key](**kwargs)


__all__ = ["Budget", "Observation", "ScoringPolicy", "POLICIES", "make_policy"]
