"""TokenSelect (arXiv 2411.02886; pzs19/TokenSelect): per-head soft-vote token selection.

Candidates are the live tokens j with n_init <= j < N - n_local (j counted from the first live
slot, N live tokens). Per query head h, s_h = softmax_j(q_h . k_j) (no 1/sqrt(d), as the Triton
kernel); S = sum_h s_h over all query heads; topk(S, top_k): one set per layer shared by every
head. Attended: [0, n_init) + topk + [N - n_local, N). The "selection cache" reuses the previous
top-k of a row while cos(q, q_prev) >= `reuse_threshold` (0.9 in the code; off = None, as in
the patched config).

Deviation: TokenSelect stores pre-RoPE keys and re-rotates the retrieved ones to contiguous
positions (length extrapolation); this cache keeps post-RoPE keys at their original positions,
so the scores are the real q.k logits and attention uses the original positions.
Defaults n_init=128, n_local=512, top_k=2048 (`config/*-token-retrieval.yaml`);
`TokenSelect.from_budget(B)` scales them for small budgets (n_init = min(128, B/8), n_local =
min(512, B/4), top_k = the rest).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.selection.base import SelectorBase, cosine_reuse, middle_candidates, neg_inf_topk, sink_and_local


@dataclasses.dataclass(frozen=True)
class TokenSelect(SelectorBase):
    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    reuse_threshold: Optional[float] = None
    budget: int = 0            # derived: n_init + top_k + n_local
    page_size: int = 1
    interval: int = 1
    dense_layers: int = 0

    def __post_init__(self):
        object.__setattr__(self, "budget", self.n_init + self.top_k + self.n_local)
        super().__post_init__()
        if self.n_init < 0 or self.n_local < 1 or self.top_k < 1:
            raise ValueError(f"TokenSelect: need n_init >= 0, n_local >= 1, top_k >= 1, got "
                             f"{self.n_init}, {self.n_local}, {self.top_k}")
        if self.page_size != 1:
            raise ValueError("TokenSelect selects tokens: page_size must be 1")
        if self.reuse_threshold is not None and not -1.0 <= self.reuse_threshold <= 1.0:
            raise ValueError(f"TokenSelect: reuse_threshold is a cosine in [-1, 1], got {self.reuse_threshold}")

    @classmethod
    def from_budget(cls, budget: int, **kw) -> "TokenSelect":
        n_init = kw.pop("n_init", min(128, budget // 8))
        n_local = kw.pop("n_local", min(512, max(budget // 4, 1)))
        top_k = budget - n_init - n_local
        if top_k < 1:
            raise ValueError(f"TokenSelect: budget {budget} leaves no top-k tokens after n_init={n_init} and "
                             f"n_local={n_local}")
        return cls(n_init=n_init, n_local=n_local, top_k=top_k, **kw)

    @property
    def always_fresh(self) -> bool:
        return self.reuse_threshold is None and self.interval == 1

    def reuse(self, state, fingerprint):
        if self.reuse_threshold is None:
            return super().reuse(state, fingerprint)
        return cosine_reuse(state, fingerprint, self.reuse_threshold)

    def n_select(self, capacity: int) -> int:
        return min(self.top_k, capacity)

    def meta_read_bytes(self, meta, kv) -> int:
        """Scoring reads every key once per (re)selection."""
        return int(kv.keys.size * kv.keys.dtype.itemsize)

    def candidates(self, kv) -> jax.Array:
        """[b, h, capacity] bool: live slots in [start + n_init, lengths - n_local)."""
        return middle_candidates(kv, self.n_init, self.n_local)

    def votes(self, kv, q) -> jax.Array:
        """S [b, capacity] = sum over query heads of softmax over candidates (float32; -inf: none)."""
        b, hq, _, d = q.shape
        h = kv.keys.shape[1]
        qg = q[:, :, 0].reshape(b, h, hq // h, d).astype(jnp.float32)
        logits = jnp.einsum("bhgd,bhsd->bhgs", qg, kv.keys.astype(jnp.float32))
        cand = self.candidates(kv)[:, :, None]
        probs = jax.nn.softmax(jnp.where(cand, logits, -jnp.inf), axis=-1)
        probs = jnp.where(cand, probs, 0.0)
        s = probs.sum(axis=(1, 2))
        return jnp.where(jnp.any(cand, axis=(1, 2)), s, -jnp.inf)

    def select(self, meta, kv, q, query_positions):
        s = self.votes(kv, q)
        idx, valid = neg_inf_topk(s, self.n_select(kv.capacity))           # [b, k], one set per layer
        h = kv.keys.shape[1]
        idx = jnp.broadcast_to(idx[:, None], (idx.shape[0], h, idx.shape[1]))
        cand = jnp.take_along_axis(self.candidates(kv), idx, axis=-1)
        return idx, valid[:, None] & cand

    def forced(self, meta, kv):
        """The first n_init and the last n_local live tokens (no overlap, none twice)."""
        return sink_and_local(kv, self.n_init, self.n_local)
