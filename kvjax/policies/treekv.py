"""TreeKV (He et al., arXiv 2501.04987, IJCAI'25): a fixed-size cache thinned by a cyclic eviction
scope, so that the kept tokens grow exponentially sparser with distance (a "tree" density).

Spec (`eviction_merging_learned.md` §6.2, [paper] + [unverified]; no public code): a token's
importance is its *average* attention score, the attention it accumulated divided by the number
of queries that observed it. A cyclic eviction scope slides over the cache; at each step, of a pair
of adjacent cached tokens in the scope, the one with the lower average score is evicted.

Our reading of that rule (the paper's Algorithm 1 was not reachable: **[unverified]** details):

- average score of a slot = accumulated attention (H2O's running column sums, mean over the GQA
  group) / (newest position - slot position + 1), the number of causal queries that saw it;
- the cache is a stream with capacity c (the budget): tokens arrive in position order, the first c
  fill it, and every later arrival triggers one eviction. The scope sweeps, oldest first, the c
  tokens that were cached when the sweep began: eviction number e (counted over the whole stream,
  e = 0, 1, ...) looks at the cache as it is then (c + 1 tokens in position order) and compares the
  tokens at indices p and p + 1 with p = e mod (c // 2), evicting the lower average score (a tie
  evicts the older token). Each comparison consumes two tokens of the sweep and leaves one, so after
  c // 2 evictions the sweep has reached the tokens that arrived during it and the scope returns
  to the oldest token: one sweep = one level of a binary tree;
- a compression call (after the prefill, a chunk, or `interval` decode steps) replays the
  evictions the arrivals since the last call trigger, all with the scores as they are now; the
  stream's eviction counter is recovered from the positions (evicted = newest position + 1 - live
  tokens), so nothing beyond H2O's running score is carried between calls.

Every sweep halves the density of what it passes and leaves the tokens that arrived during it
alone, so the newest c // 2 tokens are always all kept and older regions are exponentially
sparser (c/4 slots at 1/2, c/8 at 1/4, ...): the spec's "dense near the end, exponentially sparser
further back" at every cache state. (An earlier reading swept all c slots per pass, p = e mod c;
at the end of each pass it had halved the newest tokens too, uniformly thinning the whole cache
whenever the evictions were a multiple of c: KL 0.42 vs the full cache at c = n/2 on SmolLM2.)
No separate sink or recent window is protected (the spec names none; the newest c // 2 are kept by
the sweep itself, and a sink survives its comparisons through its high average attention). The
spec's budget is a fixed cache size for prefill and generation:
`Compression(TreeKV(), Budget(tokens=c), when="chunk")` / `when="decode"` keeps the cache at c (+
the chunk / interval room).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kvjax.policies.base import Observation, ScoringPolicy, group_reduce


def average_attention(accumulated: jax.Array, positions: jax.Array) -> jax.Array:
    """[..., S] accumulated attention / queries that observed the slot (-inf on empty slots).

    accumulated, positions: [..., S]; a slot at position p has been seen by the queries at
    positions p .. newest (causal), newest = the highest position of its row."""
    newest = jnp.max(positions, axis=-1, keepdims=True)
    seen = jnp.maximum(newest - positions + 1, 1).astype(jnp.float32)
    return jnp.where(positions >= 0, accumulated.astype(jnp.float32) / seen, -jnp.inf)


def tree_survivors(avg: jax.Array, positions: jax.Array, n_keep: jax.Array) -> jax.Array:
    """[..., S] bool: the slots the cyclic-scope eviction keeps at a cache size of `n_keep`
    (eviction e compares the cached tokens p, p + 1 in position order, p = e mod (n_keep // 2)).

    avg: average scores [..., S]; positions [..., S] (-1 = empty); n_keep: int broadcastable to
    avg.shape[:-1]. Rows with at most n_keep live slots keep them all."""
    s = avg.shape[-1]
    live = positions >= 0
    big = jnp.iinfo(jnp.int32).max
    order = jnp.argsort(jnp.where(live, positions, big), axis=-1, stable=True)   # chronological slots
    sc = jnp.take_along_axis(avg, order, axis=-1)
    n = jnp.sum(live, axis=-1).astype(jnp.int32)
    c = jnp.broadcast_to(jnp.asarray(n_keep, jnp.int32), n.shape)
    c = jnp.maximum(jnp.minimum(c, n), 1)
    n_evict = n - c
    sweep = jnp.maximum(c // 2, 1)                                               # evictions per sweep
    done = jnp.max(positions, axis=-1) + 1 - n                                  # evictions before this call
    rank = jnp.arange(s, dtype=jnp.int32)
    alive = rank < n[..., None]                                                  # in chronological order

    def step(e, alive):
        present = alive & (rank < (c + 1 + e)[..., None])                        # the cache at arrival c + e
        idx = jnp.cumsum(present, axis=-1) - 1
        p = ((done + e) % sweep)[..., None]
        a = jnp.argmax(present & (idx == p), axis=-1)
        b = jnp.argmax(present & (idx == p + 1), axis=-1)
        sa = jnp.take_along_axis(sc, a[..., None], axis=-1)[..., 0]
        sb = jnp.take_along_axis(sc, b[..., None], axis=-1)[..., 0]
        victim = jnp.where(sb < sa, b, a)                                        # tie: the older (a) goes
        hit = (rank == victim[..., None]) & (e < n_evict)[..., None]
        return alive & ~hit

    alive = lax.fori_loop(0, jnp.max(n_evict), step, alive)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(alive, inverse, axis=-1) & live


@dataclasses.dataclass(frozen=True)
class TreeKV(ScoringPolicy):
    """No hyperparameters beyond the budget (the cache size c)."""

    accumulates = True

    def accumulate(self, obs: Observation) -> jax.Array:
        """Attention each slot received from this forward's queries, mean over the GQA group."""
        return group_reduce(obs.column_sums, obs.cache.positions.shape[2], "mean")

    def score(self, obs: Observation) -> jax.Array:
        """[L, B, Hkv, S] the average attention score of each slot (-inf: empty)."""
        return average_attention(obs.accumulated, obs.cache.positions)

    def adjust_scores(self, scores: jax.Array, obs: Observation, n_keep: jax.Array) -> jax.Array:
        """The survivors of the cyclic-scope eviction at cache size n_keep [B] get +inf, so the
        top-n_keep selection keeps exactly them."""
        keep = tree_survivors(scores, obs.cache.positions, n_keep[None, :, None])
        return jnp.where(keep, jnp.inf, scores)
