"""ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018;
SalesforceAIResearch/ThinK `ThinK_flash/src/kv_pruning_utils.py::key_pruner_query_driven`).

Key-channel pruning on top of token eviction (SnapKV by default, as in the official scripts).
Per kv-head, channel c is scored from the last `query_window` post-RoPE queries and the kept keys

    score_c = mean_t Q[t, c]^2 * mean_s K[s, c]^2          (query term: GQA mean over the group)

the greedy minimiser of ||Q K^T - Q S (K S)^T||_F. The `floor(pruning_ratio * d)` lowest channels
are removed from every kept token except the newest `recent_size`, which stay full width (as do
all tokens appended during decode). Pruning is REAL: the returned `ThinKCache` stores the pruned
keys with `d - floor(ratio * d)` channels plus the kept channel indices per head; in `attend`
the queries are gathered onto those channels (the softmax scale stays 1/sqrt(d)).
Memory of the keys of pruned tokens shrinks by `ratio` (keys+values by ratio/2).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import NEG_INF, attention_mask
from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy
from kvjax.policies.snapkv import SnapKV


def attend_logits(logits: jax.Array, mask: jax.Array, values: jax.Array, observe: Observe,
                  dtype) -> tuple[jax.Array, dict]:
    """Softmax attention from precomputed scaled logits (shared by ThinK and RazorAttention).

    logits [B, Hkv, G, T, S] float32, mask [B, Hkv, 1, T, S] bool, values [B, Hkv, S, dv]
    -> out [B, Hq, T, dv] and the observations `observe` asks for (as kvjax.attention.attend)."""
    b, hkv, g, t, s = logits.shape
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bhgts,bhsv->bhgtv", probs, values.astype(jnp.float32))
    out = out.reshape(b, hkv * g, t, -1).astype(dtype)
    obs = {}
    if observe.window:
        w = min(observe.window, t)
        obs["window_probs"] = probs[:, :, :, t - w:].reshape(b, hkv * g, w, s)
    if observe.column_sums:
        obs["column_sums"] = probs.sum(axis=3).reshape(b, hkv * g, s)
    return out, obs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ThinKCache(kvcache.OlderRecent):
    """A cache whose older keys have fewer channels (stacked over layers, or one layer's slice).

    keys       [L, B, Hkv, Sp, dk]   pruned keys (post-RoPE), kept channels only
    channels   [L, B, Hkv, dk]       int32 kept channel indices per head (sorted)
    values     [L, B, Hkv, Sp, dv]
    pruned_positions [L, B, Hkv, Sp] int32 (-1 = empty)
    recent     KVCache [L, B, Hkv, Sr, d]: full-width keys (newest tokens and decode tokens)
    """

    keys: jax.Array
    channels: jax.Array
    values: jax.Array
    pruned_positions: jax.Array
    recent: kvcache.KVCache

    @property
    def old_positions(self) -> jax.Array:
        """The pruned part's slot positions (`kvcache.OlderRecent`: positions are pruned part first)."""
        return self.pruned_positions

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d]; pruned keys see q gathered onto their kept channels."""
        b, hq, t, d = q.shape
        hkv = self.keys.shape[1]
        g = hq // hkv
        scale = d ** -0.5
        qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
        idx = jnp.broadcast_to(self.channels[:, :, None, None, :], (b, hkv, g, t, self.channels.shape[-1]))
        q_kept = jnp.take_along_axis(qg, idx, axis=-1)                     # [B, Hkv, G, T, dk]
        lp = jnp.einsum("bhgtc,bhsc->bhgts", q_kept, self.keys.astype(jnp.float32))
        lr = jnp.einsum("bhgtd,bhsd->bhgts", qg, self.recent.keys.astype(jnp.float32))
        logits = jnp.concatenate([lp, lr], axis=-1) * scale
        mask = attention_mask(self.positions, query_positions)[:, :, None]
        values = jnp.concatenate([self.values, self.recent.values.astype(self.values.dtype)], axis=-2)
        return attend_logits(logits, mask, values, observe, q.dtype)

    def resize(self, capacity: int) -> "ThinKCache":
        """Total slots = pruned part + recent part; only the recent (full-width) part changes."""
        room = capacity - self.keys.shape[-2]
        if room < 1:
            raise ValueError(f"ThinK cache needs more than its {self.keys.shape[-2]} pruned slots, got {capacity}")
        return dataclasses.replace(self, recent=kvcache.resize(self.recent, room))


def channel_scores(window_queries: jax.Array, keys: jax.Array, valid: jax.Array, kv_heads: int) -> jax.Array:
    """score_c = mean_t q[t,c]^2 (GQA mean) * mean_s k[s,c]^2 over live slots: [L, B, Hkv, d].

    window_queries [L, B, Hq, w, d]; keys [L, B, Hkv, S, d]; valid [L, B, Hkv, S]."""
    q2 = jnp.mean(jnp.square(window_queries.astype(jnp.float32)), axis=-2)     # [L, B, Hq, d]
    lead = q2.shape[:2]
    q2 = q2.reshape(*lead, kv_heads, -1, q2.shape[-1]).mean(-2)
    m = valid[..., None].astype(jnp.float32)
    k2 = jnp.sum(jnp.square(keys.astype(jnp.float32)) * m, axis=-2) / jnp.maximum(m.sum(-2), 1.0)
    return q2 * k2


def kept_channels(scores: jax.Array, n_pruned: int) -> jax.Array:
    """Sorted indices of the `d - n_pruned` highest-scoring channels: [..., d - n_pruned] int32."""
    d = scores.shape[-1]
    _, idx = jax.lax.top_k(scores, d - n_pruned)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def split_recent(new: kvcache.KVCache, recent_size: int) -> tuple[jax.Array, jax.Array, int]:
    """Per head, slot indices of the older part [.., Sp] and the newest `recent_size` part [.., R]
    of a gathered cache whose live slots are [0, length) in chronological order (-1 = none)."""
    cap = new.capacity
    length = new.lengths[..., None]
    n_old = jnp.maximum(length - recent_size, 0)
    sp = max(cap - recent_size, 0)
    old = jnp.arange(sp)
    old = jnp.where(old < n_old, old, -1)
    rec = n_old + jnp.arange(recent_size)
    rec = jnp.where(rec < length, rec, -1)
    return old.astype(jnp.int32), rec.astype(jnp.int32), sp


def _take(x: jax.Array, idx: jax.Array, fill) -> jax.Array:
    """Gather slots along axis -2 (or -1 for positions) with -1 -> fill."""
    safe = jnp.clip(idx, 0, None)
    if x.ndim == idx.ndim:
        return jnp.where(idx >= 0, jnp.take_along_axis(x, safe, axis=-1), fill)
    return jnp.where(idx[..., None] >= 0, jnp.take_along_axis(x, safe[..., None], axis=-2), fill)


@dataclasses.dataclass(frozen=True)
class ThinK(ScoringPolicy):
    """pruning_ratio: fraction of key channels removed (paper's lambda, official 0.4);
    recent_size: newest tokens kept full width (32); query_window: queries scoring channels (32);
    token_policy: the token eviction it is combined with (official scripts: SnapKV, window 32)."""

    pruning_ratio: float = 0.4
    recent_size: int = 32
    query_window: int = 32
    token_policy: ScoringPolicy = SnapKV(window=32, kernel=5, pool="avg")

    def __post_init__(self):
        if not 0 <= self.pruning_ratio < 1:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        if self.recent_size < 0 or self.query_window <= 0:
            raise ValueError(f"recent_size must be >= 0 and query_window > 0, got "
                             f"{self.recent_size}, {self.query_window}")
        if isinstance(self.token_policy, ThinK):
            raise ValueError("ThinK cannot wrap another ThinK")

    @property
    def observe(self) -> Observe:
        o = self.token_policy.observe
        return dataclasses.replace(o, window=max(o.window, self.query_window))

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.token_policy.accumulates

    def accumulate(self, obs: Observation) -> jax.Array:
        return self.token_policy.accumulate(obs)

    def score(self, obs: Observation) -> jax.Array:
        if not isinstance(obs.cache, kvcache.KVCache):
            raise ValueError("ThinK prunes key channels once, after prefill (Compression when='prefill'); "
                             "a ThinK cache cannot be compressed again")
        return self.token_policy.score(obs)

    def adjust_scores(self, scores, obs, n_keep):
        return self.token_policy.adjust_scores(scores, obs, n_keep)

    def head_budgets(self, scores, n_keep):
        return self.token_policy.head_budgets(scores, n_keep)

    def max_keep(self, n_keep: int, context: int) -> int:
        return self.token_policy.max_keep(n_keep, context)

    def n_pruned(self, head_dim: int) -> int:
        return int(np.floor(self.pruning_ratio * head_dim))

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> ThinKCache:
        if obs.window_queries is None:
            raise ValueError("ThinK needs the window queries (Observe(window=...))")
        tp = self.token_policy
        if getattr(tp, "ragged", False):   # channel pruning needs the stacked per-head layout
            tp = dataclasses.replace(tp, ragged=False)
        new = tp.finalize(new, obs, idx)
        hkv, d = new.keys.shape[2], new.keys.shape[-1]
        q = obs.window_queries[..., -self.query_window:, :]
        chans = kept_channels(channel_scores(q, new.keys, new.valid, hkv), self.n_pruned(d))
        old, rec, _ = split_recent(new, self.recent_size)
        lead = new.lengths.shape
        old = jnp.broadcast_to(old, lead + old.shape[-1:])
        keys_old = _take(new.keys, old, 0.0)
        keys_old = jnp.take_along_axis(keys_old, chans[..., None, :], axis=-1)   # [.., Sp, dk]
        recent = kvcache.KVCache(keys=_take(new.keys, rec, 0.0), values=_take(new.values, rec, 0.0),
                                 positions=_take(new.positions, rec, -1),
                                 lengths=jnp.sum(rec >= 0, axis=-1).astype(jnp.int32))
        return ThinKCache(keys=keys_old, channels=chans, values=_take(new.values, old, 0.0),
                          pruned_positions=_take(new.positions, old, -1), recent=recent)
