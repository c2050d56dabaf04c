"""MInference (Jiang et al., 2024, arXiv 2407.02490; microsoft/MInference, as vendored in
bytedance/FlexPrefill `flex_prefill/ops/minfer/*`): a per-head pattern chosen offline, its sparse
index estimated online.

* "vertical_and_slash" (vertical budget V, slash budget S): the last `last_q` = 64 queries of the
  chunk attend to every live causal key (softmax); vertical score of a key = sum over those
  queries, slash score of an offset o = sum along the diagonal (query slot - key slot = o). The
  first 30 keys are forced into the vertical set, the 100 offsets nearest the diagonal into the
  slash set; budgets are clamped as the official code does: V' = min(T, max(V, 30)),
  S' = min(T, max(S, 50)); top-V' verticals, top-S' slashes.
* "a_shape" (init I, local W): the first I keys and the last W keys before each query.

Form for `pallas_kernels.block_sparse_prefill` (blocks of 64, the size the official kernel
converts slashes to): a slash offset lists the key blocks its diagonal crosses in each query block
(the 1-2 block diagonals of `base.diagonals_of_offsets`). Vertical keys, `vertical_form`:
"columns" (default, as the official kernel does): each vertical key slot is a single gathered
column (the kernel's column lists; a column inside a listed block counts once); "blocks": each
vertical key lists its whole key block for every query block (a superset: up to block_size times
the columns' work).

Patterns: one `(kind, a, b)` for every head (default: Llama-3-8B's typical
("vertical_and_slash", 1000, 6096)), or per (layer, query head) from a JSON file
{"pattern": [[[kind, a, b], ...per head], ...per layer]} -- the offline search itself is not
implemented. GQA: the kernel shares one list per kv head, so the query heads' masks are unioned.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.sparse_prefill.base import (Geometry, diagonals_of_offsets, from_columns, from_diagonals,
                                       last_query_probs, repeat_heads, sink_local, slash_profile, top_mask)

KINDS = ("vertical_and_slash", "a_shape")
FORCED_VERTICAL = 30
FORCED_SLASH = 100
MIN_VERTICAL = 30
MIN_SLASH = 50


@dataclasses.dataclass(frozen=True)
class MInference:
    kind: str = "vertical_and_slash"
    vertical: int = 1000            # a_shape: init tokens
    slash: int = 6096               # a_shape: local tokens
    last_q: int = 64
    block_size: int = 64
    pattern: Optional[tuple] = None  # [layers][q_heads] of (kind, a, b): overrides kind/vertical/slash
    vertical_form: str = "columns"   # "columns" (gathered single key slots) or "blocks" (whole key blocks)

    def __post_init__(self):
        kinds = {self.kind} | {h[0] for layer in (self.pattern or ()) for h in layer}
        bad = kinds - set(KINDS)
        if bad:
            raise ValueError(f"unknown MInference pattern {sorted(bad)}; expected one of {KINDS}")
        if self.vertical_form not in ("columns", "blocks"):
            raise ValueError(f"MInference vertical_form must be 'columns' or 'blocks', got {self.vertical_form!r}")
        if min(self.vertical, self.slash, self.last_q) < 1:
            raise ValueError(f"MInference budgets must be positive, got vertical={self.vertical} "
                             f"slash={self.slash} last_q={self.last_q}")

    @classmethod
    def from_args(cls, pattern_file: Optional[str] = None, **kw) -> "MInference":
        if pattern_file is not None:
            with open(pattern_file) as f:
                kw["pattern"] = tuple(tuple((str(k), int(a), int(b)) for k, a, b in layer)
                                      for layer in json.load(f)["pattern"])
        return cls(**{k: v if k in ("kind", "pattern", "vertical_form") else int(v) for k, v in kw.items()})

    def max_columns(self, t: int) -> int:
        """Static bound on one query head's vertical columns for a chunk of t queries."""
        verticals = [self.vertical] if self.pattern is None else \
            [a for layer in self.pattern for kind, a, _ in layer if kind == "vertical_and_slash"] or [0]
        return min(t, max(max(verticals), MIN_VERTICAL))

    def head_table(self, n_q_heads: int, layer):
        """(is_vs [hq] bool, a [hq] int32, b [hq] int32) of `layer` (traced index allowed)."""
        if self.pattern is None:
            return (jnp.full((n_q_heads,), self.kind == "vertical_and_slash"),
                    jnp.full((n_q_heads,), self.vertical, jnp.int32), jnp.full((n_q_heads,), self.slash, jnp.int32))
        if len(self.pattern[0]) != n_q_heads:
            raise ValueError(f"MInference pattern has {len(self.pattern[0])} heads per layer, the model {n_q_heads}")
        kind = jnp.asarray([[h[0] == "vertical_and_slash" for h in lay] for lay in self.pattern])
        a = jnp.asarray([[h[1] for h in lay] for lay in self.pattern], jnp.int32)
        b = jnp.asarray([[h[2] for h in lay] for lay in self.pattern], jnp.int32)
        return kind[layer], a[layer], b[layer]

    def select(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer, scale: float) -> jax.Array:
        """[b, hq, nqb, nkb] bool block mask per query head, vertical keys as whole blocks."""
        mask, cols = self.select_with_columns(q, keys, geo, layer, scale)
        nkb, bs, s = geo.nkb, geo.block_size, keys.shape[2]
        col_blocks = jnp.pad(cols, ((0, 0), (0, 0), (0, nkb * bs - s))).reshape(*cols.shape[:2], nkb, bs).any(-1)
        return mask | from_columns(col_blocks, geo)

    def select_with_columns(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer,
                            scale: float) -> tuple[jax.Array, jax.Array]:
        """(blocks [b, hq, nqb, nkb] bool: slash diagonals of vertical-slash heads, sink + local
        of A-shape heads; columns [b, hq, S] bool: the vertical key slots of vertical-slash heads,
        seen by every query at or after them)."""
        b, hq, t, _ = q.shape
        g = hq // keys.shape[1]
        is_vs, va, sb = self.head_table(hq, layer)
        probs, qs = last_query_probs(q, keys, geo, self.last_q, scale)          # [b, hq, n, S]
        s = keys.shape[2]
        slot = jnp.arange(s, dtype=jnp.int32)
        starts = repeat_heads(geo.starts, g)[..., None]                          # [b, hq, 1]
        vertical = probs.sum(-2)
        vertical = jnp.where((slot >= starts) & (slot < starts + FORCED_VERTICAL), jnp.inf, vertical)
        slash = slash_profile(probs, qs)
        slash = jnp.where(slot < FORCED_SLASH, jnp.inf, slash)
        n_v = jnp.minimum(t, jnp.maximum(va, MIN_VERTICAL))
        n_s = jnp.minimum(t, jnp.maximum(sb, MIN_SLASH))
        cols = top_mask(vertical, jnp.broadcast_to(n_v, (b, hq)))                # [b, hq, S] key slots
        offs = top_mask(slash, jnp.broadcast_to(n_s, (b, hq)))                   # [b, hq, S] offsets
        slashes = from_diagonals(diagonals_of_offsets(offs, geo), geo)
        head_vs = is_vs[None, :, None, None]
        blocks = jnp.where(head_vs, slashes, self._a_shape_mask(geo, va, sb, g))
        return blocks, cols & head_vs[..., 0]

    def _a_shape_mask(self, geo: Geometry, init: jax.Array, local: jax.Array, g: int) -> jax.Array:
        """[b, hq, nqb, nkb] sink(init) + local blocks with per-query-head sizes."""
        per = [sink_local(geo, init[h], local[h])[:, h // g] for h in range(init.shape[0])]
        return jnp.stack(per, axis=1)
