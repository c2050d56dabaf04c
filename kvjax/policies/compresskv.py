"""CompressKV (Lin et al., 2025, arXiv 2508.02401; TUDa-HWAI/CompressKV): the layer's semantic
retrieval heads choose the tokens every kv head keeps.

Heads (`find_semantic_heads`, after `semantic_retrieval_head_detection.py`): needles hidden in
haystacks; whenever the model emits a needle token, each query head scores the total attention
mass it puts on the needle span, summed over samples; every layer keeps its top `first_k = 4`.
Tokens (`compresskvCluster`): SnapKV window attention (window 8, kernel 5, avg pooling, summed
over the window) computed for the chosen heads only, averaged over them, one top-k index set for
all kv heads of the layer, plus the window.

Layer budgets (`layer_importance` + `error_aware_budgets`, after `pred_get_importance_score.py` and
`pred_compresskv.py::error_aware_layer_budget_allocation`): offline, on calibration samples, each
layer's relative Frobenius error of its attention output after o_proj, compressed (this selection at
a uniform budget C) vs full, summed over the continuation queries and the samples, normalised to sum
1 (`importance`). The budgets are then

    b_l = clip(32 + round(imp_l (L C - 32 L)), 32, 3 C)   then +-1 (most / least important first)
                                                            until sum_l b_l = L C exactly,

and the cache becomes one cache per layer of its own size (`kvjax.layerwise`, as PyramidKV).

Differences, said plainly: detection is teacher-forced (the needle is fed back as the answer and
the queries that predict its tokens are scored) instead of 50 greedy decode steps, on random-id
haystacks; the layer errors are measured on teacher-forced continuations of the calibration text
(the official code greedy-decodes LongBench answers); a budget below 32 tokens uses itself as the
floor (the official floor is 32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.layerwise import from_stacked
from kvjax.policies.base import Observation, PositionsView, newest_mask, protect, select, window_scores
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
    importance: tuple = ()     # per-layer error shares (`layer_importance`); () = uniform budgets
    min_tokens: int = 32
    max_factor: int = 3

    def __post_init__(self):
        super().__post_init__()
        if not self.heads or any(not row for row in self.heads):
            raise ValueError("CompressKV needs its semantic retrieval heads per layer: CompressKV.from_model(params, "
                             "config) or heads=((h, ...), ...)")
        if self.importance:
            imp = np.asarray(self.importance, np.float64)
            if imp.shape != (len(self.heads),) or np.any(imp < 0) or not np.isfinite(imp).all() or imp.sum() <= 0:
                raise ValueError(f"importance must be {len(self.heads)} non-negative layer shares (one per layer), "
                                 f"got {self.importance}")
        if self.min_tokens < 1 or self.max_factor < 1:
            raise ValueError(f"min_tokens and max_factor must be >= 1, got {self.min_tokens}, {self.max_factor}")

    def max_keep(self, n_keep: int, context: int) -> int:
        if not self.importance:
            return n_keep
        return int(min(context, self.max_factor * int(np.max(n_keep))))

    def budgets(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        if not self.importance:
            return self.head_budgets(scores, n_keep)
        b = error_aware_budgets(jnp.asarray(self.importance, jnp.float32), n_keep, self.min_tokens, self.max_factor)
        return jnp.broadcast_to(b[..., None], scores.shape[:3])                  # [L, B, Hkv]

    def finalize(self, new, obs, idx):
        if self.importance and isinstance(new, kvcache.KVCache):
            return from_stacked(new)                                             # each layer at its own budget
        return new

    @staticmethod
    def from_model(params, config: ModelConfig, **kwargs) -> "CompressKV":
        find = {k: kwargs.pop(k) for k in ("first_k", "haystack", "needle", "depths", "seed") if k in kwargs}
        calibration = kwargs.pop("calibration", None)
        calib = {k: kwargs.pop(k) for k in ("calib_tokens", "calib_continuation", "calib_budget") if k in kwargs}
        heads, _ = find_semantic_heads(params, config, **find)
        policy = CompressKV(heads=heads, **kwargs)
        if calibration is None:
            return policy
        samples = calibration_samples(calibration, config, calib.get("calib_tokens", 544),
                                      calib.get("calib_continuation", 32))
        imp = layer_importance(params, config, policy, samples, calib.get("calib_budget", 128))
        return dataclasses.replace(policy, importance=tuple(float(x) for x in imp))

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


def error_aware_budgets(importance: jax.Array, n_keep: jax.Array, min_tokens: int = 32, max_factor: int = 3) -> jax.Array:
    """CompressKV's layer budgets [L, B] from layer shares importance [L] and the uniform budget
    n_keep [B]: b_l = clip(m + round(imp_l (L C - m L)), m, max_factor C) with m = min(min_tokens, C),
    then +1 to the most important layers below the cap (or -1 to the least important above the
    floor), pass after pass, until the layers sum to L C."""
    n_layers = importance.shape[0]
    imp = importance / jnp.sum(importance)
    c = n_keep.astype(jnp.int32)[None, :]                                         # [1, B]
    floor = jnp.minimum(min_tokens, c)
    cap = max_factor * c
    total = n_layers * c[0]
    b = jnp.clip(floor + jnp.round(imp[:, None] * (total[None] - floor * n_layers).astype(jnp.float32)).astype(jnp.int32),
                 floor, cap)                                                      # [L, B]
    down = jnp.argsort(-imp, stable=True)                                         # most important first
    rank_up = jnp.argsort(down)                                                   # rank when adding
    rank_down = jnp.argsort(jnp.argsort(imp, stable=True))                        # rank when removing

    def step(carry):
        b, _ = carry
        diff = total - b.sum(0)                                                   # [B]
        add = diff > 0
        cand = jnp.where(add[None], b < cap, b > floor)                           # [L, B]
        rank = jnp.where(add[None], rank_up[:, None], rank_down[:, None])
        # position among the candidates, in importance order
        order = jnp.where(cand, rank, n_layers + rank)
        pos = jnp.argsort(jnp.argsort(order, axis=0, stable=True), axis=0)
        hit = cand & (pos < jnp.abs(diff)[None])
        b = b + jnp.where(hit, jnp.where(add[None], 1, -1), 0)
        return b, jnp.any(hit)

    def cond(carry):
        b, moved = carry
        return moved & jnp.any(b.sum(0) != total)

    b, _ = jax.lax.while_loop(cond, step, (b, jnp.asarray(True)))
    return b


def calibration_samples(calibration, config: ModelConfig, n_tokens: int = 544, continuation: int = 32) -> list:
    """[(context ids, continuation ids), ...] for `layer_importance`: "random" / "kjv" / one id
    sequence (its last `continuation` ids are the continuation), or such pairs as given."""
    from kvjax.policies.kv_head_merge import calibration_tokens
    if isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], (list, tuple)):
        return [(list(a), list(b)) for a, b in calibration]
    ids = [int(i) for i in calibration_tokens(calibration, config, n_tokens)]
    if not 0 < continuation < len(ids):
        raise ValueError(f"calibration of {len(ids)} tokens cannot hold a {continuation}-token continuation")
    return [(ids[:-continuation], ids[-continuation:])]


def _layer_weight(params, layer: int, name: str):
    layers = params["layers"]
    return layers[layer][name] if isinstance(layers, (tuple, list)) else layers[name][layer]


def layer_importance(params, config: ModelConfig, policy: "CompressKV", samples, budget: int) -> np.ndarray:
    """CompressKV's offline layer shares [L] (sum 1): for every calibration sample (context ids,
    continuation ids), every layer's relative Frobenius error of o_proj(attention output) of each
    continuation query over the kept tokens (this policy's selection at the uniform `budget`, plus
    the continuation so far) vs over the full cache, summed over the queries and the samples.
    Every layer sees the full model's queries and keys (the errors do not propagate)."""
    from models.llama import forward
    if not samples:
        raise ValueError("CompressKV layer budgets need calibration samples: [(context ids, continuation ids), ...]")
    run = jax.jit(forward, static_argnames=("config", "observe", "all_logits"))
    g = config.n_heads // config.n_kv_heads
    n_layers = config.n_layers
    err = np.zeros(n_layers)
    for context, continuation in samples:
        n, c = len(context), len(continuation)
        if c < 1 or n <= budget:
            raise ValueError(f"a calibration sample needs a context longer than the budget ({budget}) and a "
                             f"continuation, got {n} and {c} tokens")
        toks = jnp.asarray(list(context) + list(continuation), jnp.int32)[None]
        t = n + c
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        cache = kvcache.init_cache(n_layers, 1, config.n_kv_heads, t, config.head_dim)
        _, _, obs = run(params, toks, pos, cache, config, observe=Observe(qkv=True), all_logits=False)
        rot = jax.vmap(lambda x: apply_rope(x, pos, config))
        q = rot(obs["q_pre"])[:, 0]                                               # [L, Hq, T, d]
        k = jnp.repeat(rot(obs["k_pre"])[:, 0], g, axis=1)                        # [L, Hq, T, d]
        v = jnp.repeat(obs["v"][:, 0], g, axis=1)
        logits = jnp.einsum("lhqd,lhkd->lhqk", q, k) / np.sqrt(config.head_dim)
        w = policy.window
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]                 # [T, T]
        win = jnp.where(causal[n - w:n, :n], logits[:, :, n - w:n, :n], -jnp.inf)
        probs = jax.nn.softmax(win, axis=-1)                                      # [L, Hq, w, n]
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n_layers, 1, config.n_kv_heads, n))
        view = Observation(cache=PositionsView(positions), config=config, window_probs=probs[:, None],
                           layer=0, n_layers=n_layers)
        scores = policy.score(view)                                               # [L, 1, Hkv, n]
        counts = jnp.full(scores.shape[:3], budget, jnp.int32)
        idx = select(scores, positions >= 0, counts, budget)[:, 0, 0]             # [L, budget] (one set per layer)
        kept = jnp.zeros((n_layers, t), bool).at[jnp.arange(n_layers)[:, None], idx].set(True)
        kept = kept | (jnp.arange(t) >= n)[None]                                  # + the continuation so far
        qc = logits[:, :, n:, :]                                                  # [L, Hq, C, T]
        full = jax.nn.softmax(jnp.where(causal[None, None, n:], qc, -jnp.inf), -1)
        comp = jax.nn.softmax(jnp.where(causal[None, None, n:] & kept[:, None, None], qc, -jnp.inf), -1)
        for layer in range(n_layers):
            wo = _layer_weight(params, layer, "wo").astype(jnp.float32)
            o = lambda p: jnp.einsum("hqk,hkd->qhd", p[layer], v[layer]).reshape(c, -1) @ wo   # [C, d_model]
            of, oc = o(full), o(comp)
            err[layer] += float(jnp.sum(jnp.linalg.norm(oc - of, axis=-1) / (jnp.linalg.norm(of, axis=-1) + 1e-5)))
    return err / err.sum()
