"""Effectively Compress KV Heads (Yu et al., 2024, "Effectively Compress KV Heads for LLM",
arXiv 2406.07056): merge groups of `group` kv heads into one head through the principal subspace
of their calibration keys / values.

Per layer and group of g kv heads (heads h = j*g .. j*g+g-1), from calibration tokens:

    X_k = [K_pre_h1 | ... | K_pre_hg]   [n_calib, g*d]  (pre-RoPE keys, channels concatenated)
    U_k = top-r right singular vectors of X_k   [g*d, r]   (r = d: one merged head of d channels)
    cached per token:  c_k = [k_h1 | ... | k_hg] U_k   [r]    (instead of g * d numbers)
    at use:            [k^_h1 | ... | k^_hg] = c_k U_k^T, then RoPE at the token's position

(the same for values, without RoPE). The paper folds U_v^T into W_o and the key side into W_q,
noting that RoPE forbids a plain fold for keys; here both are applied at attention time instead
(the queries see exactly the keys c_k U_k^T would give), which is the same arithmetic and keeps
RoPE exact. Memory: every cached token of a group takes r_k + r_v numbers instead of
g * (d + dv) (r = d, g = 2: half the heads removed); the bases [g*d, r] per layer are model
weights (the paper's folded projections), reported apart (`basis_bytes`), not in `memory_bytes`.
Decoded tokens are merged the same way as they are appended (the model behaves as a GQA model
with Hkv/g kv heads). `group = 1, rank = d` reconstructs exactly.
Differences, said plainly: no LoRA fine-tuning after the conversion (training-free); calibration
is a few hundred random or KJV tokens (`calibration=`), not the paper's dataset.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import attend
from kvjax.observation import Observe
from kvjax.policies.attention_gate import _Frozen
from kvjax.policies.base import Observation
from kvjax.policies.cskv import svd_basis
from kvjax.policies.transform import CacheTransform
from models.config import ModelConfig
from models.rope import apply_rope


def group_channels(x: jax.Array, group: int) -> jax.Array:
    """[..., Hkv, S, d] -> [..., Hkv/g, S, g*d]: each group's heads side by side in the channels."""
    *lead, h, s, d = x.shape
    x = x.reshape(*lead, h // group, group, s, d)
    return jnp.moveaxis(x, -3, -2).reshape(*lead, h // group, s, group * d)


def ungroup_channels(x: jax.Array, group: int) -> jax.Array:
    """[..., Hg, S, g*d] -> [..., Hg*g, S, d] (inverse of group_channels)."""
    *lead, hg, s, gd = x.shape
    x = x.reshape(*lead, hg, s, group, gd // group)
    return jnp.moveaxis(x, -2, -3).reshape(*lead, hg * group, s, gd // group)


def project(x: jax.Array, basis: jax.Array, group: int) -> jax.Array:
    """One layer's per-head vectors [B, Hkv, T, d] -> group latents [B, Hg, T, r] (basis
    [Hg, g*d, r]; float32)."""
    return jnp.einsum("bhtc,hcr->bhtr", group_channels(x.astype(jnp.float32), group), basis.astype(jnp.float32))


def expand(latent: jax.Array, basis: jax.Array, group: int) -> jax.Array:
    """Group latents [B, Hg, S, r] -> per-head vectors [B, Hkv, S, d] (float32)."""
    return ungroup_channels(jnp.einsum("bhsr,hcr->bhsc", latent.astype(jnp.float32), basis.astype(jnp.float32)),
                            group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadMergeCache:
    """Merged kv heads (stacked over layers, or one layer's slice), Hg = Hkv / group:

    latent_k [.., B, Hg, S, rk], latent_v [.., B, Hg, S, rv]: every token of a group, projected;
    basis_k [.., Hg, g*d, rk], basis_v [.., Hg, g*dv, rv]: the calibration bases;
    slot_positions [.., B, Hg, S] int32 (-1 = empty), slot_lengths [.., B, Hg]."""

    latent_k: jax.Array
    latent_v: jax.Array
    basis_k: jax.Array
    basis_v: jax.Array
    slot_positions: jax.Array
    slot_lengths: jax.Array
    group: int = dataclasses.field(metadata=dict(static=True), default=2)

    @property
    def positions(self) -> jax.Array:
        """[.., B, Hkv, S]: every kv head of a group sees its group's slots."""
        return jnp.repeat(self.slot_positions, self.group, axis=-2)

    @property
    def lengths(self) -> jax.Array:
        return jnp.repeat(self.slot_lengths, self.group, axis=-1)

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    @property
    def capacity(self) -> int:
        return self.latent_k.shape[-2]

    def memory_bytes(self) -> int:
        """Bytes of the cached tokens (latents, positions, lengths). The bases are model weights
        (the paper folds them into W_q / W_o): constant in context and batch, see `basis_bytes`."""
        return kvcache.tree_bytes(self._view())

    def basis_bytes(self) -> int:
        return kvcache.tree_bytes((self.basis_k, self.basis_v))

    def _view(self) -> kvcache.KVCache:
        return kvcache.KVCache(keys=self.latent_k, values=self.latent_v, positions=self.slot_positions,
                               lengths=self.slot_lengths)

    def _from_view(self, view: kvcache.KVCache) -> "HeadMergeCache":
        return dataclasses.replace(self, latent_k=view.keys, latent_v=view.values, slot_positions=view.positions,
                                   slot_lengths=view.lengths)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "HeadMergeCache":
        """New tokens' pre-RoPE keys and values `[B, Hkv, new, d]` are merged as they are written."""
        if keys_pre_rope is None:
            raise ValueError("a merged-head cache stores pre-RoPE keys: append needs keys_pre_rope=")
        dt = self.latent_k.dtype
        view = kvcache.append(self._view(), project(keys_pre_rope, self.basis_k, self.group).astype(dt),
                              project(values, self.basis_v, self.group).astype(dt), positions)
        return self._from_view(view)

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d]; keys rebuilt per head from the group latents, then rotated."""
        if rope is None:
            raise ValueError("a merged-head cache rebuilds pre-RoPE keys: attend needs rope=")
        pos = self.positions
        keys = rope(expand(self.latent_k, self.basis_k, self.group), jnp.maximum(pos, 0))
        values = expand(self.latent_v, self.basis_v, self.group)
        return attend(q, keys, values, pos, query_positions, observe=observe)

    def resize(self, capacity: int) -> "HeadMergeCache":
        return self._from_view(kvcache.resize(self._view(), capacity))


def calibration_bases(k_pre: jax.Array, v: jax.Array, group: int, rank_k: int, rank_v: int):
    """Bases from calibration keys / values [L, B, Hkv, T, d] (pre-RoPE keys):
    (basis_k [L, Hg, g*d, rank_k], basis_v [L, Hg, g*dv, rank_v]) in float32."""
    def basis(x, rank):
        xg = jnp.moveaxis(group_channels(x.astype(jnp.float32), group), 1, 2)   # [L, Hg, B, T, g*d]
        xg = xg.reshape(xg.shape[:2] + (-1, xg.shape[-1]))                      # [L, Hg, B*T, g*d]
        return svd_basis(xg, jnp.ones(xg.shape[:-1], bool), rank)
    return basis(k_pre, rank_k), basis(v, rank_v)


@dataclasses.dataclass(frozen=True)
class KVHeadMerge(CacheTransform):
    """group: kv heads merged into one (2: half the kv heads removed; it must divide the model's kv
    heads); rank: channels of the merged head (0: head_dim, the paper's top-d subspace);
    bases: the calibration bases (`from_calibration`, or make_policy(..., calibration=...))."""

    group: int = 2
    rank: int = 0
    bases: Optional[_Frozen] = None

    def __post_init__(self):
        if self.group < 1:
            raise ValueError(f"group (kv heads merged into one) must be >= 1, got {self.group}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: head_dim), got {self.rank}")

    @staticmethod
    def check(config: ModelConfig, group: int, rank: int) -> None:
        if config.n_kv_heads % group:
            raise ValueError(f"group {group} does not divide the model's {config.n_kv_heads} kv heads")
        if rank > group * config.head_dim:
            raise ValueError(f"rank {rank} exceeds the merged group's {group * config.head_dim} channels")

    @staticmethod
    def from_calibration(params, config: ModelConfig, tokens: Sequence[int], group: int = 2,
                         rank: int = 0) -> "KVHeadMerge":
        """Bases from one forward over the calibration token ids (>= 2 tokens)."""
        from models.llama import forward
        KVHeadMerge(group=group, rank=rank)                                   # range checks first
        KVHeadMerge.check(config, group, rank)
        toks = np.asarray(tokens, np.int32).reshape(-1)
        if toks.size < 2:
            raise ValueError(f"KV-head merging needs calibration tokens (got {toks.size})")
        t = int(toks.size)
        cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        _, _, obs = jax.jit(forward, static_argnames=("config", "observe", "all_logits"))(
            params, jnp.asarray(toks)[None], pos, cache, config, observe=Observe(qkv=True), all_logits=False)
        r = rank or config.head_dim
        bk, bv = calibration_bases(obs["k_pre"], obs["v"], group, r, r)
        return KVHeadMerge(group=group, rank=rank, bases=_Frozen({"k": bk, "v": bv}))

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> HeadMergeCache:
        """new: the gathered stacked cache [L, B, Hkv, S, d] holding every token (post-RoPE keys)."""
        if self.bases is None:
            raise ValueError("KV-head merging needs calibration data: KVHeadMerge.from_calibration(params, config, "
                             "tokens) or make_policy('kv_head_merge', params=, config=, calibration='random'|'kjv')")
        self.check(obs.config, self.group, self.rank)
        bk, bv = self.bases.tree["k"], self.bases.tree["v"]
        n_layers = new.keys.shape[0]
        live = new.positions >= 0
        back = -jnp.maximum(new.positions, 0).reshape((-1,) + new.positions.shape[-2:])   # [L*B, Hkv, S]
        k_pre = apply_rope(new.keys.reshape(back.shape + new.keys.shape[-1:]), back, obs.config).reshape(new.keys.shape)
        dt = new.keys.dtype
        proj = lambda x, b: jnp.stack([project(jnp.where(live[i][..., None], x[i], 0.0), b[i], self.group)
                                       for i in range(n_layers)])
        return HeadMergeCache(latent_k=proj(k_pre, bk).astype(dt), latent_v=proj(new.values, bv).astype(dt),
                              basis_k=bk.astype(dt), basis_v=bv.astype(dt),
                              slot_positions=new.positions[..., ::self.group, :],
                              slot_lengths=new.lengths[..., ::self.group], group=self.group)


def calibration_tokens(calibration, config: ModelConfig, n_tokens: int = 512, seed: int = 0) -> np.ndarray:
    """Calibration ids: "random" (uniform ids, special ids below 100 skipped), "kjv" (the King
    James Bible through the model's tokenizer), or a sequence of token ids."""
    if calibration is None:
        raise ValueError("KV-head merging needs calibration data: calibration='random', 'kjv' or a list of token ids")
    if isinstance(calibration, str) and calibration == "random":
        low = 100 if config.vocab_size > 1000 else 0
        return np.random.default_rng(seed).integers(low, config.vocab_size, n_tokens).astype(np.int32)
    if isinstance(calibration, str) and calibration == "kjv":
        from kvjax.eval.text import kjv_text
        from models.tokenizer import load_tokenizer
        ids = load_tokenizer(config.name).encode(kjv_text(n_chars=8 * n_tokens))
        return np.asarray(ids[:n_tokens], np.int32)
    if isinstance(calibration, str):
        raise ValueError(f"unknown calibration {calibration!r}: 'random', 'kjv' or a list of token ids")
    return np.asarray(calibration, np.int32)
