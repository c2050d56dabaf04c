"""MiniCache (Liu et al., 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large
Language Models", arXiv 2405.14366, NeurIPS'24): merge the KV caches of adjacent layers in the
middle-to-deep half of the model into one shared direction cache.

For a pair of adjacent layers (a, b) = (l-1, l) and every token (per batch row and kv head), for
keys and for values separately:

    m_a = ||x_a||, m_b = ||x_b||;  u_a = x_a / m_a, u_b = x_b / m_b;  Omega = arccos(u_a . u_b)
    e = [sin((1-t) Omega) u_a + sin(t Omega) u_b] / sin(Omega)          (SLERP, t = 0.6)
    stored: e (once for the pair), m_a, m_b, and the retention set: the ceil(retention_ratio * S)
            tokens of largest angular distance Omega / pi (retention_ratio = 0.05), kept as their
            original x_a and x_b
    restored: x^_a = e m_a, x^_b = e m_b, then the retained originals scattered back in.

Pairs start at layer `start * L` (the paper's "from the middle", start = 0.5): (L/2, L/2+1),
(L/2+2, L/2+3), ...; an odd last layer stays unmerged. It is a cache transform after prefill
(`Compression(when="prefill")`): every token is kept (the budget must be 100%; memory is set by
the merge), keys stay post-RoPE (both layers rotate a token by the same angle, so SLERP of the
rotated vectors is the rotation of the SLERP), and decoded tokens go full width into each layer's
own recent part. `retention_ratio = 1` retains every token: the full cache exactly.
Differences, said plainly: the retention set is the top `retention_ratio` share by angular
distance (as the KVCache-Factory reimplementation), not the paper's threshold gamma; no
quantisation of the merged cache (the paper's 5x figure combines it with 4-bit KIVI).

Layout: `MiniCacheLayers`, a per-layer cache (`kvjax.layerwise.LayerwiseCache`) whose merged
layers are `MiniLayer`s (magnitudes, retained originals, recent tokens) and whose `shared` tuple
holds each pair's direction caches once; `enter` binds a layer to its pair's `PairShared`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.layerwise import LayerwiseCache, fit_kv, fit_layer
from kvjax.policies.base import Observation
from kvjax.policies.transform import CacheTransform

EPS = 1e-12


def slerp(ua: jax.Array, ub: jax.Array, t: float) -> tuple[jax.Array, jax.Array]:
    """SLERP of unit vectors ua, ub [..., d] at t: (e [..., d], Omega [...]) in float32.

    Nearly parallel vectors (sin Omega ~ 0) fall back to the linear interpolation (its limit)."""
    cos = jnp.clip(jnp.sum(ua * ub, axis=-1), -1.0, 1.0)
    omega = jnp.arccos(cos)
    so = jnp.sin(omega)
    small = so < 1e-6
    safe = jnp.where(small, 1.0, so)
    wa = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    wb = jnp.where(small, t, jnp.sin(t * omega) / safe)
    return wa[..., None] * ua + wb[..., None] * ub, omega


def polar(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., d] -> (magnitude [...], direction [..., d]) in float32 (zero vectors: direction 0)."""
    x = x.astype(jnp.float32)
    m = jnp.linalg.norm(x, axis=-1)
    return m, x / jnp.maximum(m, EPS)[..., None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairShared:
    """What a merged pair stores once: directions [B, Hkv, S, d] of keys / values and the slots
    of their retained tokens [B, Hkv, R] (keys and values retain separately)."""

    dir_k: jax.Array
    dir_v: jax.Array
    keep_k: jax.Array
    keep_v: jax.Array


def _scatter(x: jax.Array, idx: jax.Array, upd: jax.Array) -> jax.Array:
    """x [B, H, S, d] with rows idx [B, H, R] set to upd [B, H, R, d]."""
    return jax.vmap(jax.vmap(lambda a, i, u: a.at[i].set(u)))(x, idx, upd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MiniLayer(kvcache.OlderRecent):
    """One merged layer: mag_k / mag_v [B, Hkv, S] its per-token magnitudes; ret_k / ret_v
    [B, Hkv, R, d] its retained original keys / values; old_positions [B, Hkv, S] (-1 = empty);
    recent: full-width tokens decoded after the merge; shared: the pair's `PairShared` while the
    layer runs (None as stored: it lives once on `MiniCacheLayers.shared`)."""

    mag_k: jax.Array
    mag_v: jax.Array
    ret_k: jax.Array
    ret_v: jax.Array
    old_positions: jax.Array
    recent: kvcache.KVCache
    shared: Optional[PairShared] = None

    def restore(self) -> tuple[jax.Array, jax.Array]:
        """The merged tokens' keys and values [B, Hkv, S, d] (float32): e * m, retained originals back."""
        if self.shared is None:
            raise ValueError("a MiniCache layer needs its pair's shared directions (MiniCacheLayers.enter)")
        sh = self.shared
        k = sh.dir_k.astype(jnp.float32) * self.mag_k.astype(jnp.float32)[..., None]
        v = sh.dir_v.astype(jnp.float32) * self.mag_v.astype(jnp.float32)[..., None]
        return (_scatter(k, sh.keep_k, self.ret_k.astype(jnp.float32)),
                _scatter(v, sh.keep_v, self.ret_v.astype(jnp.float32)))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d] over the restored merged tokens and the recent ones (XLA)."""
        k_old, v_old = self.restore()
        keys = jnp.concatenate([k_old, self.recent.keys.astype(jnp.float32)], axis=-2)
        values = jnp.concatenate([v_old, self.recent.values.astype(jnp.float32)], axis=-2)
        return attend(q, keys, values, self.positions, query_positions, observe=observe)

    def fit(self, room: int) -> "MiniLayer":
        return dataclasses.replace(self, recent=fit_kv(self.recent, room))

    def resize(self, capacity: int) -> "MiniLayer":
        room = capacity - self.old_positions.shape[-1]
        if room < 1:
            raise ValueError(f"MiniCache layer needs more than its {self.old_positions.shape[-1]} merged slots, "
                             f"got {capacity}")
        return dataclasses.replace(self, recent=kvcache.resize(self.recent, room))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MiniCacheLayers(LayerwiseCache):
    """A per-layer cache whose merged pairs keep their directions once in `shared` (one
    `PairShared` per pair); pair_of[i]: layer i's entry in `shared` (-1 = not merged)."""

    shared: tuple = ()
    pair_of: tuple = dataclasses.field(metadata=dict(static=True), default=())

    def enter(self, i: int):
        lc = self.layers[i]
        j = self.pair_of[i] if i < len(self.pair_of) else -1
        return lc if j < 0 else dataclasses.replace(lc, shared=self.shared[j])

    def leave(self, i: int, layer):
        return dataclasses.replace(layer, shared=None) if isinstance(layer, MiniLayer) else layer

    def resize(self, capacity: int) -> "MiniCacheLayers":
        room = self.room + capacity - self.capacity
        if room < 0:
            raise ValueError(f"cannot resize a MiniCache to {capacity}: less room than it holds "
                             f"(capacity {self.capacity}, room {self.room})")
        return dataclasses.replace(self, layers=tuple(fit_layer(lc, room) for lc in self.layers),
                                   capacity=capacity, room=room)


def merge_pair(xa: jax.Array, xb: jax.Array, live: jax.Array, t: float, n_keep: int):
    """One pair's keys (or values) [B, Hkv, S, d] -> (direction [B, Hkv, S, d], magnitudes
    (m_a, m_b) [B, Hkv, S], retained slots [B, Hkv, R] by largest angular distance among `live`)."""
    ma, ua = polar(xa)
    mb, ub = polar(xb)
    e, omega = slerp(ua, ub, t)
    dist = jnp.where(live, omega / jnp.pi, -jnp.inf)
    _, keep = jax.lax.top_k(dist, n_keep)
    return e, (ma, mb), keep.astype(jnp.int32)


def merged_pairs(n_layers: int, start: float) -> tuple[tuple[int, int], ...]:
    """Adjacent layer pairs (a, a+1) from layer floor(start * L) on (an odd last layer stays alone)."""
    first = int(math.floor(start * n_layers))
    return tuple((a, a + 1) for a in range(first, n_layers - 1, 2))


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=-2)


@dataclasses.dataclass(frozen=True)
class MiniCache(CacheTransform):
    """t: SLERP interpolation weight toward the deeper layer (0.6); retention_ratio: share of the
    tokens kept unmerged per pair, by largest angular distance (0.05; 1 = nothing merged);
    start: the first merged layer as a share of the depth (0.5: the middle-to-deep half)."""

    t: float = 0.6
    retention_ratio: float = 0.05
    start: float = 0.5

    def __post_init__(self):
        if not 0 <= self.t <= 1:
            raise ValueError(f"t (SLERP weight) must be in [0, 1], got {self.t}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio}")
        if not 0 <= self.start < 1:
            raise ValueError(f"start (first merged layer / depth) must be in [0, 1), got {self.start}")

    def retained(self, slots: int) -> int:
        return min(slots, int(math.ceil(self.retention_ratio * slots)))

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> MiniCacheLayers:
        """new: the gathered stacked cache [L, B, Hkv, S, d] holding every token (chronological)."""
        n_layers, s = new.keys.shape[0], new.capacity
        pairs = merged_pairs(n_layers, self.start)
        r = self.retained(s)
        layers = [jax.tree_util.tree_map(lambda x, i=i: x[i], new) for i in range(n_layers)]
        pair_of = [-1] * n_layers
        shared = []
        dt = new.keys.dtype
        for j, (a, b) in enumerate(pairs):
            live = new.positions[a] >= 0
            ek, (mka, mkb), keep_k = merge_pair(new.keys[a], new.keys[b], live, self.t, r)
            ev, (mva, mvb), keep_v = merge_pair(new.values[a], new.values[b], live, self.t, r)
            shared.append(PairShared(dir_k=ek.astype(dt), dir_v=ev.astype(dt), keep_k=keep_k, keep_v=keep_v))
            for layer, mk, mv in ((a, mka, mva), (b, mkb, mvb)):
                src = layers[layer]
                empty = kvcache.KVCache(keys=src.keys[..., :0, :], values=src.values[..., :0, :],
                                        positions=src.positions[..., :0], lengths=jnp.zeros_like(src.lengths))
                layers[layer] = MiniLayer(mag_k=mk.astype(dt), mag_v=mv.astype(dt),
                                          ret_k=_take_rows(src.keys, keep_k), ret_v=_take_rows(src.values, keep_v),
                                          old_positions=src.positions, recent=empty)
                pair_of[layer] = j
        return MiniCacheLayers(layers=tuple(layers), capacity=s, room=0, shared=tuple(shared),
                               pair_of=tuple(pair_of))
