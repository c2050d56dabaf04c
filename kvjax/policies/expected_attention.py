"""ExpectedAttention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", arXiv 2510.00636; NVIDIA kvpress
`expected_attention_press.py`).

Future queries are modelled as a Gaussian fitted to the prompt's pre-RoPE queries (the first
`n_sink` tokens excluded), moved to the future by the RoPE rotation averaged over the next
`n_future_positions` positions:

    mu = mean_t q_t,  Sigma = (1/T) sum_t (q_t - mu)(q_t - mu)^T                 per query head
    Rbar = mean_{p = n .. n+F-1} (cos_p I + sin_p P)      (P = rotate_half as a matrix)
    mu' = Rbar mu,  Sigma' = Rbar Sigma Rbar^T
    z_j = k_j . mu' / sqrt(d) + 1/2 k_j^T Sigma' k_j / d     = log E[exp(q . k_j / sqrt(d))]
    s = softmax_j(z)  (over non-sink keys) -> GQA mean -> (s + eps) * ||v_j||_2

The first `n_sink` tokens are always kept (kvpress pads them with the max score).
Keys stay post-RoPE at their original positions (regime (a)).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.base import Observation, ScoringPolicy, group_reduce, oldest_mask, protect
from kvjax.observation import Observe
from models.rope import rope_angles, rotate_half


def new_token_positions(obs: Observation, t: int) -> jax.Array:
    """Positions [L, B, T] of the `t` tokens of the last forward (the last live slots of head 0)."""
    pos = obs.cache.positions[:, :, 0]                                   # [L, B, S]
    start = obs.cache.lengths[:, :, 0, None] - t                         # [L, B, 1]
    slot = jnp.clip(start + jnp.arange(t), 0, pos.shape[-1] - 1)
    return jnp.take_along_axis(pos, slot, axis=-1)


def query_statistics(q_pre: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [L, B, Hq, d] and biased covariance [L, B, Hq, d, d] of pre-RoPE queries.

    q_pre: [L, B, Hq, T, d]; mask: [L, B, T] bool, which tokens count."""
    q = q_pre.astype(jnp.float32)
    m = mask[:, :, None, :, None].astype(jnp.float32)
    cnt = jnp.maximum(m.sum(-2), 1.0)                                    # [L, B, 1, 1]
    mu = (q * m).sum(-2) / cnt
    c = (q - mu[..., None, :]) * m
    cov = jnp.einsum("lbhti,lbhtj->lbhij", c, c) / cnt[..., None]
    return mu, cov


def mean_rotation(start: jax.Array, n_future: int, config) -> tuple[jax.Array, jax.Array]:
    """Averaged RoPE over positions start..start+n_future-1: Rbar = diag(c) + diag(s) P.

    start: [B] int -> c, s: [B, d] (so Rbar x = c * x + s * rotate_half(x))."""
    pos = start[:, None] + jnp.arange(n_future)[None, :]
    cos, sin = rope_angles(pos, config)                                  # [B, F, d]
    return cos.mean(1), sin.mean(1)


def rotation_matrix(c: jax.Array, s: jax.Array) -> jax.Array:
    """[..., d] cos/sin means -> [..., d, d] matrix diag(c) + diag(s) P with P x = rotate_half(x)."""
    d = c.shape[-1]
    eye = jnp.eye(d, dtype=c.dtype)
    p = rotate_half(eye).T        # column j of P is rotate_half(e_j)
    return c[..., :, None] * eye + s[..., :, None] * p


@dataclasses.dataclass(frozen=True)
class ExpectedAttention(ScoringPolicy):
    """kvpress defaults: n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        if self.n_future_positions <= 0:
            raise ValueError(f"n_future_positions must be positive, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    @property
    def observe(self) -> Observe:
        return Observe(qkv=True)

    def score(self, obs: Observation) -> jax.Array:
        if obs.q_pre is None:
            raise ValueError("ExpectedAttention needs the pre-RoPE queries (Observe(qkv=True))")
        cache, config = obs.cache, obs.config
        n_layers, b, hkv, s, d = cache.keys.shape
        hq = obs.q_pre.shape[2]
        t = obs.q_pre.shape[3]
        qpos = new_token_positions(obs, t)
        mu, cov = query_statistics(obs.q_pre, qpos >= self.n_sink)
        start = jnp.max(cache.positions, axis=(0, 2, 3)) + 1                # [B] next position
        c, sn = mean_rotation(start, self.n_future_positions, config)      # [B, d]
        c, sn = c[None, :, None], sn[None, :, None]                         # [1, B, 1, d]
        mu = c * mu + sn * rotate_half(mu)                                  # Rbar mu
        keys = cache.keys.astype(jnp.float32).reshape(n_layers, b, hkv, 1, s, d)
        mu = mu.reshape(n_layers, b, hkv, hq // hkv, d)
        z = jnp.einsum("lbhgd,lbhxsd->lbhgs", mu, keys) / jnp.sqrt(d)
        if self.use_covariance:
            r = rotation_matrix(c, sn)                                      # [1, B, 1, d, d]
            cov = r @ cov @ jnp.swapaxes(r, -1, -2)
            cov = cov.reshape(n_layers, b, hkv, hq // hkv, d, d)
            z = z + jnp.einsum("lbhxsi,lbhgij,lbhxsj->lbhgs", keys, cov, keys) / d / 2
        live = (cache.valid & ~oldest_mask(cache.positions, self.n_sink))[:, :, :, None]
        z = jnp.where(live, z, -jnp.inf)
        p = jax.nn.softmax(z, axis=-1)
        p = jnp.where(live, p, 0.0).reshape(n_layers, b, hq, s)
        score = group_reduce(p, hkv, "mean")
        if self.use_vnorm:
            score = (score + self.epsilon) * jnp.linalg.norm(cache.values.astype(jnp.float32), axis=-1)
        return protect(score, oldest_mask(cache.positions, self.n_sink))
