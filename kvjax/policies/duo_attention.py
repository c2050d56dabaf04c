"""DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv 2410.10819; mit-han-lab/duo-attention `duo_attn/utils.py`).

Deployment from a GIVEN per-kv-head pattern (1 = retrieval head, 0 = streaming head), e.g. the
published `full_attention_heads.tsv` or `DuoAttention.from_alphas(alphas, sparsity=0.5)`:
retrieval heads keep the full cache, streaming heads keep the first `sink` tokens and the newest
`recent` (official deployment: sink 64 + recent 256). Applied once after prefill; decode tokens
are appended to every head. Keys stay post-RoPE at their original positions.

How memory is saved: the compressed cache is a `HeadSplitCache` with two dense parts,
    full   [L, B, R,       n + new, d]              R = most retrieval heads in any layer
    stream [L, B, Hkv - R, sink + recent + new, d]
plus a per-layer head map, so a streaming head really holds sink+recent slots. Bytes
~ (R * n + (Hkv - R) * (sink + recent)) / (Hkv * n) of the full cache. R is a maximum over layers
because layers are stacked for `lax.scan`: a layer with fewer retrieval heads puts streaming heads
in its spare full rows (no saving for those), and a model with one layer full of retrieval heads
saves nothing (it then costs about a dense cache: +1 float32 bias per slot).
The Compression budget must be Budget(tokens=sink + recent): it is the streaming heads' budget.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import NEG_INF, attention_mask
from kvjax.policies.base import Observation, ScoringPolicy, oldest_mask


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


def _part(kv: kvcache.KVCache, heads: jax.Array, slots: int) -> kvcache.KVCache:
    """Rows `heads [L, R]` of a stacked cache [L, B, Hkv, S, d], truncated to `slots` (live first)."""
    ok = (heads >= 0)[:, None, :, None]
    pos = jnp.where(ok, _take_heads(kv.positions, heads, 2)[..., :slots], -1)
    return kvcache.KVCache(keys=_take_heads(kv.keys, heads, 2)[..., :slots, :],
                           values=_take_heads(kv.values, heads, 2)[..., :slots, :],
                           positions=pos, lengths=jnp.sum(pos >= 0, axis=-1).astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadSplitCache:
    """Retrieval heads and streaming heads in two dense parts (stacked over layers or one layer).

    full: KVCache [L, B, R, Sf, d]; full_heads [L, R] int32 kv-head of each row (-1 = unused)
    stream: KVCache [L, B, Ss, Sw, d]; stream_heads [L, Ss]
    full_bias [L, B, R, Sf], stream_bias [L, B, Ss, Sw] float32: log-multiplicity added to a slot's
    logit (RazorAttention's compensation token counts |D| times; 0 elsewhere).
    Every kv head has exactly one row; a layer with fewer than R retrieval heads puts streaming
    heads in its spare full rows, so Ss = Hkv - R (the layout is never larger than a dense cache).
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
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self)))

    def append(self, keys, values, positions, keys_pre_rope=None) -> "HeadSplitCache":
        """keys, values [B, Hkv, new, d] (one layer) go to the row of their kv head."""
        def add(part, heads):
            p = kvcache.append(part, _take_heads(keys, heads, 1), _take_heads(values, heads, 1), positions)
            ok = (heads >= 0)[None, :, None]
            return dataclasses.replace(p, positions=jnp.where(ok, p.positions, -1))
        return dataclasses.replace(self, full=add(self.full, self.full_heads),
                                   stream=add(self.stream, self.stream_heads))

    def attend(self, q: jax.Array, query_positions: jax.Array, *, stats, rope=None):
        """q: post-RoPE [B, Hq, T, d] (one layer) -> out [B, Hq, T, dv]; each head attends to its part."""
        if stats.window or stats.column_sums:
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

    def resize(self, capacity: int) -> "HeadSplitCache":
        """Give both parts the same extra room (capacity is the full part's slots)."""
        grow = capacity - self.full.capacity
        sw = self.stream.capacity + grow
        if sw < 1:
            raise ValueError(f"cannot resize a head-split cache to {capacity} slots")
        fit = lambda b, n: jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, max(grow, 0))])[..., :n]
        return dataclasses.replace(self, full=kvcache.resize(self.full, capacity),
                                   full_bias=fit(self.full_bias, capacity),
                                   stream=kvcache.resize(self.stream, sw), stream_bias=fit(self.stream_bias, sw))


def head_maps(pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[L, Hkv] bool (True = retrieval) -> full_heads [L, R], stream_heads [L, Hkv - R] (-1 padded).

    R = most retrieval heads in a layer; a layer's spare full rows take its first streaming heads."""
    n_layers, hkv = pattern.shape
    r = max(1, int(pattern.sum(1).max()))
    full, stream = [], []
    for row in pattern:
        ret, st = list(np.flatnonzero(row)), list(np.flatnonzero(~row))
        spare = r - len(ret)
        full.append(ret + st[:spare])
        stream.append(st[spare:])
    ss = hkv - r            # may be 0: every layer's heads then live in full rows
    pad = lambda xs, n: np.array([np.pad(np.asarray(x, np.int64), (0, n - len(x)), constant_values=-1)
                                  for x in xs], np.int32).reshape(n_layers, n)
    return pad(full, r), pad(stream, ss)


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
    def streaming_slots(self) -> int:
        """Static slots of a streaming head right after compression."""
        return self.sink + self.recent

    def max_keep(self, n_keep: int, context: int) -> int:
        want = min(self.sink + self.recent, context)
        if n_keep != want:
            raise ValueError(f"{type(self).__name__}: streaming heads keep sink + recent = "
                             f"{self.sink + self.recent} tokens; give Budget(tokens={self.sink + self.recent}) "
                             f"(got a budget of {n_keep} of {context} tokens)")
        return context                      # retrieval heads keep everything

    def _check(self, cache) -> None:
        if not isinstance(cache, kvcache.KVCache):
            raise ValueError(f"{type(self).__name__} compresses once, after prefill (when='prefill')")
        if cache.positions.shape[0] != len(self.pattern) or cache.positions.shape[2] != len(self.pattern[0]):
            raise ValueError(f"pattern is [{len(self.pattern)}][{len(self.pattern[0])}] but the cache has "
                             f"{cache.positions.shape[0]} layers x {cache.positions.shape[2]} kv heads")

    def score(self, obs: Observation) -> jax.Array:
        self._check(obs.cache)
        pos = obs.cache.positions
        s = jnp.where(oldest_mask(pos, self.sink), jnp.inf, pos.astype(jnp.float32))
        return jnp.where(obs.cache.valid, s, -jnp.inf)

    def head_budgets(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
        live = jnp.sum(scores > -jnp.inf, axis=-1)                              # [L, B, Hkv]
        ret = jnp.asarray(self.retrieval)[:, None, :]
        return jnp.where(ret, live, jnp.minimum(n_keep[None, :, None], live)).astype(jnp.int32)

    def split(self, new: kvcache.KVCache, extra_stream_slots: int = 0) -> HeadSplitCache:
        full_heads, stream_heads = (jnp.asarray(x) for x in head_maps(self.retrieval))
        sw = min(self.streaming_slots + extra_stream_slots, new.capacity)
        stream, full = _part(new, stream_heads, sw), _part(new, full_heads, new.capacity)
        return HeadSplitCache(full=full, full_heads=full_heads,
                              full_bias=jnp.zeros(full.positions.shape, jnp.float32),
                              stream=stream, stream_heads=stream_heads,
                              stream_bias=jnp.zeros(stream.positions.shape, jnp.float32),
                              kv_heads=new.positions.shape[2])

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx) -> HeadSplitCache:
        return self.split(new)
