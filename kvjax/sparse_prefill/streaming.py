"""Streaming heads in prefill (DuoAttention, Xiao et al. 2024, arXiv 2410.10819; LServe's static
sparsity): a streaming head attends to the first `sink` tokens and the last `local` tokens before
each query, a retrieval head to everything (dense causal blocks).

Which (layer, kv head) is streaming comes from a head pattern (DuoAttention's `pattern.json`,
1 = retrieval, 0 = streaming; `kvjax.policies.duo_attention`'s format) or, without one, every head
streams. Defaults: DuoAttention's deployment sizes sink 64 + local 256 (LServe prefill uses 128 +
4096). Blocks of `block_size` tokens: a key block is listed when it holds a sink slot or a slot
of some query's local window (`base.sink_local`), so a streaming head sees at most one block more
on each side than the token rule.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.sparse_prefill.base import Geometry, sink_local


@dataclasses.dataclass(frozen=True)
class StreamingPrefill:
    sink: int = 64
    local: int = 256
    block_size: int = 64
    pattern: Optional[tuple[tuple[int, ...], ...]] = None    # [layers][kv_heads], 1 = retrieval head

    def __post_init__(self):
        if self.sink < 0 or self.local < 1:
            raise ValueError(f"streaming prefill needs sink >= 0 and local >= 1, got sink={self.sink} "
                             f"local={self.local}")

    @classmethod
    def from_args(cls, pattern_file: Optional[str] = None, **kw) -> "StreamingPrefill":
        if pattern_file is not None:
            with open(pattern_file) as f:
                kw["pattern"] = tuple(tuple(int(x) for x in row) for row in json.load(f)["pattern"])
        return cls(**{k: int(v) if k != "pattern" else v for k, v in kw.items()})

    def select(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer, scale: float) -> jax.Array:
        """[b, hkv, nqb, nkb] bool: sink + local blocks of streaming heads, all blocks of retrieval heads."""
        mask = sink_local(geo, self.sink, self.local)
        if self.pattern is None:
            return mask
        pat = jnp.asarray(self.pattern, bool)
        if pat.shape[1] != keys.shape[1]:
            raise ValueError(f"head pattern has {pat.shape[1]} kv heads per layer, the model {keys.shape[1]}")
        retrieval = pat[layer]                                                   # [hkv]
        return mask | retrieval[None, :, None, None]
