"""When and how much a policy compresses: the `Compression` spec used by generate and eval.

    Compression(policy=SnapKV(), budget=Budget(ratio=0.25))               # once, after prefill
    Compression(policy=KNorm(), budget=Budget(tokens=512), when="chunk")   # after every prefill chunk
    Compression(policy=KNorm(), budget=Budget(tokens=512), when="decode", interval=64)

- "prefill": the whole prompt is prefilled, then the cache is compressed once to the budget
  (query-aware when the prompt ends with the question). Peak memory: the full prompt.
- "chunk": after every prefill chunk the cache is compressed back to the budget, so peak memory
  is budget + chunk (Locret-style chunked prefill with eviction).
- "decode": after prefill the cache is compressed to the budget, then every time `interval` new
  tokens have filled the room above it, it is compressed back (kvpress's DecodingPress).

Decode-time observations: a decode step sees one query, so the decode loop keeps a rolling
`QueryBuffer` of the last `decode_window(compression)` queries per layer (post-RoPE for window
scorers, pre-RoPE for ExpectedAttention-style statistics) and, when it compresses, rebuilds the
observation a forward over those queries would have returned (`buffer_observation`): the window
attention of the buffered queries over the current cache under the causal rule (slot position <=
query position). Between two compressions nothing is evicted, so for buffered queries newer than
the last compression these are exactly the probabilities the decode steps computed (kvpress's
DecodingPress similarly buffers hidden states and recomputes the queries).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.cache import KVCache
from kvjax.layerwise import LayerwiseCache
from kvjax.observation import Observation, Observe, Observer, layer_view
from kvjax.policies.base import Budget, ScoringPolicy, compress
from kvjax.ring import policy_config, policy_part, with_policy_part
from models.config import ModelConfig

WHEN = ("prefill", "chunk", "decode")


@dataclasses.dataclass(frozen=True)
class Compression:
    policy: ScoringPolicy
    budget: Budget
    when: str = "prefill"
    interval: int = 64
    demote: Optional[str] = None   # store evicted tokens at low precision instead ("kivi2"; kvjax.quant.demote)

    def __post_init__(self):
        if self.when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {self.when!r}")
        if self.demote is not None and not getattr(self.policy, "demotes", False):
            from kvjax.quant.demote import make_demote
            object.__setattr__(self, "policy", make_demote(self.policy, self.demote))
        if getattr(self.policy, "demotes", False) and self.when != "prefill":
            raise ValueError(f"demotion ({self.policy.name}) runs once after the prefill (when='prefill'), got "
                             f"{self.when!r}: a chunk/decode schedule would re-select a cache whose demoted "
                             f"tokens the policy no longer observes")
        if self.interval <= 0:
            raise ValueError(f"interval must be positive, got {self.interval}")
        if self.when != "prefill" and getattr(self.policy, "prefill_only", False):
            raise ValueError(f"{type(self.policy).__name__} scores the whole prompt in one forward: when must be "
                             f"'prefill', got {self.when!r}")
        if self.when != "prefill" and getattr(self.policy, "ragged", False):
            # ragged final layouts (AdaKV's packed heads, PyramidKV's per-layer caches) cannot be
            # observed and compressed again: chunk/decode schedules keep the padded stacked cache
            object.__setattr__(self, "policy", dataclasses.replace(self.policy, ragged=False))

    @property
    def observe(self) -> Observe:
        """What the layers compute for the policy (+ column sums to accumulate)."""
        o = self.policy.observe
        if self.policy.accumulates and not o.column_sums:
            o = dataclasses.replace(o, column_sums=True)
        return o

    def observer(self, score: bool = True) -> Observer:
        """The forward's in-layer reduction for this policy: scores (when compressing after this
        forward), the running state of accumulating policies, and the window queries ThinK's
        layout needs."""
        w = self.policy.observe.window if type(self.policy).finalize is not ScoringPolicy.finalize else 0
        return Observer(self.policy, score=score, queries=w)

    def decode_observer(self) -> Optional[Observer]:
        """In a decode loop: the step's query (pushed into the QueryBuffer) and, for accumulating
        policies, its column sums; no scores (they are computed from the buffer when compressing)."""
        w = decode_window(self)
        o = self.policy.observe
        if not w and not self.policy.accumulates:
            return None
        return Observer(self.policy, score=False, queries=1 if (w and o.window) else 0,
                        q_pre=1 if (w and o.qkv) else 0)

    def __str__(self):
        if getattr(self.policy, "demotes", False):
            return f"{type(self.policy.policy).__name__}@{self.budget}/{self.when}, evicted->{self.policy.name}"
        return f"{type(self.policy).__name__}@{self.budget}/{self.when}"


WINDOW_FIELDS = ("window", "query_window")   # observation-window hyperparameters (SnapKV, PyramidKV, ThinK)


def shrink_window(policy: ScoringPolicy, window: int) -> ScoringPolicy:
    """`policy` with every observation-window field above `window` set to `window`, also inside
    wrapped policies (AdaKV's scorer, ThinK's token policy). Unchanged (same object) otherwise."""
    changes = {}
    for f in dataclasses.fields(policy):
        v = getattr(policy, f.name)
        if f.name in WINDOW_FIELDS and isinstance(v, int) and v > window:
            changes[f.name] = window
        elif isinstance(v, ScoringPolicy):
            inner = shrink_window(v, window)
            if inner is not v:
                changes[f.name] = inner
    return dataclasses.replace(policy, **changes) if changes else policy


def fit_window(compression: Compression, n_keep: int) -> tuple[Compression, Optional[str]]:
    """The observation window must be smaller than the budget: the window's own tokens are always
    kept, so a window of w >= n_keep tokens would leave no room for scored tokens (and a window as
    long as the context observes nothing to evict). Then the window shrinks to max(1, n_keep // 2)
    -- half the budget for the newest tokens, half for the best-scored older ones -- and a note
    says so. `n_keep`: the smallest kept-token count per head over the batch.
    returns (compression, note or None)."""
    window = compression.policy.observe.window
    if window <= 1 or window < n_keep:
        return compression, None
    w = max(1, n_keep // 2)
    policy = shrink_window(compression.policy, w)
    note = (f"{type(compression.policy).__name__}'s observation window ({window} queries) is not smaller than "
            f"the budget ({n_keep} tokens per head): the window shrinks to {w} (half the budget)")
    return dataclasses.replace(compression, policy=policy), note


@functools.partial(jax.jit, static_argnames=("policy", "config", "capacity", "max_keep"))
def compress_cache(policy: ScoringPolicy, config: ModelConfig, cache, outs: dict, n_keep: jax.Array,
                   capacity: int, max_keep: int, state: Optional[jax.Array] = None):
    """Jitted `policies.base.compress` from a forward's outputs ("scores" [L, B, Hkv, S] reduced in
    the layers, "queries" for ThinK). A model with sliding-window layers: only its global layers
    are compressed (L of them: the forward reduced only theirs; `kvjax.ring`), its rings stay."""
    part = policy_part(cache, config)
    new, state = compress(policy, policy_config(config), part, outs["scores"], n_keep, capacity, max_keep, state,
                          outs.get("queries"))
    return with_policy_part(cache, new, config, rerotated=policy.rerotate), state


# ----------------------------------------------------------------------------------------------
# Decode-time observations: a rolling buffer of the last queries.

@dataclasses.dataclass(frozen=True)
class QueryBuffer:
    """The last `w` decode queries, oldest first (a pytree carried through the decode loop).

    positions [B, w] int32 (-1 = not filled yet / invalidated); q_rot [L, B, Hq, w, d] post-RoPE
    queries (window scorers) or None; q_pre [L, B, Hq, w, d] pre-RoPE queries (qkv scorers) or None."""

    positions: jax.Array
    q_rot: Optional[jax.Array] = None
    q_pre: Optional[jax.Array] = None

    def memory_bytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in (self.positions, self.q_rot, self.q_pre)
                   if x is not None)


jax.tree_util.register_dataclass(QueryBuffer, data_fields=["positions", "q_rot", "q_pre"], meta_fields=[])


def decode_window(compression: Optional[Compression]) -> int:
    """Queries the decode-time observation holds: the policy's window (SnapKV, TOVA, PyramidKV,
    AdaKV); for policies that fit statistics to pre-RoPE queries (ExpectedAttention) at least the
    `interval` queries since the last compression. 0 when nothing needs buffering."""
    if compression is None or compression.when != "decode":
        return 0
    o = compression.policy.observe
    w = o.window
    if o.qkv:
        w = max(w, compression.interval)
    return w


def init_query_buffer(compression: Optional[Compression], config: ModelConfig, batch: int,
                      dtype=jnp.float32) -> Optional[QueryBuffer]:
    """An empty buffer for `compression`'s decode-time observation (None if it needs none)."""
    w = decode_window(compression)
    if w == 0:
        return None
    o = compression.policy.observe
    shape = (config.n_layers, batch, config.n_heads, w, config.head_dim)
    return QueryBuffer(positions=jnp.full((batch, w), -1, jnp.int32),
                       q_rot=jnp.zeros(shape, dtype) if o.window else None,
                       q_pre=jnp.zeros(shape, dtype) if o.qkv else None)


def push_query(buf: Optional[QueryBuffer], outs: dict, pos: jax.Array) -> Optional[QueryBuffer]:
    """Append one decode step's query (outputs of a 1-token forward; pos [B]) and drop the oldest."""
    if buf is None:
        return None

    def roll(x, new):
        return jnp.concatenate([x[..., 1:, :], new.astype(x.dtype)], axis=-2)

    return QueryBuffer(
        positions=jnp.concatenate([buf.positions[:, 1:], pos[:, None].astype(jnp.int32)], axis=1),
        q_rot=roll(buf.q_rot, outs["queries"][..., -1:, :]) if buf.q_rot is not None else None,
        q_pre=roll(buf.q_pre, outs["queries_pre"][..., -1:, :]) if buf.q_pre is not None else None)


def window_attention(layer, q_rot: jax.Array, q_positions: jax.Array) -> jax.Array:
    """Attention probabilities of the queries `q_rot [B, Hq, w, d]` (post-RoPE, positions
    `q_positions [B, w]`, -1 = none) over one layer's cache slots, causal by position, float32
    softmax with scale 1/sqrt(d) (as `kvjax.attention.attend`): [B, Hq, w, S]; rows of absent
    queries and masked slots are 0."""
    b, hq, w, d = q_rot.shape
    if not isinstance(layer, KVCache) or layer.keys.shape[-1] != d:
        raise ValueError(f"decode-time compression observes a dense KVCache with keys [B, Hkv, S, {d}]; a "
                         f"{type(layer).__name__} (e.g. ThinK's pruned keys) cannot be compressed again")
    keys = layer.keys
    hkv = keys.shape[1]
    q = q_rot.reshape(b, hkv, hq // hkv, w, d).astype(jnp.float32)
    logits = jnp.einsum("bhgwd,bhsd->bhgws", q, keys.astype(jnp.float32)) * d ** -0.5
    sp = layer.positions[:, :, None, None, :]
    mask = (sp >= 0) & (sp <= q_positions[:, None, None, :, None])
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    return probs.reshape(b, hq, w, -1)


def buffer_scores(policy: ScoringPolicy, config: ModelConfig, cache: LayerwiseCache, buf: Optional[QueryBuffer],
                  state: Optional[jax.Array]) -> jax.Array:
    """The policy's scores [L, B, Hkv, S] from the buffered queries' observation over the cache as
    it is now, computed layer by layer (what a forward over those queries would have reduced)."""
    scores = []
    for i, layer in enumerate(cache.layers):
        obs = Observation(cache=layer_view(layer), config=config, layer=i, n_layers=len(cache.layers),
                          accumulated=None if state is None else state[i:i + 1])
        if buf is not None and buf.q_rot is not None:
            obs = dataclasses.replace(obs, window_probs=window_attention(layer, buf.q_rot[i], buf.positions)[None],
                                      window_queries=buf.q_rot[i:i + 1])
        if buf is not None and buf.q_pre is not None:
            obs = dataclasses.replace(obs, q_pre=buf.q_pre[i:i + 1])
        scores.append(policy.score(obs)[0].astype(jnp.float32))
    return jnp.stack(scores)


def decode_compress(compression: Compression, config: ModelConfig, cache: LayerwiseCache, state,
                    buf: Optional[QueryBuffer], n_keep: jax.Array, max_keep: int):
    """Inside a decode loop: if a head's slots are full, compress back to `n_keep` [B] tokens per
    head using the buffered queries' observation. Re-rotating policies invalidate the buffer
    (its queries were rotated at positions that no longer exist). returns (cache, state, buf)."""
    policy = compression.policy
    whole, cache = cache, policy_part(cache, config)       # a model's sliding-window rings stay as they are
    pconfig = policy_config(config)
    if not isinstance(cache, LayerwiseCache) or not cache.uniform:
        raise ValueError(f"decode-time compression observes per-layer dense caches; a {type(cache).__name__} "
                         f"(e.g. ThinK's pruned keys, a ragged final layout) cannot be compressed again")

    def squeeze(c, s, b):
        from kvjax.quant.evicted import dense_view
        c, back = dense_view(c)   # quantized layers: dequantized, compressed, requantized (kvjax.quant.evicted)
        scores = buffer_scores(policy, pconfig, c, b, s)
        c2, s2 = compress(policy, pconfig, c, scores, n_keep, c.capacity, max_keep, s)
        c2 = back(c2)
        if b is not None and policy.rerotate:
            b = dataclasses.replace(b, positions=jnp.full_like(b.positions, -1))
        return c2, s2, b

    full = jnp.max(cache.lengths) >= cache.capacity
    cache, state, buf = jax.lax.cond(full, squeeze, lambda c, s, b: (c, s, b), cache, state, buf)
    return with_policy_part(whole, cache, config, rerotated=policy.rerotate), state, buf
