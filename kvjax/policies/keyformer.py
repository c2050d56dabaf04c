"""Keyformer (Adnan et al., MLSys 2024, "Keyformer: KV Cache Reduction through Key Tokens Selection
for Efficient Generative Inference", arXiv 2403.09054; d-matrix-ai/keyformer-llm
`models/gptj-keyformer-lib/modeling_gptj.py::_attn`).

Accumulated Gumbel-softmax attention: with raw logits x = q k^T / sqrt(d) (causal mask),

    g = softmax((x + zeta) / tau),   zeta ~ Gumbel(0, 1),   tau = tau_init + t * tau_delta
    score_j += sum_{queries} g[., j]            (per head; GQA: summed over the group, as H2O)

t is 0 for the prompt (the reference resets it there). Selection keeps the newest
`int(recent * n_keep)` tokens plus the top-scoring rest (reference: recent=30% of the kept
`kv_cache`=60% of the prompt, i.e. use Budget(ratio=0.6) for the paper's operating point).
The logits are recomputed from the observed pre-RoPE queries and the cached post-RoPE keys
(the model is unchanged; cost O(T * S) per head, like the attention itself). Layer l's noise is
drawn from `fold_in(fold_in(key(seed, impl="rbg"), newest position), l)` (`layer_noise`): one
independent draw per layer, as every attention layer of the reference draws its own, and the same
whether the forward scores the layer alone (inside its layer loop) or a test scores a stack of
layers; deterministic given the seed (on one backend; rbg compiles far faster than threefry).
Keys stay post-RoPE at their original positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy, group_reduce
from kvjax.policies.expected_attention import new_token_positions
from kvjax.observation import Observe
from models.rope import apply_rope


def layer_noise(key: jax.Array, first_layer, shape: tuple[int, ...]) -> jax.Array:
    """Gumbel(0, 1) noise `shape` = [n, ...] for layers first_layer .. first_layer + n - 1: layer l's
    slice is drawn from `fold_in(key, l)` (first_layer may be traced: the forward's layer index).
    A loop, not vmap: rbg bits drawn under vmap differ from the same draw made alone."""
    return jnp.stack([jax.random.gumbel(jax.random.fold_in(key, first_layer + i), shape[1:], jnp.float32)
                      for i in range(shape[0])])


def gumbel_logits_scores(obs: Observation, key: jax.Array, tau: float) -> jax.Array:
    """sum over the forward's queries of softmax((x + zeta) / tau) over the cache: [L, B, Hq, S].

    x = q k^T / sqrt(d) with q the post-RoPE queries (rotated here from obs.q_pre at their
    positions) and k the cache's post-RoPE keys; causal/empty slots are masked out. zeta: each
    layer's own noise (`layer_noise` from `key` and obs.layer)."""
    cache = obs.cache
    n_layers, b, hq, t, d = obs.q_pre.shape
    hkv = cache.keys.shape[2]
    qpos = new_token_positions(obs, t)                                   # [L, B, T]
    q = jax.vmap(lambda x, p: apply_rope(x, p, obs.config))(obs.q_pre, qpos).astype(jnp.float32)
    q = q.reshape(n_layers, b, hkv, hq // hkv, t, d)
    x = jnp.einsum("lbhgtd,lbhsd->lbhgts", q, cache.keys.astype(jnp.float32)) / jnp.sqrt(d)
    live = ((cache.positions[:, :, :, None, None, :] >= 0)
            & (cache.positions[:, :, :, None, None, :] <= qpos[:, :, None, None, :, None]))
    zeta = layer_noise(key, obs.layer, x.shape)
    g = jax.nn.softmax(jnp.where(live, (x + zeta) / tau, -jnp.inf), axis=-1)
    g = jnp.where(live, g, 0.0)                                          # padding queries see nothing
    return g.sum(-2).reshape(n_layers, b, hq, -1)


def newest_per_row(positions: jax.Array, n: jax.Array) -> jax.Array:
    """[L, B, Hkv, S] bool: slot holds one of the `n[b]` newest positions of its head."""
    latest = positions.max(-1, keepdims=True)
    return (positions >= 0) & (positions > latest - n[None, :, None, None])


@dataclasses.dataclass(frozen=True)
class Keyformer(ScoringPolicy):
    """Reference config.json: recent=30 (% of kept), tau_init=1.0, tau_delta=0.01, kv_cache=60 (%,
    give it as the Compression budget); seed: the Gumbel noise seed."""

    recent: float = 0.3
    tau_init: float = 1.0
    tau_delta: float = 0.01
    seed: int = 0

    accumulates = True

    def __post_init__(self):
        if not 0 <= self.recent <= 1:
            raise ValueError(f"recent must be a fraction of the kept tokens in [0, 1], got {self.recent}")
        if self.tau_init <= 0 or self.tau_delta < 0:
            raise ValueError(f"need tau_init > 0 and tau_delta >= 0, got {self.tau_init}, {self.tau_delta}")

    @property
    def observe(self) -> Observe:
        return Observe(qkv=True)

    def tau(self, step: int) -> float:
        return self.tau_init + step * self.tau_delta

    def accumulate(self, obs: Observation) -> jax.Array:
        if obs.q_pre is None:
            raise ValueError("Keyformer needs the pre-RoPE queries of the forward (Observe(qkv=True))")
        if obs.q_pre.shape[3] == 1:
            raise ValueError("Keyformer's temperature schedule needs the decode step, which a decode-time "
                             "accumulation does not see: use Compression(when='prefill' or 'chunk')")
        key = jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), jnp.max(obs.cache.positions))
        g = gumbel_logits_scores(obs, key, self.tau(0))                      # [L, B, Hq, S]
        hkv = obs.cache.keys.shape[2]
        return group_reduce(g, hkv, "mean") * (g.shape[2] // hkv)          # group sum

    def score(self, obs: Observation) -> jax.Array:
        if obs.accumulated is None:
            raise ValueError("Keyformer scores are accumulated: run it through a Compression")
        return obs.accumulated

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        n_recent = jnp.floor(self.recent * n_keep + 1e-6).astype(jnp.int32)  # int(req * recent / 100)
        return jnp.where(newest_per_row(obs.cache.positions, n_recent), jnp.inf, scores)
