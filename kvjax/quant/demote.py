"""Demotion instead of eviction (MiKV-style, for any scoring policy): the policy's kept tokens stay
at high precision, the tokens it would evict are **kept at low precision** instead of dropped.

    Compression(SnapKV(), Budget(ratio=0.25), demote="kivi2")                  # kept bf16, evicted KIVI-2
    generate(..., compression=Compression(SnapKV(), Budget(ratio=0.25), demote="kivi2"), kv_quant="kivi4")
    python -m kvjax generate --policy snapkv --budget 0.25 --demote kivi2 [--kv-quant kivi4] ...
    Compression(SnapKV(), Budget(ratio=0.1), demote="kivi2:budget=0.2")        # partial demotion

Rule: prefill runs over the full-precision cache and the policy scores and selects exactly as it
does alone (the high-precision set is the plain policy's kept set). After the selection, every live
token of a head that was not kept is gathered (in slot order) and stored by KIVI's prefill rule
(`kvjax.quant.evicted.quantize_layer`: keys per channel over G-token groups, values per token; the
last `n mod R` keys and `R` values of the demoted sequence stay in the fp residual windows) in an
`EvictedKIVICache` of its own.

Partial demotion (`budget=` option of the spec: a ratio of the context or a token count, the syntax
of `--budget`): only the `budget` next-best evicted tokens of a head by the policy's own selection
scores (those after `adjust_scores`: the ranking that chose the kept set; ties to the older slot)
are demoted, in slot order, the rest dropped; per head min(budget.kept(live tokens), evicted). The
demoted region is then allocated at min(budget, its bound below) slots (rounded up to G), so a
10% kept + 20% demoted cache costs about 10% + 0.2 x 21.8% of the bf16 bytes.

The kept region is the plain policy's dense cache, or its KIVI form
with `kv_quant` (`kvjax.quant.evicted.EvictQuant`). `generalises kvjax.quant.mikv` (KNorm scorer,
per-token low-precision pool) to any scorer with KIVI's per-channel keys in the low-precision pool.

Layout (`DemotedLayer`, one per layer in a uniform `LayerwiseCache`): `kept` (the write region: new
tokens are appended there; the protocol's `lengths`, `capacity` and `positions` are its own) and
`demoted` (read-only; `demoted_positions`). Both are allocated at their capacities: the kept region
at the budget + decode room, the demoted one at `context - budget` slots (rounded up to G) for
uniform budgets, at the whole prefill capacity for per-head / per-layer budgets (AdaKV, PyramidKV:
the evicted count of a head is only known at run time). Attention runs over both regions (their
dequantized K/V concatenated, position-masked: the XLA path; no fused kernel over two regions).

Schedules: "prefill" only. Chunk / decode schedules would have to score and re-select a cache whose
demoted tokens the policy never sees again (refused with the reason). Refused policies: their own
final layout (ThinK, RazorAttention, DuoAttention), merging (CAM, D2O, ...: evicted tokens are
already folded into the kept ones) and re-rotating (StreamingLLM pos-shift, Locret: kept keys move to
new positions, demoted ones would not).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.layerwise import LayerwiseCache
from kvjax.observation import Observation, Observe
from kvjax.policies.base import Budget, ScoringPolicy, select
from kvjax.quant import kivi
from kvjax.quant.evicted import EvictedKIVICache, quantize_layer


# ----------------------------------------------------------------------------- storage spec

BUDGET = "budget"   # the spec option of partial demotion


def split_budget(spec: str) -> tuple[str, Optional[Budget]]:
    """'kivi2:budget=0.2:group=32' -> ('kivi2:group=32', Budget(ratio=0.2)); no budget option -> (spec,
    None): every evicted token is demoted. ValueError (naming the accepted forms) for a bad budget."""
    parts = [p.strip() for p in spec.split(":")]
    rest, budget = [parts[0]], None
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key.strip() != BUDGET:
            rest.append(p)
        elif budget is not None:
            raise ValueError(f"demote spec {spec!r}: {BUDGET}= given twice")
        else:
            try:
                budget = Budget.parse(value.strip())
            except ValueError as err:
                raise ValueError(f"demote spec {spec!r}: {err}") from None
    return ":".join(rest), budget


def demote_store(spec: str) -> tuple[kivi.KIVIConfig, Optional[object]]:
    """'kivi2' | 'kivi4:group=32:residual=64' (a `budget=` option is ignored: `split_budget`) ->
    (KIVIConfig of the demoted tokens, fp-residual dtype or None = the cache's). The residual window defaults to one group (R = G): nothing is ever appended
    to the demoted region, so a longer fp window would only hold more tokens at full precision.
    ValueError for unknown names/options and for caches that cannot store a token set (non-KIVI, sinks)."""
    from kvjax.eval.harness import quant_cache_init
    from kvjax.quant.evicted import check_cache_init
    init = quant_cache_init(split_budget(spec)[0])
    _, kw = check_cache_init(init)
    given = getattr(init, "overrides", {})
    residual = kw["residual"] if "residual" in given else kw["group"]
    return (kivi.KIVIConfig(kw.get("k_bits") or kw["bits"], kw.get("v_bits") or kw["bits"], kw["group"], residual),
            kw.get("dtype"))


# ----------------------------------------------------------------------------- the policy wrapper

def _custom_finalize(cls) -> bool:
    return cls.finalize is not ScoringPolicy.finalize


def check_demote_class(cls) -> None:
    """ValueError naming why evicted tokens of a `cls` policy cannot be demoted: merging (CAM, D2O, ...)
    or its own final layout (ThinK, RazorAttention, DuoAttention; AdaKV/PyramidKV fall back to padded)."""
    name = cls.__name__
    if cls.merges:
        raise ValueError(f"demotion with {name} is not supported: it merges the evicted tokens into the kept "
                         f"ones, demoting them too would count them twice")
    if getattr(cls, "transforms_cache", False) or (
            _custom_finalize(cls) and "ragged" not in {f.name for f in dataclasses.fields(cls)}):
        raise ValueError(f"demotion with {name} is not supported: it builds its own cache layout (pruned key "
                         f"channels, split heads), not a kept token set beside which evicted tokens can be stored")


@dataclasses.dataclass(frozen=True)
class Demote(ScoringPolicy):
    """`policy` selects (observations, scores, budgets all its own); its evicted tokens are stored
    at `store` precision instead of dropped (the `budget` next-best ones only, if given). name: the
    storage spec, for messages and tables."""

    policy: ScoringPolicy
    store: kivi.KIVIConfig = kivi.KIVIConfig(2, 2, 32, 32)
    dtype: Optional[object] = None
    name: str = "kivi2"
    budget: Optional[Budget] = None    # demote at most this many per head (None: every evicted token)

    demotes = True

    def __post_init__(self):
        p = self.policy
        cls = type(p).__name__
        if not isinstance(p, ScoringPolicy):
            raise ValueError(f"Demote wraps a scoring policy, got {type(p).__name__}")
        if isinstance(p, Demote):
            raise ValueError("Demote cannot wrap another Demote")
        if p.rerotate:
            raise ValueError(f"demotion with {cls} is not supported: it re-rotates the kept keys to new positions, "
                             f"the demoted ones would keep theirs (two position systems in one layer)")
        check_demote_class(type(p))
        if getattr(p, "ragged", False):   # AdaKV / PyramidKV: the padded layout (both regions per layer)
            object.__setattr__(self, "policy", dataclasses.replace(p, ragged=False))

    # --- everything but the final layout is the wrapped policy's
    @property
    def observe(self) -> Observe:
        return self.policy.observe

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.policy.accumulates

    rerotate = False
    merges = False

    def score(self, obs: Observation) -> jax.Array:
        return self.policy.score(obs)

    def accumulate(self, obs: Observation) -> jax.Array:
        return self.policy.accumulate(obs)

    def head_budgets(self, scores, n_keep):
        return self.policy.head_budgets(scores, n_keep)

    def max_keep(self, n_keep: int, context: int) -> int:
        return self.policy.max_keep(n_keep, context)

    def adjust_scores(self, scores, obs, n_keep):
        return self.policy.adjust_scores(scores, obs, n_keep)

    def budgets(self, scores, obs, n_keep):
        return self.policy.budgets(scores, obs, n_keep)

    @property
    def uniform_budgets(self) -> bool:
        """Every head of every layer keeps the same count (the default budget hooks)."""
        cls = type(self.policy)
        return all(getattr(cls, m) is getattr(ScoringPolicy, m) for m in ("head_budgets", "budgets", "max_keep"))

    def demoted_capacity(self, slots: int, max_keep: int) -> int:
        """Slots of the demoted region for a `slots`-slot full cache and `max_keep` kept slots: the
        evicted count is at most `slots - max_keep` when every head keeps the same count (it grows
        with the prompt length: `Budget.kept`), else up to `slots`; at most the demote budget's share
        of `slots`. Rounded up to KIVI's group."""
        n = slots - max_keep if self.uniform_budgets else slots
        if self.budget is not None:
            n = min(n, self.budget.kept(slots))
        return kivi.quantized_capacity(max(n, 1), self.store.group)

    def finalize(self, new: kvcache.KVCache, obs: Observation, idx: jax.Array):
        """new: the gathered kept tokens, stacked `[L, B, Hkv, C, d]`; obs.cache: the full cache
        `[L, B, Hkv, S, d]`; idx: kept slots `[L, B, Hkv, K]` (-1 = none) -> a uniform LayerwiseCache
        of `DemotedLayer`s."""
        if _custom_finalize(type(self.policy)):
            new = self.policy.finalize(new, obs, idx)
        full = obs.cache
        if not isinstance(new, kvcache.KVCache) or not isinstance(full, kvcache.KVCache):
            raise ValueError(f"demotion needs dense stacked caches, got {type(new).__name__} / {type(full).__name__}")
        cap = self.demoted_capacity(full.capacity, idx.shape[-1])
        valid = full.positions >= 0
        if self.budget is None:    # every evicted token (the capacity holds them all)
            ev_idx = evicted_slots(valid, idx, cap)
        else:
            if obs.scores is None:
                raise ValueError("partial demotion ranks the evicted tokens by the selection scores: "
                                 "finalize needs obs.scores")
            ev_idx = evicted_slots(valid, idx, cap, obs.scores, demote_counts(self.budget, valid))
        ev = kvcache.gather(full, ev_idx, cap)
        dtype = self.dtype if self.dtype is not None else full.keys.dtype
        at = lambda c, i: jax.tree_util.tree_map(lambda x: x[i], c)
        layers = tuple(DemotedLayer(kept=at(new, i), demoted=quantize_layer(at(ev, i), self.store, cap, dtype))
                       for i in range(idx.shape[0]))
        return LayerwiseCache(layers=layers, capacity=new.capacity, uniform=True)


def demote_counts(budget: Budget, valid: jax.Array) -> jax.Array:
    """Tokens to demote per head `[...]` for a head with valid `[..., S]`: `budget.kept(live)` (a
    ratio floors as `Budget.kept`, in float32 with a 1e-4 margin for its rounding)."""
    live = jnp.sum(valid, axis=-1).astype(jnp.int32)
    if budget.tokens is not None:
        return jnp.minimum(budget.tokens, live)
    n = jnp.floor(budget.ratio * live.astype(jnp.float32) + 1e-4).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(n, 1), live)


def evicted_slots(valid: jax.Array, kept: jax.Array, capacity: int, scores: Optional[jax.Array] = None,
                  counts: Optional[jax.Array] = None) -> jax.Array:
    """Live slots not in `kept`, in slot order: valid `[..., S]` bool, kept `[..., K]` (-1 = none)
    -> `[..., capacity]` int32 (-1 pads). With scores `[..., S]` and counts `[...]`: the `counts`
    highest-scoring of them (ties to the older slot), still in slot order. Without: a head with more
    than `capacity` evicted slots keeps its oldest `capacity` (callers size `capacity` so that this
    does not happen)."""
    s = valid.shape[-1]
    mark = jax.vmap(lambda row, ix: row.at[jnp.where(ix >= 0, ix, s)].set(True, mode="drop"))
    flat_k = kept.reshape(-1, kept.shape[-1])
    is_kept = mark(jnp.zeros((flat_k.shape[0], s), bool), flat_k).reshape(valid.shape)
    mask = valid & ~is_kept
    if counts is None:
        counts = jnp.full(valid.shape[:-1], capacity, jnp.int32)
    scores = jnp.zeros(mask.shape, jnp.float32) if scores is None else scores.astype(jnp.float32)
    if capacity > s:
        pad = [(0, 0)] * (mask.ndim - 1) + [(0, capacity - s)]
        mask, scores = jnp.pad(mask, pad), jnp.pad(scores, pad)
    return select(scores, mask, counts, capacity)


# ----------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class DemotedLayer:
    """One layer: `kept` (KVCache, or EvictedKIVICache with kv_quant; new tokens go here) and
    `demoted` (EvictedKIVICache of the evicted tokens, read-only). The protocol's `lengths`,
    `capacity`, `positions` are the kept region's; `demoted_positions` the other region's."""

    kept: object
    demoted: EvictedKIVICache

    lengths = property(lambda self: self.kept.lengths)
    capacity = property(lambda self: self.kept.capacity)
    positions = property(lambda self: self.kept.positions)
    demoted_positions = property(lambda self: self.demoted.positions)

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    def memory_bytes(self) -> int:
        """Bytes of every array held (both regions)."""
        return kvcache.tree_bytes(self)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "DemotedLayer":
        return dataclasses.replace(self, kept=self.kept.append(keys, values, positions, keys_pre_rope))

    def dense_kv(self):
        """(keys, values, positions) of both regions, kept slots first: `[B, Hkv, C + Cd, d]` (the
        kept region as stored or dequantized, the demoted one dequantized; in the kept region's dtype)."""
        kept = self.kept if isinstance(self.kept, kvcache.KVCache) else self.kept.to_dense()
        dem = self.demoted.to_dense()
        dt = kept.keys.dtype
        cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=-2)
        return (cat(kept.keys, dem.keys.astype(dt)), cat(kept.values, dem.values.astype(dt)),
                jnp.concatenate([kept.positions, dem.positions], axis=-1))

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        """q `[B, Hq, new, d]` post-RoPE -> (out, observations over the kept + demoted slots)."""
        from kvjax.attention import attend
        k, v, pos = self.dense_kv()
        return attend(q, k, v, pos, query_positions, observe=observe, backend=backend)

    def resize(self, capacity: int) -> "DemotedLayer":
        """The kept region at `capacity` slots (decode room); the demoted region unchanged."""
        return dataclasses.replace(self, kept=kvcache.resize(self.kept, capacity))


jax.tree_util.register_dataclass(DemotedLayer, data_fields=["kept", "demoted"], meta_fields=[])


def make_demote(policy: ScoringPolicy, spec: str) -> Demote:
    """`policy` whose evicted tokens are stored as `spec` says ('kivi2', 'kivi2:group=32', ...)."""
    store, dtype = demote_store(spec)
    return Demote(policy, store, dtype, spec, split_budget(spec)[1])
