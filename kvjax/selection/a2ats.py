"""A2ATS (ACL Findings'25; abstract only): retrieval over vector-quantised keys with a query-aware
codebook and lookup-table scores.

Built once from the prefilled cache (`init_meta`), per (batch row, kv head):

- the live keys rotated back to position 0 (pre-RoPE) are cut into `d / sub_dim` subspaces of
  `sub_dim` (8) channels; each subspace has a codebook of `n_codes` (256) centroids learnt by
  `kmeans_iters` (10) Lloyd iterations under the query-aware metric
      dist(k, c) = (k - c)^T Sigma (k - c),     Sigma = E[q' q'^T]
  (the score error E[(q'^T (k - c))^2]; per subspace its diagonal block; the minimiser of the
  update step is the plain mean for any such metric). Sigma comes from calibration queries
  (`calibrate_query_metric`: a forward over some text, per layer and kv head); without one it
  is the identity (plain k-means, not query-aware: stated by `query_aware`);
- every key's codes [capacity, subspaces] (uint8 for <= 256 codes); appended tokens are encoded
  with the same codebook (their pre-RoPE keys come from the layer).

Windowed RoPE (our reading of WRoPE **[unverified]**): beyond the local window every key is seen
at the same relative distance `n_local`, so one position-free codebook serves all keys; a decode
query q at position t is turned into q' = RoPE(q_pre, n_local) = RoPE(q, n_local - t), a
lookup table LUT[m, c] = q'_m . C[m, c] is built per query head and

    score(j) = max over the GQA group of sum_m LUT[m, code_j[m]]      (= max_g q'_g . k_hat_j)

ranks the candidates (live slots that are neither the first `n_init` sinks nor the last
`n_local` tokens, which are always attended exactly). The top `budget - n_init - n_local` are
attended with exact K/V through `sparse_decode` at their real positions.

Left out: offloading the K/V to host memory (everything stays on the device; ShadowKV has the
host path), the paper's kernels, and its exact WRoPE formulation. Dense-cache only.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.selection.base import (SelectorBase, middle_candidates, neg_inf_topk, pre_rope_keys, scatter_slots,
                                  sink_and_local)


class QueryMetric:
    """Calibrated second moments of the windowed queries: sigma [layers, kv_heads, d, d] float32.
    Hashed by identity (selectors are static jit arguments)."""

    def __init__(self, sigma):
        self.sigma = np.asarray(sigma, np.float32)
        if self.sigma.ndim != 4 or self.sigma.shape[-1] != self.sigma.shape[-2]:
            raise ValueError(f"QueryMetric: sigma must be [layers, kv_heads, d, d], got {self.sigma.shape}")

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class A2Meta:
    """codebook [b, h, subspaces, n_codes, sub_dim] (keys' dtype); codes [b, h, capacity,
    subspaces] uint8 / int32; sigma [h, d, d] float32 (the metric); inv_freq [d/2] float32."""

    codebook: jax.Array
    codes: jax.Array
    sigma: jax.Array
    inv_freq: jax.Array


def rotate(x: jax.Array, shift: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """RoPE (rotate-half) of x [..., d] by `shift` (broadcast to x.shape[:-1]) positions."""
    from models.rope import rotate_half
    ang = shift.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    xf = x.astype(jnp.float32)
    return xf * jnp.cos(ang) + rotate_half(xf) * jnp.sin(ang)


def nearest(x: jax.Array, codebook: jax.Array, sigma: jax.Array) -> jax.Array:
    """x [..., n, M, s], codebook [..., M, K, s], sigma [..., M, s, s] -> codes [..., n, M] int32
    minimising (x - c)^T sigma (x - c) (= -2 x^T sigma c + c^T sigma c + const)."""
    sc = jnp.einsum("...mst,...mkt->...mks", sigma, codebook)                  # sigma c
    cc = jnp.sum(codebook * sc, axis=-1)                                       # [..., M, K]
    dist = cc[..., None, :, :] - 2 * jnp.einsum("...nms,...mks->...nmk", x, sc)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def kmeans(x: jax.Array, live: jax.Array, sigma: jax.Array, n_codes: int, iters: int) -> jax.Array:
    """Lloyd's k-means of x [b, h, n, M, s] (rows where live [b, h, n]) under the metric
    sigma [h, M, s, s]: codebook [b, h, M, K, s]. Initial centroids: K live rows evenly spread;
    a centroid left without members keeps its place."""
    n = x.shape[2]
    count = jnp.maximum(jnp.sum(live, axis=-1), 1)                              # [b, h]
    start = jnp.argmax(live, axis=-1)
    pick = start[..., None] + (jnp.arange(n_codes) * count[..., None]) // n_codes
    pick = jnp.clip(pick, 0, n - 1)
    cb = jnp.take_along_axis(x, pick[..., None, None], axis=2).transpose(0, 1, 3, 2, 4)   # [b, h, M, K, s]
    w = live.astype(jnp.float32)[..., None]                                    # [b, h, n, 1]

    def step(cb, _):
        codes = nearest(x, cb, sigma[None])                                    # [b, h, n, M]
        onehot = jax.nn.one_hot(codes, n_codes, dtype=jnp.float32) * w[..., None]   # [b, h, n, M, K]
        tot = jnp.einsum("bhnmk,bhnms->bhmks", onehot, x)
        cnt = jnp.sum(onehot, axis=2)[..., None]                               # [b, h, M, K, 1]
        return jnp.where(cnt > 0, tot / jnp.maximum(cnt, 1.0), cb), None

    cb, _ = jax.lax.scan(step, cb, None, length=iters)
    return cb


@dataclasses.dataclass(frozen=True)
class A2ATS(SelectorBase):
    """budget: attended tokens per kv head (n_init sinks + selected + n_local window)."""

    budget: int = 1024
    n_init: int = 4
    n_local: int = 64
    sub_dim: int = 8
    n_codes: int = 256
    kmeans_iters: int = 10
    metric: Optional[QueryMetric] = None
    layer: int = 0
    page_size: int = 1
    interval: int = 1
    dense_layers: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n_init < 0 or self.n_local < 1:
            raise ValueError(f"A2ATS: need n_init >= 0 and n_local >= 1, got {self.n_init}, {self.n_local}")
        if self.top_k < 1:
            raise ValueError(f"A2ATS: budget {self.budget} leaves no selected tokens after n_init={self.n_init} "
                             f"and n_local={self.n_local}")
        if self.sub_dim < 1 or not 2 <= self.n_codes <= 65536 or self.kmeans_iters < 0:
            raise ValueError(f"A2ATS: need sub_dim >= 1, 2 <= n_codes <= 65536, kmeans_iters >= 0, got "
                             f"{self.sub_dim}, {self.n_codes}, {self.kmeans_iters}")
        if self.page_size != 1:
            raise ValueError("A2ATS selects tokens: page_size must be 1")

    @classmethod
    def from_budget(cls, budget: int, **kw) -> "A2ATS":
        kw.setdefault("n_init", min(4, budget // 16))
        kw.setdefault("n_local", min(64, max(budget // 4, 1)))
        return cls(budget=budget, **kw)

    @property
    def top_k(self) -> int:
        return self.budget - self.n_init - self.n_local

    @property
    def query_aware(self) -> bool:
        return self.metric is not None

    def for_layer(self, layer: int, config=None) -> "A2ATS":
        return dataclasses.replace(self, layer=layer)

    def n_select(self, capacity: int) -> int:
        return min(self.top_k, capacity)

    def meta_read_bytes(self, meta: A2Meta, kv) -> int:
        """Codes + codebook (the metric and frequencies are not read at decode)."""
        return kvcache.tree_bytes(meta.codes) + kvcache.tree_bytes(meta.codebook)

    def sigma(self, h: int, d: int) -> jax.Array:
        """[h, d, d] this layer's metric (identity without calibration)."""
        if self.metric is None:
            return jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (h, d, d))
        s = self.metric.sigma
        if self.layer >= s.shape[0] or s.shape[1:] != (h, d, d):
            raise ValueError(f"A2ATS: metric is {s.shape}, layer {self.layer} needs [>{self.layer}, {h}, {d}, {d}]")
        return jnp.asarray(s[self.layer])

    def blocks(self, sigma: jax.Array) -> jax.Array:
        """[h, d, d] -> [h, M, s, s] the subspaces' diagonal blocks."""
        m = sigma.shape[-1] // self.sub_dim
        idx = jnp.arange(m)
        s4 = sigma.reshape(sigma.shape[0], m, self.sub_dim, m, self.sub_dim)
        return s4[:, idx, :, idx].transpose(1, 0, 2, 3)

    def split(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.sub_dim, self.sub_dim)

    def init_meta(self, kv: kvcache.KVCache, config):
        from models.rope import inverse_frequencies
        b, h, cap, d = kv.keys.shape
        if d % self.sub_dim:
            raise ValueError(f"A2ATS: sub_dim {self.sub_dim} does not divide head_dim {d}")
        sigma = self.sigma(h, d)
        x = self.split(pre_rope_keys(kv, config))                                # [b, h, cap, M, s]
        sig_b = self.blocks(sigma)
        cb = kmeans(x, kv.positions >= 0, sig_b, self.n_codes, self.kmeans_iters)
        codes = nearest(x, cb, sig_b[None])
        inv = jnp.asarray(inverse_frequencies(d, config.rope_theta, config.rope_scaling), jnp.float32)
        return A2Meta(codebook=cb.astype(kv.keys.dtype), codes=codes.astype(self.code_dtype), sigma=sigma,
                      inv_freq=inv)

    @property
    def code_dtype(self):
        return jnp.uint8 if self.n_codes <= 256 else jnp.int32

    def append_meta(self, meta: A2Meta, kv, keys, positions, keys_pre_rope=None):
        """Encode the new tokens' pre-RoPE keys [b, h, new, d] and write their codes at their slots."""
        if keys_pre_rope is None:
            keys_pre_rope = rotate(keys, -jnp.maximum(positions, 0)[:, None, :], meta.inv_freq)
        sig_b = self.blocks(meta.sigma)
        codes = nearest(self.split(keys_pre_rope.astype(jnp.float32)), meta.codebook.astype(jnp.float32),
                        sig_b[None]).astype(meta.codes.dtype)                   # [b, h, new, M]
        slots = scatter_slots(kv, keys.shape[2])
        ok = (positions[:, None, :] >= 0) & (slots < kv.capacity)
        slots = jnp.where(ok, slots, kv.capacity)                                # out of range: dropped
        put = jax.vmap(jax.vmap(lambda c, s, u: c.at[s].set(u, mode="drop")))
        return dataclasses.replace(meta, codes=put(meta.codes, slots, codes))

    def scores(self, meta: A2Meta, q: jax.Array, query_positions: jax.Array) -> jax.Array:
        """q [b, q_heads, 1, d] post-RoPE at query_positions [b, 1] -> [b, kv_heads, capacity]
        float32: max over the GQA group of the lookup-table score of every slot's codes."""
        b, hq, _, d = q.shape
        h = meta.codes.shape[1]
        qw = rotate(q[:, :, 0], (self.n_local - query_positions[:, :1]), meta.inv_freq)   # [b, hq, d]
        qg = self.split(qw.reshape(b, h, hq // h, d))                             # [b, h, g, M, s]
        lut = jnp.einsum("bhgms,bhmks->bhgmk", qg, meta.codebook.astype(jnp.float32))
        codes = meta.codes.astype(jnp.int32)                                       # [b, h, cap, M]
        per = jnp.take_along_axis(lut[:, :, :, None], codes[:, :, None, :, :, None], axis=-1)[..., 0]
        return jnp.max(jnp.sum(per, axis=-1), axis=2)

    def select(self, meta, kv, q, query_positions):
        cand = middle_candidates(kv, self.n_init, self.n_local)
        s = jnp.where(cand, self.scores(meta, q, query_positions), -jnp.inf)
        return neg_inf_topk(s, self.n_select(kv.capacity))

    def forced(self, meta, kv):
        return sink_and_local(kv, self.n_init, self.n_local)


def calibrate_query_metric(params, config, tokens, window: int = 64) -> QueryMetric:
    """Sigma = E[q' q'^T] per (layer, kv head) over the queries of one forward of `tokens`
    [batch, T] (q' = the pre-RoPE query rotated by `window` positions, averaged over the GQA group,
    the batch and the tokens). Pass the same `window` as the selector's n_local."""
    from kvjax.observation import Observe
    from models.llama import forward
    from models.rope import inverse_frequencies
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, _, outs = forward(params, tokens, pos, cache, config, Observe(qkv=True), all_logits=False)
    inv = jnp.asarray(inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling), jnp.float32)
    q = rotate(outs["q_pre"], jnp.asarray(window), inv)                          # [L, B, Hq, T, d]
    n_l, _, hq, _, d = q.shape
    q = q.reshape(n_l, b, config.n_kv_heads, hq // config.n_kv_heads, t, d)
    sigma = jnp.einsum("lbhgtd,lbhgte->lhde", q, q) / (b * (hq // config.n_kv_heads) * t)
    return QueryMetric(np.asarray(sigma))
