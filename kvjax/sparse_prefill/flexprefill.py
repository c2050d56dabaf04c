"""FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766; bytedance/FlexPrefill
`flex_prefill/ops/flex_prefill_attention.py::get_active_blocks`), per query head:

1. Q^ = the chunk's last b queries (b = block_size = 128) scaled by 1/sqrt(D); A = softmax(Q^ K^T)
   over the live causal keys. vertical = mean of A over the b queries [S]; slash[o] = sum of A
   along the diagonal query slot - key slot = o, / b.
2. Budgets: the minimal number of top tokens whose sorted cumulative mass reaches gamma,
   converted to blocks by `// 128 + 1` (128 hard-coded as in the official code) and clamped to
   [min_budget // b, max_budget // b].
3. Pattern: avg_qk = softmax(mean(Q^) . meanpool_b(K)^T) over key blocks vs the block-summed
   vertical profile; D = sqrt(JS) = sqrt(KL(p||m)/2 + KL(q||m)/2), m = (p + q)/2. D < tau: the head is
   query-aware (its vertical / slash budgets become min_budget // b), else vertical-slash.
4. Vertical-slash blocks: top key blocks by block-summed vertical (first block forced) at every
   query block, plus the top block diagonals by block-summed slash (main diagonal forced; a chunk
   whose offset is not a multiple of b also gets diagonal -1, the rest of its queries' own block).
5. Query-aware heads add: block attention softmax(meanpool(Q_blk) . meanpool(K_blk)^T / sqrt(D))
   over causal blocks (every row sums to 1), blocks sorted globally, kept while the cumulative
   sum <= gamma * (number of query blocks).
A context (live slots the chunk sees) of at most max(2b, min_budget) tokens is attended densely.

Defaults: README gamma 0.9, tau 0.1, min_budget 512, b 128 (RULER scripts: gamma 0.95, min_budget
1024). GQA: the query heads' masks are unioned per kv head (the kernel shares one list).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.sparse_prefill.base import (Geometry, cover_count, from_columns, from_diagonals, last_query_probs,
                                       pool_keys, pool_queries, repeat_heads, slash_profile, top_mask)

OFFICIAL_BUDGET_DIVISOR = 128


@dataclasses.dataclass(frozen=True)
class FlexPrefill:
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    max_budget: Optional[int] = None
    block_size: int = 128

    def __post_init__(self):
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"FlexPrefill gamma must be in (0, 1], got {self.gamma}")
        if self.tau < 0:
            raise ValueError(f"FlexPrefill tau must be >= 0, got {self.tau}")
        if self.min_budget < 1 or (self.max_budget is not None and self.max_budget < self.min_budget):
            raise ValueError(f"FlexPrefill needs 1 <= min_budget <= max_budget, got {self.min_budget}, "
                             f"{self.max_budget}")

    @classmethod
    def from_args(cls, **kw) -> "FlexPrefill":
        conv = {"gamma": float, "tau": float, "min_budget": int, "max_budget": int, "block_size": int}
        return cls(**{k: conv[k](v) if k in conv else v for k, v in kw.items()})

    def select(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer, scale: float) -> jax.Array:
        """[b, hq, nqb, nkb] bool block mask per query head."""
        b, hq, t, d = q.shape
        g = hq // keys.shape[1]
        bs, nkb, nqb, s = geo.block_size, geo.nkb, geo.nqb, keys.shape[2]
        probs, qs = last_query_probs(q, keys, geo, bs, scale)                  # [b, hq, n, S]
        n = probs.shape[2]
        vertical = probs.mean(-2)                                                # [b, hq, S]
        slash = slash_profile(probs, qs) / n
        lo = self.min_budget // bs
        hi = nkb if self.max_budget is None else self.max_budget // bs
        budget = lambda x: jnp.clip(cover_count(x, self.gamma) // OFFICIAL_BUDGET_DIVISOR + 1, lo, hi)
        n_v, n_s = budget(vertical), budget(slash)
        v_blk = _block_sum(vertical, bs, nkb)                                    # [b, hq, nkb]
        s_blk = _block_sum(slash, bs, nkb)                                       # diagonal d: offsets [d*bs, (d+1)*bs)
        # pattern decision
        kp = repeat_heads(pool_keys(keys, geo), g)                               # [b, hq, nkb, d]
        q_hat = (q[:, :, t - n:].astype(jnp.float32) * scale).mean(2)            # [b, hq, d]
        j = jnp.arange(nkb, dtype=jnp.int32)
        st = repeat_heads(geo.starts, g)[..., None]
        last = qs[..., -1:]
        seen = (j * bs <= last) & ((j + 1) * bs - 1 >= st)                       # blocks the last query sees
        avg_qk = jax.nn.softmax(jnp.where(seen, jnp.einsum("bhd,bhkd->bhk", q_hat, kp), -jnp.inf), axis=-1)
        query_aware = js_distance(avg_qk, v_blk) < self.tau                      # [b, hq]
        n_v = jnp.where(query_aware, lo, n_v)
        n_s = jnp.where(query_aware, lo, n_s)
        first = st // bs                                                         # first live block
        cols = top_mask(jnp.where(j == first, jnp.inf, v_blk), n_v)
        diags = top_mask(jnp.where(j == 0, jnp.inf, s_blk), n_s)                # diagonals 0 .. nkb-1
        # index d + 1; diagonal -1 (reached by the query blocks of an unaligned chunk) goes with the forced 0
        diags = jnp.concatenate([diags[..., :1], diags], axis=-1)
        vs = from_columns(cols, geo) | from_diagonals(diags, geo)
        qa = self._query_aware_blocks(q, kp, geo, g, scale)
        mask = jnp.where(query_aware[..., None, None], vs | qa, vs)
        dense = repeat_heads(geo.lengths - geo.starts, g) <= max(2 * bs, self.min_budget)
        return mask | dense[..., None, None]

    def _query_aware_blocks(self, q, kp, geo: Geometry, g: int, scale: float) -> jax.Array:
        qp = pool_queries(q, geo.block_size)                                     # [b, hq, nqb, d]
        live = repeat_heads(geo.live_blocks(), g)                               # causal blocks
        logits = jnp.einsum("bhid,bhjd->bhij", qp, kp) * scale
        att = jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=-1)
        att = jnp.where(live, att, 0.0)
        b, hq, nqb, nkb = att.shape
        flat = att.reshape(b, hq, nqb * nkb)
        order = jnp.argsort(-flat, axis=-1, stable=True)
        cum = jnp.cumsum(jnp.take_along_axis(flat, order, axis=-1), axis=-1)
        keep_sorted = cum <= self.gamma * nqb
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(b)[:, None, None], jnp.arange(hq)[None, :, None],
                                              order].set(keep_sorted)
        return keep.reshape(b, hq, nqb, nkb) & live


def _block_sum(x: jax.Array, bs: int, nkb: int) -> jax.Array:
    """[b, h, S] -> [b, h, nkb] sums over blocks of bs entries."""
    b, h, s = x.shape
    return jnp.pad(x, ((0, 0), (0, 0), (0, nkb * bs - s))).reshape(b, h, nkb, bs).sum(-1)


def js_distance(p: jax.Array, q: jax.Array) -> jax.Array:
    """sqrt(KL(p||m)/2 + KL(q||m)/2), m = (p+q)/2, over the last axis (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    kl = lambda a: jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.where(a > 0, a, 1.0)) - jnp.log(jnp.where(a > 0, m, 1.0))),
                                     0.0), axis=-1)
    return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))
