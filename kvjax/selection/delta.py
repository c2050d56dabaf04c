"""DELTA (arXiv 2510.09883; hoenza/DELTA): a few full-attention Δ-layers select the tokens that
the sparse layers after them attend to.

Layers: the first `dense_layers` (2) attend densely (plain KVCache); from there every
`delta_every`-th layer (8) is a Δ-layer, the others are sparse. A Δ-layer attends to the whole
cache and, from the same query, scores every live slot j by its full attention probability summed
over ALL query heads (the "unified head selection": one set per layer, shared by every kv head)

    S_j = sum_h softmax_j(q_h . k_j / sqrt(d))          (softmax over all live slots)

and keeps the top `budget - n_sink - n_recent` slots among the live ones that are neither the
first `n_sink` (attention sinks) nor the last `n_recent` (the stable recency window). The model's
layer loop hands that selection (`SelectiveCache.hand_over` / `receive`) to the following sparse
layers, which attend only to it plus their own sink and recency window (`sparse_decode`). The
slot layout is the same in every layer of the engine cache, so slot indices carry over. The full
KV stays on the device (as in DELTA); only the sparse layers read less.

Defaults (budget 2048, n_sink 16, n_recent 128, Δ every 8 layers after 2 dense ones) are ours:
the spec names the structure, not the numbers, and the official code was not available
**[unverified]**. `Delta.from_budget(B)` scales n_sink = min(16, B/16), n_recent = min(128, B/4).
Dense-cache only (see `wrap_layer`); no metadata (the Δ-layers read the keys they attend to).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.selection.base import SelectorBase, middle_candidates, neg_inf_topk, sink_and_local

ROLES = ("delta", "sparse")


@dataclasses.dataclass(frozen=True)
class Delta(SelectorBase):
    """budget: tokens a sparse layer attends to per kv head (n_sink + selected + n_recent);
    role: this layer's part ('delta' or 'sparse'; set per layer by `for_layer`)."""

    budget: int = 2048
    n_sink: int = 16
    n_recent: int = 128
    delta_every: int = 8
    page_size: int = 1
    interval: int = 1
    dense_layers: int = 2
    role: str = "delta"

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0 or self.n_recent < 1 or self.delta_every < 1:
            raise ValueError(f"Delta: need n_sink >= 0, n_recent >= 1, delta_every >= 1, got "
                             f"{self.n_sink}, {self.n_recent}, {self.delta_every}")
        if self.top_k < 1:
            raise ValueError(f"Delta: budget {self.budget} leaves no selected tokens after n_sink={self.n_sink} "
                             f"and n_recent={self.n_recent}")
        if self.page_size != 1:
            raise ValueError("Delta selects tokens: page_size must be 1")
        if self.role not in ROLES:
            raise ValueError(f"Delta: role must be one of {ROLES}, got {self.role!r}")

    @classmethod
    def from_budget(cls, budget: int, **kw) -> "Delta":
        kw.setdefault("n_sink", min(16, budget // 16))
        kw.setdefault("n_recent", min(128, max(budget // 4, 1)))
        return cls(budget=budget, **kw)

    @property
    def top_k(self) -> int:
        return self.budget - self.n_sink - self.n_recent

    def for_layer(self, layer: int, config=None) -> "Delta":
        """This selector with the role of `layer` (>= dense_layers)."""
        delta = (layer - self.dense_layers) % self.delta_every == 0
        return dataclasses.replace(self, role="delta" if delta else "sparse")

    # the hooks SelectiveCache and the model's layer loop read
    @property
    def dense_attention(self) -> bool:
        return self.role == "delta"

    @property
    def hands_over(self) -> bool:
        return self.role == "delta"

    @property
    def receives(self) -> bool:
        return self.role == "sparse"

    @property
    def always_fresh(self) -> bool:
        return self.role == "delta" and self.interval == 1

    def reuse(self, state, fingerprint):
        if self.role == "sparse":           # the selection is the one handed over: never rescored here
            return jnp.ones(state.age.shape, bool)
        return super().reuse(state, fingerprint)

    def n_select(self, capacity: int) -> int:
        return min(self.top_k, capacity)

    def tokens_read(self, capacity: int) -> int:
        return capacity if self.role == "delta" else min(self.budget, capacity)

    def meta_read_bytes(self, meta, kv) -> int:
        return 0

    def scores(self, kv, q) -> jax.Array:
        """S [b, capacity] float32: full attention probabilities summed over every query head."""
        b, hq, _, d = q.shape
        h = kv.keys.shape[1]
        qg = q[:, :, 0].reshape(b, h, hq // h, d).astype(jnp.float32)
        logits = jnp.einsum("bhgd,bhsd->bhgs", qg, kv.keys.astype(jnp.float32)) / jnp.sqrt(float(d))
        live = (kv.positions >= 0)[:, :, None]
        probs = jnp.where(live, jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=-1), 0.0)
        return probs.sum(axis=(1, 2))

    def select(self, meta, kv, q, query_positions):
        cand = middle_candidates(kv, self.n_sink, self.n_recent)
        s = jnp.where(jnp.any(cand, axis=1), self.scores(kv, q), -jnp.inf)
        idx, valid = neg_inf_topk(s, self.n_select(kv.capacity))             # [b, k], one set per layer
        h = kv.keys.shape[1]
        idx = jnp.broadcast_to(idx[:, None], (idx.shape[0], h, idx.shape[1]))
        return idx, valid[:, None] & jnp.take_along_axis(cand, idx, axis=-1)

    def forced(self, meta, kv):
        return sink_and_local(kv, self.n_sink, self.n_recent)
