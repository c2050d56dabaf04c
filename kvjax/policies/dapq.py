"""DapQ (arXiv 2603.11564; paper summary only): SnapKV with the observation window's queries
moved to future decoding positions (pseudo-queries), since the query's RoPE phase matters more
than its content.

The last `window` prompt queries q_i (post-RoPE, at positions n - window + i, n the next
position) become pseudo-queries at n + i: q'_i = RoPE(q_i, window) (every one shifted by
`window` positions; content reused from the window, our reading **[unverified]**: the paper's
construction of the content is not in the spec). They attend to every live slot (all are in
their past), and the scores follow SnapKV: sum over the pseudo-queries of softmax(q' k^T /
sqrt(d)), GQA mean, the window's own columns zeroed, avg-pool (kernel 5), the window kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation
from kvjax.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class DapQ(SnapKV):
    """window: prompt queries reused as pseudo-queries (= always-kept newest tokens)."""

    window: int = 32

    def pseudo_scores(self, obs: Observation) -> jax.Array:
        """[L, B, Hq, S] float32: attention of the future-position pseudo-queries, summed over them."""
        from models.rope import apply_rope
        if obs.window_queries is None:
            raise ValueError("DapQ needs the window queries (Observe(window=...))")
        q = obs.window_queries[..., -self.window:, :]                              # [L, B, Hq, w, d]
        l, b, hq, w, d = q.shape
        shift = jnp.full((l * b, w), self.window, jnp.int32)
        qf = apply_rope(q.reshape(l * b, hq, w, d).astype(jnp.float32), shift, obs.config).reshape(q.shape)
        keys = obs.cache.keys.astype(jnp.float32)                                  # [L, B, Hkv, S, d]
        g = hq // keys.shape[2]
        logits = jnp.einsum("lbhgwd,lbhsd->lbhgws", qf.reshape(l, b, -1, g, w, d), keys) / jnp.sqrt(float(d))
        live = (obs.cache.positions >= 0)[:, :, :, None, None]
        probs = jnp.where(live, jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=-1), 0.0)
        return probs.sum(axis=4).reshape(l, b, hq, -1)

    def score(self, obs: Observation) -> jax.Array:
        return self.pooled(self.pseudo_scores(obs), obs)
