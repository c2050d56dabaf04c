"""Quality at equal bytes: eviction, quantization and their combinations on one byte axis.

    fam = parse_family("snapkv+kivi4:residual=32")       # or "snapkv", "kivi2", ...
    keep = tokens_for_bytes(config, fam, 0.10 * full_bytes(config, 2000), 2000)   # None: does not fit
    pre, logits, cache = run_family(params, config, fam, keep, context, targets)

A family is a scoring policy (dense bf16 cache of `keep` tokens), a quantized cache of the registry
holding the whole context, or a policy whose kept tokens a KIVI cache stores
(`kvjax.quant.evicted`). Its context bytes are those of the cache the engine allocates for the
context alone (`memory_bytes()` of the real layout, computed from shapes: codes, statistics, fp
residual windows in the cache dtype, counters, per-slot positions), so the byte fraction of a row
is `context_bytes / full_bytes` with the dense cache of the same dtype as denominator. The room
for continuation tokens is excluded from both (rows report the allocated cache separately).
`tokens_for_bytes` picks the largest token budget whose context bytes fit a byte budget.
A model with sliding-window layers (Gemma 3) keeps a ring of min(window, context) tokens in each
of them whatever the family (`kvjax.ring`): a family's cache replaces the global layers only, and
both byte counts add the rings.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.cache import tree_bytes
from kvjax.compression import Compression
from kvjax.eval import fidelity
from kvjax.eval.harness import COMBINE, DEMOTE, build_policy, parse_policy, quant_cache_init
from kvjax.generate import init_engine_cache
from kvjax.policies.base import Budget
from kvjax.ring import init_ring, policy_config
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """name: the spec ("snapkv", "kivi4", "snapkv+kivi4:residual=32"); policy / quant: its parts
    (policy registry spec, quantized cache spec), either may be None but not both."""

    name: str
    policy: Optional[str] = None
    quant: Optional[str] = None
    demote: Optional[str] = None      # evicted tokens stored at low precision (kvjax.quant.demote)

    @property
    def kind(self) -> str:
        if self.policy and (self.quant or self.demote):
            return "combination"
        return "quantization" if self.quant else "eviction"


def parse_family(spec: str, params=None, config: Optional[ModelConfig] = None) -> Family:
    """'snapkv' | 'kivi4[:opt=v]' | 'snapkv[:opt=v]+kivi4[:opt=v]' | any policy family + '~kivi2[:opt=v]'
    (evicted tokens demoted; ':budget=0.1': only the next-best 10% of the context) -> Family; ValueError naming the reason for unknown names and for
    combinations that cannot work (checked here, before any run)."""
    from kvjax.quant import QUANT_CACHES
    spec = spec.strip()
    if DEMOTE in spec:
        base, demote = (p.strip() for p in spec.split(DEMOTE, 1))
        fam = parse_family(base, params, config)
        if fam.policy is None:
            raise ValueError(f"{spec!r}: demotion stores the evicted tokens of a policy: give 'policy{DEMOTE}{demote}'")
        demoting = _demote(fam.policy, demote, params, config)
        if config is not None:
            demoting.store.validate(config.head_dim)
        return dataclasses.replace(fam, name=spec, demote=demote)
    if COMBINE in spec:
        policy, quant = (p.strip() for p in spec.split(COMBINE, 1))
        parse_policy(policy)
        plan = _plan(Family(spec, policy, quant), Budget(ratio=0.5), params, config)
        if config is not None:
            plan.kcfg.validate(config.head_dim)
        return Family(spec, policy, quant)
    if spec.split(":")[0].strip() in QUANT_CACHES:
        cache_init = quant_cache_init(spec)
        if config is not None:   # bad option values (bits, group) fail here
            jax.eval_shape(lambda: init_engine_cache(_one_layer(config), 1, 8, jnp.float32, cache_init))
        return Family(spec, quant=spec)
    parse_policy(spec)
    return Family(spec, policy=spec)


def parse_fractions(spec: str) -> tuple[float, ...]:
    """'0.25,0.1,0.05' -> byte fractions of the full cache, each in (0, 1]; ValueError otherwise."""
    out = []
    for item in spec.split(","):
        if item.strip():
            try:
                f = float(item)
            except ValueError:
                raise ValueError(f"bad byte fraction {item.strip()!r}: expected a number in (0, 1]") from None
            if not 0 < f <= 1:
                raise ValueError(f"byte fraction {f} is not in (0, 1]")
            out.append(f)
    if not out:
        raise ValueError(f"no byte fractions in {spec!r}")
    return tuple(out)


def _one_layer(config: ModelConfig) -> ModelConfig:
    """One of the layers a family's cache fills (a global layer: no window)."""
    return dataclasses.replace(policy_config(config), n_layers=1)


def _n_global(config: ModelConfig) -> int:
    return config.n_layers - len(config.local_layers)


def ring_bytes(config: ModelConfig, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes of the sliding-window layers' rings for a `context`-token prompt, batch 1 (0 without)."""
    if not config.local_layers:
        return 0
    one = tree_bytes(jax.eval_shape(lambda: init_ring(config, 1, context, dtype)))
    return len(config.local_layers) * one


def full_bytes(config: ModelConfig, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes of the engine's dense cache holding `context` tokens (every layer; rings for local ones)."""
    shapes = jax.eval_shape(lambda: init_engine_cache(_one_layer(config), 1, context, dtype))
    return _n_global(config) * tree_bytes(shapes) + ring_bytes(config, context, dtype)


@functools.lru_cache(maxsize=65536)   # tokens_for_bytes revisits budgets (pure function of hashable arguments)
def context_bytes(config: ModelConfig, family: Family, keep: int, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes of `family`'s cache for a `context`-token prompt with `keep` tokens per head kept (a
    quantized cache alone keeps all `context`), batch 1: the global layers (uniform) + the rings."""
    one = _one_layer(config)
    if family.quant is None:
        shapes = jax.eval_shape(lambda: init_engine_cache(one, 1, keep, dtype))
    elif family.policy is None:
        shapes = jax.eval_shape(lambda: init_engine_cache(one, 1, context, dtype, quant_cache_init(family.quant)))
    else:
        plan = _plan(dataclasses.replace(family, demote=None), Budget(tokens=keep))
        dense = jax.eval_shape(lambda: init_engine_cache(one, 1, keep, dtype))
        shapes = jax.eval_shape(plan.quantize, dense)
    extra = 0
    if family.demote is not None:    # + the demoted region: context - keep slots (rounded to G) in KIVI form
        extra = _demoted_bytes(one, family.policy, family.demote, _demote(family.policy, family.demote)
                               .demoted_capacity(context, keep), dtype)
    return _n_global(config) * (tree_bytes(shapes) + extra) + ring_bytes(config, context, dtype)


@functools.lru_cache(maxsize=4096)
def _demoted_bytes(one: ModelConfig, policy: str, demote: str, capacity: int, dtype) -> int:
    """Bytes of one layer's demoted region of `capacity` slots (batch 1)."""
    from kvjax.quant.evicted import quantize_layer
    dem = _demote(policy, demote)
    layer = jax.eval_shape(lambda: init_engine_cache(one, 1, capacity, dtype)).layers[0]
    return tree_bytes(jax.eval_shape(lambda d: quantize_layer(d, dem.store, capacity, dem.dtype or dtype), layer))


def _demote(policy: str, demote: str, params=None, config=None):
    from kvjax.quant.demote import make_demote
    return make_demote(build_policy(policy, params, config), demote)


def _plan(family: Family, budget: Budget, params=None, config=None):
    from kvjax.quant.evicted import check_combination
    return check_combination(Compression(build_policy(family.policy, params, config), budget),
                             quant_cache_init(family.quant))


def tokens_for_bytes(config: ModelConfig, family: Family, target: float, context: int,
                     dtype=jnp.bfloat16) -> Optional[int]:
    """The largest kept-token count (< context) whose `context_bytes` is at most `target` bytes;
    None if not even one token fits. A quantized cache alone: `context` if it fits, else None.
    Bytes grow with keep, except for demoting families: their demoted region shrinks by a whole
    KIVI group every G kept tokens (a sawtooth), so the search runs over each residue of keep mod G,
    along which the bytes grow."""
    if family.policy is None:
        return context if context_bytes(config, family, context, context, dtype) <= target else None
    fits = lambda k: context_bytes(config, family, k, context, dtype) <= target
    step = _demote(family.policy, family.demote).store.group if family.demote else 1
    best = None
    for r in range(1, min(step, context - 1) + 1):          # keep = r + j * step, bytes grow with j
        if not fits(r):
            continue
        lo, hi = 0, (context - 1 - r) // step
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(r + mid * step) else (lo, mid - 1)
        best = max(best or 0, r + lo * step)
    return best


def run_family(params, config: ModelConfig, family: Optional[Family], keep: Optional[int], context, targets,
               runner: Optional[fidelity.Runner] = None, dtype=jnp.bfloat16):
    """Prefill `context [batch, T]` with `family` at `keep` tokens per head (None family: the full
    cache), then feed `targets [batch, C]` in one forward over the cache of `dtype`.
    returns (Prefilled, log-probs [batch, C, vocab], cache after the continuation)."""
    runner = runner or fidelity.Runner()
    n_new = targets.shape[1]
    if family is None:
        pre = fidelity.prefill_context(params, config, context, None, n_new, runner=runner, cache_dtype=dtype)
    elif family.policy is None:
        pre = fidelity.prefill_quantized(params, config, context, quant_cache_init(family.quant), n_new,
                                         runner=runner, cache_dtype=dtype)
    else:
        comp = Compression(build_policy(family.policy, params, config), Budget(tokens=keep), demote=family.demote)
        quant = quant_cache_init(family.quant) if family.quant else None
        pre = fidelity.prefill_context(params, config, context, comp, n_new, runner=runner, cache_dtype=dtype,
                                       kv_quant=quant)
    logits, _, cache = fidelity.continuation_logits(params, config, pre, targets, stepwise=False, runner=runner)
    return pre, logits, cache
