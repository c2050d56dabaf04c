"""DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv 2410.10819; mit-han-lab/duo-attention `duo_attn/utils.py`).

Deployment from a GIVEN per-kv-head pattern (1 = retrieval head, 0 = streaming head), e.g. the
published `full_attention_heads.tsv` or `DuoAttention.from_alphas(alphas, sparsity=0.5)`:
retrieval heads keep the full cache, streaming heads keep the first `sink` tokens and the newest
ones (official deployment: sink 64 + recent 256). Applied once after prefill; decode tokens are
appended to every head. Keys stay post-RoPE at their original positions.

Budget: the Compression budget (ratio or tokens) is what a STREAMING head keeps: its first
min(sink, n_keep) tokens and the newest n_keep - sink. Budget(tokens=sink + recent) is the
official deployment (`policy.default_budget`); any other budget (e.g. a ratio in an eval grid)
keeps sink + (n_keep - sink) recent tokens. Retrieval heads keep everything.

How memory is saved: the compressed cache is a `kvjax.layerwise.LayerwiseCache` of one
`HeadSplitCache` per layer with exactly that layer's R_l retrieval rows and Hkv - R_l streaming rows:
    full   [B, R_l,       n + new, d]
    stream [B, Hkv - R_l, n_keep + new, d]
plus a per-slot float32 logit bias (RazorAttention's compensation token) and the row -> kv-head
maps. After generate's `resize` the bytes are sum_l (R_l n + (Hkv - R_l) n_keep) (+ new per row)
over L Hkv n for the full cache (+ ~1% for the bias). Layers are run by an unrolled loop.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import NEG_INF, attention_mask
from kvjax.layerwise import LayerwiseCache, fit_kv
from kvjax.policies.base import Budget, Observation, ScoringPolicy, oldest_mask


def _take_heads(x: jax.Array, heads: jax.Array, axis: int) -> jax.Array:
    """Gather kv heads along `axis` with `heads [(L,) R]` (-1 -> head 0; callers mask those rows)."""
    safe = jnp.clip(heads, 0, None)
    shape = [1] * x.ndim
    if heads.ndim == 2:            # stacked over layers: heads [L, R], x [L, B, H, ...]
        shape[0] = heads.shape[0]
    shape[axis] = heads.shape[-1]
    idx = safe.reshape(shape)
    idx = jnp.broadcast_to(idx, x.shape[:axis] + (heads.shape[-1],) + x.shape[axis + 1:])
    return jnp.take_along_axis(x, idx, axis=axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadSplitCache:
    """One layer's retrieval heads and streaming heads in two dense parts.

    full: KVCache [B, R, Sf, d]; full_heads [R] int32 kv-head of each row
    stream: KVCache [B, Ss, Sw, d]; stream_heads [Ss] (R + Ss = Hkv; either may be 0)
    full_bias [B, R, Sf], stream_bias [B, Ss, Sw] float32: log-multiplicity added to a slot's
    logit (RazorAttention's compensation token counts |D| times; 0 elsewhere).
    Layers differ in R, so a model's cache is a `LayerwiseCache` of these (see the module doc).
    """

    full: kvcache.KVCache
    full_heads: jax.Array
    full_bias: jax.Array
    stream: kvcache.KVCache
    stream_heads: jax.Array
    stream_bias: jax.Array
    kv_heads: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def capacity(self) -> int:
        return self.full.capacity

    def _per_head(self, full_x, stream_x):
        eye = jnp.arange(self.kv_heads)
        of = (self.full_heads[..., None] == eye).astype(full_x.dtype)         # [(L,) R, Hkv]
        os_ = (self.stream_heads[..., None] == eye).astype(stream_x.dtype)
        return (jnp.einsum("...br,...rh->...bh", full_x, of)
                + jnp.einsum("...br,...rh->...bh", stream_x, os_))

    @property
    def lengths(self) -> jax.Array:
        """[..., B, Hkv] live tokens per kv head."""
        return self._per_head(self.full.lengths, self.stream.lengths).astype(jnp.int32)

    @property
    def positions(self) -> jax.Array:
        """[..., B, R + Ss, max(Sf, Sw)] positions of both parts (rows are not kv heads)."""
        s = max(self.full.capacity, self.stream.capacity)
        pad = lambda p: jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, s - p.shape[-1])], constant_values=-1)
        return jnp.concatenate([pad(self.full.positions), pad(self.stream.positions)], axis=-2)

    def memory_bytes(self) -> int:
        return kvcache.tree_bytes(self)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "HeadSplitCache":
        """keys, values [B, Hkv, new, d] (one layer) go to the row of their kv head."""
        def add(part, heads):
            p = kvcache.append(part, _take_heads(keys, heads, 1), _take_heads(values, heads, 1), positions)
            ok = (heads >= 0)[None, :, None]
            return dataclasses.replace(p, positions=jnp.where(ok, p.positions, -1))
        return dataclasses.replace(self, full=add(self.full, self.full_heads),
                                   stream=add(self.stream, self.stream_heads))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, observe, backend="auto", rope=None):
        """q: post-RoPE [B, Hq, T, d] (one layer) -> out [B, Hq, T, dv]; each head attends to its part."""
        if observe.window or observe.column_sums:
            raise ValueError("a head-split (DuoAttention/RazorAttention) cache does not report attention "
                             "statistics: it cannot be compressed again")
        b, hq, t, d = q.shape
        g = hq // self.kv_heads
        qg = q.reshape(b, self.kv_heads, g, t, d).astype(jnp.float32)
        out = jnp.zeros((b, self.kv_heads, g, t, self.full.values.shape[-1]), jnp.float32)

        def part_out(part, heads, bias):
            qp = _take_heads(qg, heads, 1)                                       # [B, R, G, T, d]
            logits = jnp.einsum("brgtd,brsd->brgts", qp, part.keys.astype(jnp.float32)) * d ** -0.5
            if bias is not None:
                logits = logits + bias[:, :, None, None, :]
            mask = attention_mask(part.positions, query_positions)[:, :, None]
            probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
            probs = jnp.where(mask, probs, 0.0)
            return jnp.einsum("brgts,brsv->brgtv", probs, part.values.astype(jnp.float32))

        dest = lambda heads: jnp.where(heads >= 0, heads, self.kv_heads)        # unused rows dropped
        out = out.at[:, dest(self.full_heads)].set(part_out(self.full, self.full_heads, self.full_bias),
                                                   mode="drop")
        out = out.at[:, dest(self.stream_heads)].set(
            part_out(self.stream, self.stream_heads, self.stream_bias), mode="drop")
        return out.reshape(b, hq, t, -1).astype(q.dtype), {}

    def fit(self, room: int) -> "HeadSplitCache":
        """Eager, one layer: each part at its live tokens + `room` free slots per row."""
        def fit_part(part, bias):
            part = fit_kv(part, room)
            size = part.capacity
            w = [(0, 0)] * (bias.ndim - 1) + [(0, max(size - bias.shape[-1], 0))]
            return part, jnp.pad(bias, w)[..., :size]
        full, full_bias = fit_part(self.full, self.full_bias)
        stream, stream_bias = fit_part(self.stream, self.stream_bias)
        return dataclasses.replace(self, full=full, full_bias=full_bias, stream=stream, stream_bias=stream_bias)


@dataclasses.dataclass(frozen=True)
class DuoAttention(ScoringPolicy):
    """pattern: [L][Hkv] of 0/1 (1 = retrieval head: full cache); sink/recent: streaming heads'
    sinks and recent window (official deployment 64 / 256)."""

    pattern: tuple[tuple[int, ...], ...] = ()
    sink: int = 64
    recent: int = 256

    def __post_init__(self):
        if not self.pattern or any(len(r) != len(self.pattern[0]) for r in self.pattern):
            raise ValueError("DuoAttention needs a rectangular per-kv-head pattern [layers][kv_heads] of 0/1")
        if any(v not in (0, 1) for r in self.pattern for v in r):
            raise ValueError("pattern entries must be 0 (streaming) or 1 (retrieval)")
        if self.sink < 0 or self.recent <= 0:
            raise ValueError(f"need sink >= 0 and recent > 0, got {self.sink}, {self.recent}")

    @staticmethod
    def from_alphas(alphas: Sequence[Sequence[float]], sparsity: Optional[float] = None,
                    threshold: float = 0.5, **kwargs) -> "DuoAttention":
        """Official `sparsify_attention_heads`: alpha clipped to [0, 1]; retrieval heads are those
        with alpha >= quantile(alpha, sparsity) (or >= threshold when no sparsity is given)."""
        a = np.clip(np.asarray(alphas, np.float64), 0.0, 1.0)
        if sparsity is not None:
            if not 0 <= sparsity <= 1:
                raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
            threshold = np.quantile(a, sparsity)
        pat = tuple(tuple(int(v >= threshold) for v in row) for row in a)
        return DuoAttention(pattern=pat, **kwargs)

    @property
    def retrieval(self) -> np.ndarray:
        return np.asarray(self.pattern, bool)

    @property
    def default_budget(self) -> Budget:
        """The deployment budget of the paper / official code: Budget(tokens=sink + recent)."""
        return Budget(tokens=self.sink + self.recent)

    def max_keep(self, n_keep: int, context: int) -> int:
        """Retrieval heads keep the whole context (streaming heads keep n_keep, see the module doc)."""
        return context

    def _check(self, obs: Observation) -> None:
        if not isinstance(obs.cache, kvcache.KVCache):
            raise ValueError(f"{type(self).__name__} compresses once, after prefill (when='prefill')")
        if obs.n_layers != len(self.pattern) or obs.cache.positions.shape[2] != len(self.pattern[0]):
            raise ValueError(f"pattern is [{len(self.pattern)}][{len(self.pattern[0])}] but the model has "
                             f"{obs.n_layers} layers x {obs.cache.positions.shape[2]} kv heads")

    def score(self, obs: Observation) -> jax.Array:
        self._check(obs)
        pos = obs.cache.positions
        s = jnp.where(oldest_mask(pos, self.sink), jnp.inf, pos.astype(jnp.float32))
        return jnp.where(obs.cache.valid, s, -jnp.inf)

    def head_budgets(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
        live = jnp.sum(scores > -jnp.inf, axis=-1)                              # [L, B, Hkv]
        ret = jnp.asarray(self.retrieval)[:, None, :]
        return jnp.where(ret, live, jnp.minimum(n_keep[None, :, None], live)).astype(jnp.int32)

    def split(self, new: kvcache.KVCache) -> LayerwiseCache:
        """The gathered cache [L, B, Hkv, S, d] -> one HeadSplitCache per layer with exactly its
        retrieval / streaming rows (both parts at S slots here; generate's `resize` trims them)."""
        layers = []
        for l, row in enumerate(self.retrieval):
            ret, st = np.flatnonzero(row), np.flatnonzero(~row)
            part = lambda heads: jax.tree_util.tree_map(lambda x: x[l][:, heads], new)
            full, stream = part(ret), part(st)
            layers.append(HeadSplitCache(
                full=full, full_heads=jnp.asarray(ret, jnp.int32), full_bias=jnp.zeros(full.positions.shape, jnp.float32),
                stream=stream, stream_heads=jnp.asarray(st, jnp.int32),
                stream_bias=jnp.zeros(stream.positions.shape, jnp.float32), kv_heads=len(row)))
        return LayerwiseCache(layers=tuple(layers), capacity=new.capacity)

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> LayerwiseCache:
        return self.split(new)
