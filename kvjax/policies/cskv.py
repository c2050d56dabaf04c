"""CSKV (Wang et al., 2024, "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context
Scenarios", arXiv 2409.10593; wln20/CSKV): low-rank key / value channels for the older tokens,
full precision for a recent window.

CSKV factors k_proj ~ B_k A_k (and v_proj) and caches the latent A_k x (pre-RoPE), reconstructing
B_k (A_k x) and rotating it at use; the newest `recent_size` tokens (`q_window_size=32`) stay full
width from the original projections (a bi-branch cache). Here, per layer, batch row and kv head,
the down-projection is the SVD initialisation of that factorisation computed on the prompt's own
keys (the prompt is the calibration set; no training):

    K_pre = unrope(K_post) over the older kept tokens     [n, d]
    V_r   = top-r right singular vectors of K_pre         [d, r]   (eigh of K_pre^T K_pre)
    latent c = K_pre V_r   [n, r]  is cached;  at use  k = RoPE(c V_r^T, position)

(the same for values, without RoPE). r = round(density * d): CSKV's script defaults
k_density 0.25, v_density 0.75. The cached older tokens then take (r_k + r_v) / (d + dv) of
their full size, plus the bases [d, r] per head. `rank == d` reconstructs exactly.
Token eviction runs first (`token_policy`, SnapKV window 32 by default; a 100% budget keeps
every token, CSKV alone). Differences, said plainly: the bases come from the prompt's keys and
values (ASVD-like data SVD), not the weight SVD + the trained A/B of the paper; per kv head
(the paper's A maps to r * Hkv jointly); no quantisation of the latents.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.attention import attention_mask
from kvjax.observation import Observe
from kvjax.policies.base import Observation, ScoringPolicy
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.think import _take, attend_logits, split_recent
from models.rope import apply_rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CSKVCache(kvcache.OlderRecent):
    """Older tokens as low-rank latents, the newest full width (stacked over layers, or one layer).

    latent_k [.., B, Hkv, Sp, rk], basis_k [.., B, Hkv, d, rk]  (pre-RoPE keys ~ latent_k basis_k^T)
    latent_v [.., B, Hkv, Sp, rv], basis_v [.., B, Hkv, dv, rv]
    old_positions [.., B, Hkv, Sp] int32 (-1 = empty); recent: KVCache of full-width tokens."""

    latent_k: jax.Array
    basis_k: jax.Array
    latent_v: jax.Array
    basis_v: jax.Array
    old_positions: jax.Array
    recent: kvcache.KVCache

    def reconstruct(self, rope) -> tuple[jax.Array, jax.Array]:
        """The older tokens' keys (post-RoPE, via `rope(x, positions)`) and values [B, Hkv, Sp, d]."""
        k = jnp.einsum("bhsr,bhdr->bhsd", self.latent_k.astype(jnp.float32), self.basis_k.astype(jnp.float32))
        v = jnp.einsum("bhsr,bhdr->bhsd", self.latent_v.astype(jnp.float32), self.basis_v.astype(jnp.float32))
        return rope(k, jnp.maximum(self.old_positions, 0)), v

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d]; the older keys are rebuilt from their latents and rotated."""
        if rope is None:
            raise ValueError("a CSKV cache rebuilds pre-RoPE keys: attend needs rope=")
        b, hq, t, d = q.shape
        hkv = self.latent_k.shape[1]
        k_old, v_old = self.reconstruct(rope)
        keys = jnp.concatenate([k_old, self.recent.keys.astype(jnp.float32)], axis=-2)
        values = jnp.concatenate([v_old, self.recent.values.astype(jnp.float32)], axis=-2)
        qg = q.reshape(b, hkv, hq // hkv, t, d).astype(jnp.float32)
        logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys) * d ** -0.5
        mask = attention_mask(self.positions, query_positions)[:, :, None]
        return attend_logits(logits, mask, values, observe, q.dtype)

    def resize(self, capacity: int) -> "CSKVCache":
        room = capacity - self.latent_k.shape[-2]
        if room < 1:
            raise ValueError(f"CSKV cache needs more than its {self.latent_k.shape[-2]} latent slots, got {capacity}")
        return dataclasses.replace(self, recent=kvcache.resize(self.recent, room))


def svd_basis(x: jax.Array, live: jax.Array, rank: int) -> jax.Array:
    """Top-`rank` right singular vectors of the live rows of x [.., S, d] (live [.., S]): [.., d, rank]."""
    xf = jnp.where(live[..., None], x.astype(jnp.float32), 0.0)
    gram = jnp.einsum("...sd,...se->...de", xf, xf)
    _, vecs = jnp.linalg.eigh(gram)                      # ascending eigenvalues
    return vecs[..., ::-1][..., :rank]


@dataclasses.dataclass(frozen=True)
class CSKV(ScoringPolicy):
    """k_density / v_density: kept rank share of the key / value channels (CSKV script defaults
    0.25 / 0.75); recent_size: newest tokens kept full width (q_window_size 32); token_policy: the
    eviction run first (a 100% budget keeps every token)."""

    k_density: float = 0.25
    v_density: float = 0.75
    recent_size: int = 32
    token_policy: ScoringPolicy = SnapKV(window=32, kernel=5, pool="avg")

    def __post_init__(self):
        for name in ("k_density", "v_density"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} is a kept share of the channels in (0, 1], got {getattr(self, name)}")
        if self.recent_size < 0:
            raise ValueError(f"recent_size must be >= 0, got {self.recent_size}")
        if isinstance(self.token_policy, CSKV):
            raise ValueError("CSKV cannot wrap another CSKV")

    @property
    def observe(self) -> Observe:
        return self.token_policy.observe

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.token_policy.accumulates

    def accumulate(self, obs: Observation) -> jax.Array:
        return self.token_policy.accumulate(obs)

    def score(self, obs: Observation) -> jax.Array:
        if not isinstance(obs.cache, kvcache.KVCache):
            raise ValueError("CSKV shrinks channels once, after prefill (Compression when='prefill'); "
                             "a CSKV cache cannot be compressed again")
        return self.token_policy.score(obs)

    def adjust_scores(self, scores, obs, n_keep):
        return self.token_policy.adjust_scores(scores, obs, n_keep)

    def head_budgets(self, scores, n_keep):
        return self.token_policy.head_budgets(scores, n_keep)

    def max_keep(self, n_keep: int, context: int) -> int:
        return self.token_policy.max_keep(n_keep, context)

    @staticmethod
    def rank(density: float, dim: int) -> int:
        return max(1, min(dim, int(round(density * dim))))

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> CSKVCache:
        tp = self.token_policy
        if getattr(tp, "ragged", False):
            tp = dataclasses.replace(tp, ragged=False)
        new = tp.finalize(new, obs, idx)
        d, dv = new.keys.shape[-1], new.values.shape[-1]
        old, rec, _ = split_recent(new, self.recent_size)
        old = jnp.broadcast_to(old, new.lengths.shape + old.shape[-1:])
        pos_old = _take(new.positions, old, -1)
        live = pos_old >= 0
        n_lead = new.keys.ndim - 3                                  # [.., Hkv, S, d] -> rope on [N, Hkv, S, d]
        k_post = _take(new.keys, old, 0.0)
        flat = lambda x: x.reshape((-1,) + x.shape[n_lead:])
        k_pre = apply_rope(flat(k_post), flat(-jnp.maximum(pos_old, 0)), obs.config).reshape(k_post.shape)
        v_old = _take(new.values, old, 0.0).astype(jnp.float32)
        bk = svd_basis(k_pre, live, self.rank(self.k_density, d))
        bv = svd_basis(v_old, live, self.rank(self.v_density, dv))
        zero = lambda x: jnp.where(live[..., None], x, 0.0)
        recent = kvcache.KVCache(keys=_take(new.keys, rec, 0.0), values=_take(new.values, rec, 0.0),
                                 positions=_take(new.positions, rec, -1),
                                 lengths=jnp.sum(rec >= 0, axis=-1).astype(jnp.int32))
        dt = new.keys.dtype
        return CSKVCache(latent_k=zero(jnp.einsum("...sd,...dr->...sr", k_pre.astype(jnp.float32), bk)).astype(dt),
                         basis_k=bk.astype(dt),
                         latent_v=zero(jnp.einsum("...sd,...dr->...sr", v_old, bv)).astype(dt),
                         basis_v=bv.astype(dt), old_positions=pos_old, recent=recent)
