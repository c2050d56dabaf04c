"""TriAttention (arXiv 2604.04921; WeianMao/triattention `core/scoring.py`): eviction by the
expected logit of a calibrated mean query at future positions (trigonometric series over the
RoPE frequencies) plus a magnitude correction.

Calibration (`calibrate_triattention`): one forward over plain text; per (layer, query head) and
RoPE frequency f, with the pre-RoPE query as complex pairs q_f = q[f] + i q[f + d/2] ("half"
layout, as the rotate-half RoPE): qbar_f = mean_t q_f and m_f = mean_t |q_f|.

Score of a stored post-RoPE key k (k_f complex likewise), omega_f the RoPE frequencies, t0 the
next query position (newest position + 1), s_f = 1 (vanilla / Llama-3 RoPE: no attention scaling):

    P_f = qbar_f conj(k_f)
    trig(t) = sum_f Re(P_f) cos(t omega_f) - Im(P_f) sin(t omega_f)
    score   = mean_{o in 1, 2, 4, ..., 65536} trig(t0 + o) + sum_f (m_f - |qbar_f|) |k_f|

z-normalised over the live slots per query head (`sparse_normalize_scores`), then averaged over
the GQA group (per kv head, `pruning_mode=per_head`; the group reduction is ours
**[unverified]**). The newest `window` (128) tokens are protected. The official schedule prunes
every `divide_length=128` decoded tokens to `kv_budget` 2048 with the prefill protected: here
that is `Compression(policy, Budget(tokens=2048), when="decode", interval=128)` (the prefill is
not protected: the policy interface scores every slot alike).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy, newest_mask, protect

OFFSETS = tuple(2 ** i for i in range(17))          # 1, 2, 4, ..., 65536


class TriStats:
    """Calibrated query statistics: qbar (complex) and m, each [layers, q_heads, head_dim / 2].
    Hashed by identity (policies are static jit arguments)."""

    def __init__(self, qbar, m):
        self.qbar = np.asarray(qbar, np.complex64)
        self.m = np.asarray(m, np.float32)
        if self.qbar.ndim != 3 or self.qbar.shape != self.m.shape:
            raise ValueError(f"TriStats: qbar and m must both be [layers, q_heads, head_dim/2], got "
                             f"{self.qbar.shape} and {self.m.shape}")

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@dataclasses.dataclass(frozen=True)
class TriAttention(ScoringPolicy):
    """stats: the calibration (`calibrate_triattention`); window: protected newest tokens."""

    stats: Optional[TriStats] = None
    window: int = 128

    def __post_init__(self):
        if self.stats is None:
            raise ValueError("TriAttention needs calibrated query statistics: stats=calibrate_triattention(params, "
                             "config, tokens)")
        if self.window < 0:
            raise ValueError(f"TriAttention: window must be >= 0, got {self.window}")

    @property
    def observe(self) -> Observe:
        return Observe()

    def raw_scores(self, obs: Observation) -> jax.Array:
        """[L, B, Hq, S] float32 un-normalised scores of every slot (L = 1 inside a layer)."""
        from models.rope import inverse_frequencies
        cfg = obs.config
        keys = obs.cache.keys.astype(jnp.float32)                                # [L, B, Hkv, S, d]
        l, b, hkv, s, d = keys.shape
        hq = cfg.n_heads
        if self.stats.qbar.shape[1:] != (hq, d // 2) or self.stats.qbar.shape[0] < obs.n_layers:
            raise ValueError(f"TriAttention: stats are {self.stats.qbar.shape}, the model needs "
                             f"[{obs.n_layers}, {hq}, {d // 2}]")
        layer = jnp.asarray(obs.layer) + jnp.arange(l)
        qr = jnp.asarray(self.stats.qbar.real)[layer][:, None]                   # [L, 1, Hq, F]
        qi = jnp.asarray(self.stats.qbar.imag)[layer][:, None]
        m = jnp.asarray(self.stats.m)[layer][:, None]
        g = hq // hkv
        kr = jnp.repeat(keys[..., :d // 2], g, axis=2)                          # [L, B, Hq, S, F]
        ki = jnp.repeat(keys[..., d // 2:], g, axis=2)
        p_re = qr[..., None, :] * kr + qi[..., None, :] * ki
        p_im = qi[..., None, :] * kr - qr[..., None, :] * ki
        inv = inverse_frequencies(d, cfg.rope_theta, cfg.rope_scaling)
        ang_o = np.asarray(OFFSETS, np.float64)[:, None] * inv                   # exact offsets (float64)
        c_o, s_o = jnp.asarray(np.cos(ang_o).mean(0), jnp.float32), jnp.asarray(np.sin(ang_o).mean(0), jnp.float32)
        t0 = jnp.max(obs.cache.positions, axis=(2, 3)).astype(jnp.float32) + 1    # [L, B]
        a0 = t0[..., None] * jnp.asarray(inv, jnp.float32)                       # [L, B, F]
        cos_m = jnp.cos(a0) * c_o - jnp.sin(a0) * s_o                            # mean_o cos((t0 + o) w)
        sin_m = jnp.sin(a0) * c_o + jnp.cos(a0) * s_o
        trig = jnp.einsum("lbhsf,lbf->lbhs", p_re, cos_m) - jnp.einsum("lbhsf,lbf->lbhs", p_im, sin_m)
        mlr = jnp.einsum("lbhsf,lbhf->lbhs", jnp.sqrt(kr ** 2 + ki ** 2),
                         jnp.broadcast_to(m - jnp.sqrt(qr ** 2 + qi ** 2), (l, b, hq, d // 2)))
        return trig + mlr

    def score(self, obs: Observation) -> jax.Array:
        raw = self.raw_scores(obs)                                               # [L, B, Hq, S]
        pos = obs.cache.positions
        l, b, hkv, s = pos.shape
        live = jnp.repeat(pos >= 0, raw.shape[2] // hkv, axis=2)
        n = jnp.maximum(jnp.sum(live, -1, keepdims=True), 1)
        mean = jnp.sum(jnp.where(live, raw, 0.0), -1, keepdims=True) / n
        std = jnp.sqrt(jnp.sum(jnp.where(live, (raw - mean) ** 2, 0.0), -1, keepdims=True) / n)
        z = (raw - mean) / jnp.maximum(std, 1e-6)
        z = z.reshape(l, b, hkv, -1, s).mean(axis=3)
        z = jnp.where(pos >= 0, z, -jnp.inf)
        return protect(z, newest_mask(pos, self.window))


def calibrate_triattention(params, config, tokens) -> TriStats:
    """qbar_f = mean_t q_f, m_f = mean_t |q_f| of the pre-RoPE queries of one forward of `tokens`
    [batch, T] (complex pairs in the half layout), per (layer, query head): TriStats."""
    from kvjax import cache as kvcache
    from models.llama import forward
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, _, outs = forward(params, tokens, pos, cache, config, Observe(qkv=True), all_logits=False)
    q = np.asarray(outs["q_pre"], np.float64)                                   # [L, B, Hq, T, d]
    h = config.head_dim // 2
    z = q[..., :h] + 1j * q[..., h:]
    return TriStats(qbar=z.mean(axis=(1, 3)), m=np.abs(z).mean(axis=(1, 3)))
