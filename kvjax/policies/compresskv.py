"""CompressKV (Lin et al., 2025, arXiv 2508.02401; TUDa-HWAI/CompressKV): the layer's semantic
retrieval heads choose the tokens every kv head keeps.

Heads (`find_semantic_heads`, after `semantic_retrieval_head_detection.py`): needles hidden in
haystacks; whenever the model emits a needle token, each query head scores the total attention
mass it puts on the needle span, summed over samples; every layer keeps its top `first_k = 4`.
Tokens (`compresskvCluster`): SnapKV window attention (window 8, kernel 5, avg pooling, summed
over the window) computed for the chosen heads only, averaged over them, one top-k index set for
all kv heads of the layer, plus the window.

Differences, said plainly: detection is teacher-forced (the needle is fed back as the answer and
the queries that predict its tokens are scored) instead of 50 greedy decode steps, on random-id
haystacks; the offline error-aware layer budgets are not built (uniform budget per layer).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.policies.base import Observation, newest_mask, protect, window_scores
from kvjax.policies.snapkv import SnapKV, pool1d
from models.config import ModelConfig
from models.rope import apply_rope


def needle_scores(probs: np.ndarray, answer_rows: np.ndarray, needle: slice) -> np.ndarray:
    """Attention mass on the needle span: probs [L, Hq, A, T] of the A answer queries -> [L, Hq]."""
    return probs[:, :, answer_rows, needle].sum(axis=(-1, -2))


def top_heads(scores: np.ndarray, first_k: int) -> tuple[tuple[int, ...], ...]:
    """Per layer, the `first_k` highest-scoring query heads (sorted ids; ties -> lower id)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :first_k]
    return tuple(tuple(sorted(int(h) for h in row)) for row in order)


def niah_sample(rng: np.random.Generator, vocab: int, haystack: int, needle: int, depth: float):
    """Random-id haystack with a needle at `depth`, then the needle again as the answer:
    (tokens [T], needle slice, answer query rows [needle]: the queries that predict its tokens)."""
    low = 100 if vocab > 1000 else 0
    hay = rng.integers(low, vocab, haystack)
    ndl = rng.integers(low, vocab, needle)
    at = int(depth * haystack)
    toks = np.concatenate([hay[:at], ndl, hay[at:], ndl]).astype(np.int32)
    first_answer = haystack + needle
    return toks, slice(at, at + needle), np.arange(first_answer - 1, first_answer + needle - 1)


def find_semantic_heads(params, config: ModelConfig, first_k: int = 4, haystack: int = 192, needle: int = 16,
                        depths=(0.2, 0.5, 0.8), seed: int = 0):
    """Per-layer top `first_k` query heads by needle attention mass over `depths` samples:
    (heads [L][first_k], scores [L, Hq])."""
    from models.llama import forward
    if not 0 < first_k <= config.n_heads:
        raise ValueError(f"first_k must be in [1, {config.n_heads}] (query heads per layer), got {first_k}")
    if haystack < 2 or needle < 1:
        raise ValueError(f"need haystack >= 2 and needle >= 1 tokens, got {haystack}, {needle}")
    rng = np.random.default_rng(seed)
    total = np.zeros((config.n_layers, config.n_heads))
    run = jax.jit(forward, static_argnames=("config", "observe", "all_logits"))
    g = config.n_heads // config.n_kv_heads
    for depth in depths:
        toks, span, rows = niah_sample(rng, config.vocab_size, haystack, needle, depth)
        t = len(toks)
        cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        _, _, obs = run(params, jnp.asarray(toks)[None], pos, cache, config, observe=Observe(qkv=True),
                        all_logits=False)
        rot = jax.vmap(lambda x: apply_rope(x, pos, config))
        q = np.asarray(rot(obs["q_pre"]), np.float64)[:, 0][:, :, rows]             # [L, Hq, A, d]
        k = np.repeat(np.asarray(rot(obs["k_pre"]), np.float64)[:, 0], g, axis=1)   # [L, Hq, T, d]
        logits = np.einsum("lhad,lhtd->lhat", q, k) / np.sqrt(config.head_dim)
        logits = np.where(np.arange(t)[None, :] <= rows[:, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        total += needle_scores(probs, np.arange(len(rows)), span)
    return top_heads(total, first_k), total


@dataclasses.dataclass(frozen=True)
class CompressKV(SnapKV):
    """window 8, kernel 5, avg pooling (compresskvCluster); heads: per layer the semantic
    retrieval query heads (`find_semantic_heads`, first_k = 4 per layer)."""

    window: int = 8
    kernel: int = 5
    pool: str = "avg"
    heads: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.heads or any(not row for row in self.heads):
            raise ValueError("CompressKV needs its semantic retrieval heads per layer: CompressKV.from_model(params, "
                             "config) or heads=((h, ...), ...)")

    @staticmethod
    def from_model(params, config: ModelConfig, **kwargs) -> "CompressKV":
        find = {k: kwargs.pop(k) for k in ("first_k", "haystack", "needle", "depths", "seed") if k in kwargs}
        heads, _ = find_semantic_heads(params, config, **find)
        return CompressKV(heads=heads, **kwargs)

    def head_weights(self, n_heads: int) -> np.ndarray:
        """[n_layers, Hq] float32: 1 / |heads_l| on layer l's chosen heads, else 0."""
        w = np.zeros((len(self.heads), n_heads), np.float32)
        for layer, row in enumerate(self.heads):
            if max(row) >= n_heads or min(row) < 0:
                raise ValueError(f"CompressKV head {max(row)} of layer {layer} out of range for {n_heads} query heads")
            w[layer, list(row)] = 1.0 / len(row)
        return w

    def score(self, obs: Observation) -> jax.Array:
        s = window_scores(obs, self.window)                                       # [L', B, Hq, S]
        n_layers, hkv = len(self.heads), obs.cache.positions.shape[2]
        if obs.n_layers != n_layers:
            raise ValueError(f"CompressKV has heads for {n_layers} layers, the model has {obs.n_layers}")
        w = jnp.take(jnp.asarray(self.head_weights(s.shape[2])), obs.layer + jnp.arange(s.shape[0]), axis=0)
        s = jnp.einsum("lh,lbhs->lbs", w, s)                                      # mean over the chosen heads
        recent = newest_mask(obs.cache.positions, self.window)                    # [L', B, Hkv, S]
        s = pool1d(jnp.where(recent[:, :, 0], 0.0, s), self.kernel, self.pool)
        return protect(jnp.broadcast_to(s[:, :, None], recent.shape), recent)     # one index set per layer
