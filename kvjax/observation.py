"""What a compression policy sees of the model, reduced inside the layer loop.

    Observe        static request: which attention statistics / projections a layer computes
    Observation    what a policy's `score` / `accumulate` receives for ONE layer
    Observer       static: the policy whose observation the forward reduces, layer by layer

A policy never sees attention probabilities of all layers at once: inside each layer the model
builds that layer's `Observation` (window attention `[1, B, Hq, w, S]`, column sums, the layer's
cache, ...) and calls the policy's `score` (and `accumulate`), so what leaves the layer is a
score per slot `[B, Hkv, S]` (stacked to `[L, B, Hkv, S]` over layers) -- never an array with
both a layers axis and a window x slots axis. The arrays of an `Observation` keep a leading
layers axis of size 1, so a policy's code is the same whether it is given one layer or a stack.

This module imports nothing else of kvjax, so attention, caches and policies can all use it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Observe:
    """What a layer computes for a policy (static flags; hashable).

    window: attention probabilities of the last `window` new queries over the cache slots
            (window_probs `[B, Hq, w, S]`), plus their post-RoPE queries.
    column_sums: attention mass each slot received from all new queries (`[B, Hq, S]`, H2O).
    qkv: pre-RoPE projections of the new tokens (q_pre, k_pre, v).
    hidden: the layer's input hidden states.
    """

    window: int = 0
    column_sums: bool = False
    qkv: bool = False
    hidden: bool = False

    @property
    def attention(self) -> "Observe":
        """The part attention itself must return (window probabilities, column sums)."""
        return Observe(window=self.window, column_sums=self.column_sums)

    @property
    def wants_attention(self) -> bool:
        return bool(self.window or self.column_sums)

    def __or__(self, other: "Observe") -> "Observe":
        return Observe(window=max(self.window, other.window), column_sums=self.column_sums or other.column_sums,
                       qkv=self.qkv or other.qkv, hidden=self.hidden or other.hidden)


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a policy sees (arrays carry a leading layers axis: 1 inside the layer loop).

    cache: the layer's cache after the new tokens were appended (keys post-RoPE
           `[L, B, Hkv, S, d]`, positions `[L, B, Hkv, S]`), or a positions-only view.
    window_probs `[L, B, Hq, w, S]`, window_queries `[L, B, Hq, w, d]`, column_sums `[L, B, Hq, S]`,
    q_pre `[L, B, Hq, T, d]`, k_pre / v `[L, B, Hkv, T, d]` of the tokens of this forward,
    hidden `[L, B, T, d_model]`, accumulated `[L, B, Hkv, S]`: the running per-slot score of
    accumulating policies; scores `[L, B, Hkv, S]`: the selection scores (after `adjust_scores`),
    given only to `finalize` (demotion ranks the evicted tokens by them). layer: index of the (first) layer these arrays belong to (a Python int
    or a traced scalar); n_layers: the model's depth (for per-layer hyperparameters).
    """

    cache: Any
    config: Any
    window_probs: Optional[jax.Array] = None
    window_queries: Optional[jax.Array] = None
    column_sums: Optional[jax.Array] = None
    q_pre: Optional[jax.Array] = None
    k_pre: Optional[jax.Array] = None
    v: Optional[jax.Array] = None
    hidden: Optional[jax.Array] = None
    accumulated: Optional[jax.Array] = None
    scores: Optional[jax.Array] = None
    layer: Any = 0
    n_layers: int = 1


@dataclasses.dataclass(frozen=True)
class Observer:
    """The policy whose observation a forward reduces inside each layer (a static argument).

    score: return the policy's scores `[L, B, Hkv, S]` (after this forward's tokens are in the
    cache); accumulating policies (H2O) always update their running state. queries: also return
    the last `queries` post-RoPE queries `[L, B, Hq, queries, d]` (ThinK's channel scores, the decode
    query buffer); q_pre likewise for pre-RoPE queries (ExpectedAttention's decode statistics).
    """

    policy: Any
    score: bool = True
    queries: int = 0
    q_pre: int = 0

    @property
    def observe(self) -> Observe:
        o = self.policy.observe
        if self.policy.accumulates:
            o = o | Observe(column_sums=True)
        return o | Observe(window=self.queries, qkv=bool(self.q_pre))


def layer_view(tree):
    """A single layer's pytree with a leading layers axis of size 1 (a reshape, no copy)."""
    return jax.tree_util.tree_map(lambda x: x[None], tree)


def reduce_layer(observer: Observer, layer_cache, config, layer, n_layers: int, attn: dict,
                 q_rot: jax.Array, q_pre, k_pre, v, hidden, accumulated):
    """Inside layer `layer`: build its Observation and reduce it to what leaves the layer.

    attn: what attention returned (window_probs `[B, Hq, w, S]`, column_sums `[B, Hq, S]`);
    accumulated: this layer's running state `[B, Hkv, S]` or None.
    returns dict with "scores" `[B, Hkv, S]`, "accumulated" `[B, Hkv, S]`, "queries" `[B, Hq, w, d]`,
    "q_pre" `[B, Hq, w, d]` (each only when asked for)."""
    policy = observer.policy
    o = observer.observe
    w = min(o.window, q_rot.shape[2]) if o.window else 0
    add = lambda x: None if x is None else x[None]
    obs = Observation(cache=layer_view(layer_cache), config=config,
                      window_probs=add(attn.get("window_probs")),
                      window_queries=q_rot[None, :, :, q_rot.shape[2] - w:] if w else None,
                      column_sums=add(attn.get("column_sums")),
                      q_pre=add(q_pre) if o.qkv else None, k_pre=add(k_pre) if o.qkv else None,
                      v=add(v) if o.qkv else None, hidden=add(hidden) if o.hidden else None,
                      accumulated=add(accumulated), layer=layer, n_layers=n_layers)
    out = {}
    if policy.accumulates:
        acc = accumulated if accumulated is not None else jnp.zeros(layer_cache.positions.shape, jnp.float32)
        acc = acc + policy.accumulate(obs)[0]
        obs = dataclasses.replace(obs, accumulated=acc[None])
        out["accumulated"] = acc
    if observer.score:
        out["scores"] = policy.score(obs)[0].astype(jnp.float32)
    if observer.queries:
        out["queries"] = q_rot[:, :, -min(observer.queries, q_rot.shape[2]):]
    if observer.q_pre:
        out["q_pre"] = q_pre[:, :, -min(observer.q_pre, q_pre.shape[2]):]
    return out


# ----------------------------------------------------------------------------------------------
# Learned policies' weights: carried by the (static, hashed) policy, passed to jit as arguments.

class Frozen:
    """Arrays carried by a static (hashed) policy, hashed and compared by identity. The engine's
    jitted forward does not bake them into the program as constants (a slow compile: 11.7 min on
    CPU for the Attention-Gate): `split_weights` swaps them for a `WeightSlot` (hashed by shapes)
    and the arrays go in as a jit argument, `bind_weights` puts the traced arrays back inside."""

    def __init__(self, tree):
        self.tree = tree


class WeightSlot(Frozen):
    """Placeholder for a `Frozen` field outside the jit: equal when the tree structure, shapes and
    dtypes are, so one compiled program serves every set of weights of the same shapes."""

    def __init__(self, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        super().__init__(None)
        self.signature = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))

    def __eq__(self, other):
        return isinstance(other, WeightSlot) and self.signature == other.signature

    def __hash__(self):
        return hash(self.signature)


def split_weights(policy) -> tuple[Any, Optional[dict]]:
    """(policy with each `Frozen` dataclass field replaced by its `WeightSlot`, {field: arrays}) or
    (policy, None) when it carries no arrays (or is not a dataclass)."""
    if policy is None or not dataclasses.is_dataclass(policy):
        return policy, None
    trees = {f.name: getattr(policy, f.name).tree for f in dataclasses.fields(policy)
             if type(getattr(policy, f.name)) is Frozen}
    if not trees:
        return policy, None
    return dataclasses.replace(policy, **{n: WeightSlot(t) for n, t in trees.items()}), trees


def bind_weights(policy, trees: Optional[dict]):
    """Inverse of `split_weights` (inside the jit: `trees` are tracers)."""
    if not trees:
        return policy
    return dataclasses.replace(policy, **{n: Frozen(t) for n, t in trees.items()})
