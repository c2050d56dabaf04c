"""RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads", arXiv 2407.15891). No public code: written from the paper and the spec (tagged [unverified]).

1. Retrieval heads, found data-free (`find_retrieval_heads`): feed a random token sequence repeated
   several times through the real model; for every query token of a repetition,
     echo      = attention to the earlier copies of the same token,
     induction = attention to the token FOLLOWING each earlier copy,
   averaged over queries. The top `induction_frac` (~14%) query heads by induction and the top
   `echo_frac` (~1%) by echo are protected; a kv head is a retrieval head if any of its query
   heads is (the cache is per kv head).
2. Retrieval heads keep the full cache; the other heads keep `sink` + the newest `recent` tokens
   (paper: a buffer of about max(4000, n/5) tokens, `recent_for(n)`).
3. Compensation token: the dropped set D of each non-retrieval head is replaced by ONE extra slot
   k^ = mean_D k, v^ = mean_D v counted |D| times in the softmax (logit q k^/sqrt(d) + ln|D|),
   at position max(D) so every later query sees it.
Layout, memory and budget: as DuoAttention (a `LayerwiseCache` of per-layer `HeadSplitCache`s; the
compensation slot is one extra slot of a streaming head's row, its ln|D| in the part's bias array).
Applied once, after prefill. The Compression budget is what a non-retrieval head keeps: sink +
(budget - sink) newest; Budget(tokens=sink + recent) is the paper's setting.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.layerwise import LayerwiseCache
from kvjax.policies.base import Observation
from kvjax.policies.duo_attention import DuoAttention, _take_heads
from models.config import ModelConfig
from models.rope import apply_rope
from kvjax.observation import Observe
from models.llama import forward


def copy_masks(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, T] float masks for one sequence: echo[t, s] = tokens[s] == tokens[t] and s < t;
    induction[t, s] = echo[t, s - 1] (the token after an earlier copy), s < t."""
    t = len(tokens)
    same = (tokens[:, None] == tokens[None, :]) & np.tri(t, k=-1, dtype=bool)
    ind = np.zeros_like(same)
    ind[:, 1:] = same[:, :-1]
    ind &= np.tri(t, k=-1, dtype=bool)
    return same.astype(np.float32), ind.astype(np.float32)


def head_scores(probs: np.ndarray, tokens: np.ndarray, first_query: int) -> tuple[np.ndarray, np.ndarray]:
    """Echo and induction scores [L, Hq] from attention probabilities [L, Hq, T, T] (one sequence),
    averaged over queries t >= first_query (the repetitions)."""
    echo, ind = copy_masks(tokens)
    p = probs[:, :, first_query:]
    return ((p * echo[first_query:]).sum(-1).mean(-1), (p * ind[first_query:]).sum(-1).mean(-1))


def select_heads(echo: np.ndarray, induction: np.ndarray, kv_heads: int, echo_frac: float,
                 induction_frac: float) -> tuple[tuple[int, ...], ...]:
    """Top query heads by induction / echo -> [L][Hkv] pattern (1 = retrieval kv head)."""
    n_layers, hq = echo.shape
    chosen = np.zeros(echo.size, bool)
    for score, frac in ((induction, induction_frac), (echo, echo_frac)):
        k = int(math.ceil(frac * score.size))
        if k:
            chosen[np.argsort(-score.ravel(), kind="stable")[:k]] = True
    chosen = chosen.reshape(n_layers, kv_heads, hq // kv_heads).any(-1)
    return tuple(tuple(int(v) for v in row) for row in chosen)


def find_retrieval_heads(params, config: ModelConfig, segment: int = 64, repeats: int = 4, seed: int = 0,
                         echo_frac: float = 0.01, induction_frac: float = 0.14):
    """Data-free retrieval-head search on the real model.

    A random segment of `segment` distinct token ids is repeated `repeats` times (one forward of
    segment * repeats tokens, all attention probabilities observed).
    returns (pattern [L][Hkv] tuple of 0/1, echo [L, Hq], induction [L, Hq])."""
    if segment < 2 or repeats < 2:
        raise ValueError(f"need segment >= 2 and repeats >= 2, got {segment}, {repeats}")
    rng = np.random.default_rng(seed)
    low = 100 if config.vocab_size > 1000 else 0           # skip special/control ids
    seg = rng.choice(np.arange(low, config.vocab_size), size=segment, replace=False)
    toks = np.tile(seg, repeats).astype(np.int32)
    t = len(toks)
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    _, _, obs = jax.jit(forward, static_argnames=("config", "observe", "all_logits"))(
        params, jnp.asarray(toks)[None], pos, cache, config, observe=Observe(qkv=True), all_logits=False)
    # causal attention probabilities of the calibration sequence from the layers' q/k (float64)
    rot = jax.vmap(lambda x: apply_rope(x, pos, config))
    q = np.asarray(rot(obs["q_pre"]), np.float64)[:, 0]                        # [L, Hq, T, d]
    k = np.asarray(rot(obs["k_pre"]), np.float64)[:, 0]                        # [L, Hkv, T, d]
    k = np.repeat(k, config.n_heads // config.n_kv_heads, axis=1)
    logits = np.einsum("lhtd,lhsd->lhts", q, k) / np.sqrt(config.head_dim)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)                                      # [L, Hq, T, T]
    echo, ind = head_scores(probs, toks, segment)
    return select_heads(echo, ind, config.n_kv_heads, echo_frac, induction_frac), echo, ind


@dataclasses.dataclass(frozen=True)
class RazorAttention(DuoAttention):
    """pattern from `find_retrieval_heads`; sink (4) + recent (paper ~max(4000, n/5)) for the other
    heads; compensation: add the compensation token."""

    sink: int = 4
    recent: int = 4000
    compensation: bool = True

    @staticmethod
    def recent_for(context: int) -> int:
        """The paper's buffer for a context of n tokens: max(4000, n/5) [unverified]."""
        return max(4000, context // 5)

    @staticmethod
    def from_model(params, config: ModelConfig, **kwargs) -> "RazorAttention":
        find = {k: kwargs.pop(k) for k in ("segment", "repeats", "seed", "echo_frac", "induction_frac")
                if k in kwargs}
        pattern, _, _ = find_retrieval_heads(params, config, **find)
        return RazorAttention(pattern=pattern, **kwargs)

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> LayerwiseCache:
        out = self.split(new)
        if not self.compensation:
            return out
        return add_compensation(out, obs.cache, idx)


def add_compensation(split: LayerwiseCache, old: kvcache.KVCache, idx: jax.Array) -> LayerwiseCache:
    """Write each streaming head's compensation token (mean of its dropped keys/values, logit bias
    ln|D|, position max(D)) into the first free slot of its row.

    split: per-layer HeadSplitCaches; old: the cache before compression [L, B, Hkv, S, d];
    idx: kept slots [L, B, Hkv, K] (-1 = none)."""
    s_old = old.capacity
    lead = idx.shape[:3]
    grid = jnp.meshgrid(*(jnp.arange(n) for n in lead), indexing="ij")
    i0, i1, i2 = (jnp.broadcast_to(x[..., None], idx.shape) for x in grid)
    kept = jnp.zeros(lead + (s_old + 1,), bool)
    kept = kept.at[i0, i1, i2, jnp.where(idx >= 0, idx, s_old)].set(True)[..., :s_old]
    dropped = old.valid & ~kept                                                   # [L, B, Hkv, S]
    cnt = dropped.sum(-1)                                                         # [L, B, Hkv]
    w = dropped[..., None].astype(jnp.float32)
    denom = jnp.maximum(cnt, 1)[..., None].astype(jnp.float32)
    k_hat = (old.keys.astype(jnp.float32) * w).sum(-2) / denom                   # [L, B, Hkv, d]
    v_hat = (old.values.astype(jnp.float32) * w).sum(-2) / denom
    p_hat = jnp.max(jnp.where(dropped, old.positions, -1), axis=-1)

    def write_part(part: kvcache.KVCache, heads: jax.Array, bias: jax.Array, l: int):
        take = lambda x: _take_heads(x[l], heads, 1)                               # rows of this part
        kh, vh, ph, c = take(k_hat), take(v_hat), take(p_hat), take(cnt)
        write = (jnp.arange(part.capacity) == part.lengths[..., None]) & (c > 0)[..., None]  # [B, rows, slots]
        new = kvcache.KVCache(
            keys=jnp.where(write[..., None], kh[..., None, :].astype(part.keys.dtype), part.keys),
            values=jnp.where(write[..., None], vh[..., None, :].astype(part.values.dtype), part.values),
            positions=jnp.where(write, ph[..., None], part.positions),
            lengths=part.lengths + write.any(-1).astype(jnp.int32))
        return new, jnp.where(write, jnp.log(jnp.maximum(c, 1).astype(jnp.float32))[..., None], bias)

    # retrieval heads drop nothing (cnt = 0): only streaming heads get a token
    layers = []
    for l, lc in enumerate(split.layers):
        full, full_bias = write_part(lc.full, lc.full_heads, lc.full_bias, l)
        stream, stream_bias = write_part(lc.stream, lc.stream_heads, lc.stream_bias, l)
        layers.append(dataclasses.replace(lc, full=full, full_bias=full_bias, stream=stream, stream_bias=stream_bias))
    return dataclasses.replace(split, layers=tuple(layers))
