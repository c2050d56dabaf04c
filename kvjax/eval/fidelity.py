"""Fidelity of a compressed cache: KL(full || compressed) and perplexity on a teacher-forced continuation.

A long context is prefilled (and compressed by a `kvjax.compression.Compression`, once, per chunk
or during decode, exactly as `kvjax.generate` does it), then a held continuation of real text is
fed teacher-forced -- token by token (true decode steps, with decode-time compression when the
schedule asks for it) or in one forward -- with query positions continuing after the context.
The next-token distributions are compared with those of the full cache:

    KL_t = sum_v p_full(v | x_<t) (log p_full(v | x_<t) - log p_comp(v | x_<t))   [nats/token]
    ppl  = exp(-mean_t log p_comp(x_t | x_<t))

This is the fidelity metric of kvpress-style evaluations (the full cache as reference row), and
the perplexity protocol of StreamingLLM (Xiao et al., 2023, arXiv 2309.17453) and TOVA (Oren et
al., 2024, arXiv 2401.06104), computed over a continuation that follows a long context.

Timings: every jitted function is compiled ahead of time (`Runner`), so the seconds reported
exclude tracing and compilation and measure only execution on the running backend.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax import sharding
from kvjax.compression import Compression
from kvjax.generate import (CachePlan, decode_loop, decode_start, forward_jit, init_engine_cache, plan_cache,
                            prefill)
from kvjax.layerwise import LayerwiseCache
from kvjax.ring import policy_config, policy_part, with_policy_part
from kvjax.sampling import Sampling
from models.config import ModelConfig
from models.llama import unstack_params


# ---------------------------------------------------------------------------------------------
# Metrics

def log_softmax(logits: jax.Array) -> jax.Array:
    """float32 log-probabilities over the last axis."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def kl_per_token(full_logits: jax.Array, comp_logits: jax.Array) -> jax.Array:
    """KL(p_full || p_comp) in nats for every position: logits [..., vocab] -> [...]."""
    full_logits, comp_logits = jnp.asarray(full_logits), jnp.asarray(comp_logits)
    if full_logits.shape != comp_logits.shape:
        raise ValueError(f"logit shapes differ: full {full_logits.shape} vs compressed {comp_logits.shape}")
    lp, lq = log_softmax(full_logits), log_softmax(comp_logits)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    return jnp.maximum(kl, 0.0)  # exact KL is >= 0; float rounding can give -1e-9


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) for logits [..., vocab] and int targets [...] -> [...]."""
    lp = log_softmax(logits)
    return jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def perplexity(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None) -> float:
    """exp of the mean negative log-likelihood of `targets [...]` under `logits [..., vocab]`."""
    nll = -token_logprobs(logits, targets)
    if mask is None:
        return float(jnp.exp(jnp.mean(nll)))
    mask = jnp.asarray(mask, jnp.float32)
    return float(jnp.exp(jnp.sum(nll * mask) / jnp.sum(mask)))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compiled execution, so timings exclude compilation.

class Runner:
    """Calls jitted functions through AOT executables cached per (function, static args, shapes).

    `jax.jit(f).lower(...).compile()` does not fill `f`'s own dispatch cache, so this object keeps
    the executables; one Runner per evaluation run (no module state). `compile_s` accumulates
    the seconds spent tracing and compiling; `timed` returns (result, execution seconds)."""

    def __init__(self):
        self._exe: dict = {}
        self.compile_s = 0.0

    def _key(self, fn, args, static):
        leaves, tree = jax.tree_util.tree_flatten(args)
        shapes = tuple((tuple(np.shape(x)), str(jnp.result_type(x)), getattr(x, "sharding", None)) for x in leaves)
        return (fn, tuple(sorted(static.items())), tree, shapes)

    def __call__(self, fn, *args, **static):
        key = self._key(fn, args, static)
        exe = self._exe.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args, **static).compile()
            self.compile_s += time.perf_counter() - t0
            self._exe[key] = exe
        return exe(*args)

    def timed(self, fn, *args, **static):
        """Compile if needed (not timed), then run and block: (result, seconds of execution)."""
        key = self._key(fn, args, static)
        if key not in self._exe:
            t0 = time.perf_counter()
            self._exe[key] = fn.lower(*args, **static).compile()
            self.compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(self._exe[key](*args))
        return out, time.perf_counter() - t0


def _own_buffers(tree):
    """A copy of a cache (the engine's jitted steps donate their cache argument)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def _place(mesh, config: ModelConfig, cache, state=None, *batch):
    """(cache, state, *batch) placed on `mesh` (cache and state per `kvjax.sharding.cache_specs`,
    token arrays with the batch over "data"); unchanged without a mesh."""
    if mesh is None:
        return (cache, state, *batch)
    cache = sharding.shard_cache(cache, config, mesh)
    state = None if state is None else sharding.shard_cache(state, config, mesh)
    return (cache, state, *sharding.shard_batch(tuple(batch), mesh))


def _layers(params):
    return params if isinstance(params["layers"], (tuple, list)) else unstack_params(params)


# ---------------------------------------------------------------------------------------------
# Prefill (optionally compressed) and teacher-forced continuation

@dataclasses.dataclass
class Prefilled:
    """A context after prefill (and compression), ready for the continuation.

    logits [batch, vocab]: next-token logits after the last context token; cache: allocated at
    `plan.decode_capacity` slots; state: running score of accumulating policies (or None);
    compression: None when no compression happened (full cache, or a budget >= the context);
    seconds: prefill + compression execution time; peak_bytes: largest cache allocated."""

    logits: jax.Array
    cache: kvcache.KVCache
    state: Optional[jax.Array]
    plan: CachePlan
    compression: Optional[Compression]
    context_len: int
    seconds: float
    peak_bytes: int
    notes: tuple[str, ...] = ()
    start: Optional[jax.Array] = None  # [batch] first continuation position, when not the default


def check_tokens(tokens) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, seq] array, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    return tokens.astype(jnp.int32)


def _positions(tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def prefill_context(params, config: ModelConfig, tokens, compression: Optional[Compression] = None,
                    max_new_tokens: int = 1, chunk_size: Optional[int] = None,
                    runner: Optional[Runner] = None, cache_dtype=None, attention: str = "auto",
                    kv_quant: Optional[Callable] = None, mesh=None) -> Prefilled:
    """Prefill `tokens [batch, T]` (unpadded, equal lengths) and compress as `compression` says,
    with the engine's own `kvjax.generate.prefill` (capacities from `generate.plan_cache`; "chunk"
    compresses after every chunk of `chunk_size` tokens, "prefill"/"decode" once at the end).
    The cache comes back with `plan.decode_capacity` slots (room for `max_new_tokens`).
    kv_quant: a quantized `cache_init` (kvjax.quant.make_cache_init) storing the kept tokens after
    the full-precision prefill and compression (kvjax.quant.evicted; KIVI only).
    mesh: a `jax.sharding.Mesh` ("data", "model"); `params` already placed on it
    (`kvjax.sharding.shard_params`): the tokens, cache and policy state are placed on it too.
    seconds: wall time of the prefill (compilation of a new shape included)."""
    runner = runner or Runner()
    params = _layers(params)
    tokens = check_tokens(tokens)
    b, t = tokens.shape
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if compression is not None and compression.when == "chunk" and not chunk_size:
        raise ValueError("compression when='chunk' needs a chunk_size")
    evict = None
    if kv_quant is not None:
        from kvjax.quant.evicted import check_combination
        if compression is None:
            raise ValueError("kv_quant in prefill_context stores a compression's kept tokens: give a compression "
                             "(a quantized full cache: prefill_quantized)")
        evict = check_combination(compression, kv_quant)
        compression = evict.compression
    plan = plan_cache(t, [t] * b, max_new_tokens, chunk_size, compression)
    comp = plan.compression  # None when the budget keeps the whole context
    cache = init_engine_cache(config, b, plan.prefill_capacity,
                              params["embed"].dtype if cache_dtype is None else cache_dtype, context=t + max_new_tokens)
    peak = cache.memory_bytes()
    state = (jnp.zeros((policy_config(config).n_layers, b, config.n_kv_heads, plan.prefill_capacity), jnp.float32)
             if comp is not None and comp.policy.accumulates else None)
    n_keep = jnp.asarray(plan.n_keep, jnp.int32) if comp is not None else None
    positions = _positions(tokens)
    cache, state, tokens, positions = _place(mesh, config, cache, state, tokens, positions)
    t0 = time.perf_counter()
    with sharding.use(mesh):
        logits, cache, state = prefill(params, config, tokens, positions, cache, chunk_size, False, comp,
                                       n_keep, plan.max_keep, state, attention)
    cache = cache.resize(plan.decode_capacity)
    if state is not None:
        extra = max(plan.decode_capacity - state.shape[-1], 0)
        state = jnp.pad(state, [(0, 0)] * 3 + [(0, extra)])[..., :plan.decode_capacity]
    if evict is not None:          # the global layers' kept tokens (sliding-window rings stay dense)
        cache = with_policy_part(cache, evict.quantize(policy_part(cache, config)), config)
        if state is not None:
            state = jnp.pad(state, [(0, 0)] * 3 + [(0, cache.capacity - state.shape[-1])])
    cache, state = _place(mesh, config, cache, state)[:2]   # compression may have built another layout
    cache, state = jax.block_until_ready((cache, state))
    secs = time.perf_counter() - t0
    peak = max(peak, cache.memory_bytes())
    return Prefilled(logits, cache, state, plan, comp, t, secs, peak, plan.notes)


def teacher_forced(params, config: ModelConfig, pre: "Prefilled", feed, runner: "Runner", attention: str = "auto"):
    """Feed `feed [batch, n]` one decode step at a time through the engine's `decode_loop` (tokens
    given instead of sampled; "decode" compressions act as in generate).
    returns ((log-probs [batch, n, vocab] after each fed token except the last, ...), seconds)."""
    in_loop = pre.compression is not None and pre.compression.when == "decode"
    n = feed.shape[1]
    n_keep = jnp.asarray(pre.plan.n_keep if pre.plan.n_keep else (0,) * feed.shape[0], jnp.int32)
    static = dict(config=config, sampling=Sampling(), max_new_tokens=n + 1, eos_ids=(),
                  compression=pre.compression if in_loop else None, attention=attention)
    forced = jnp.concatenate([feed[:, 1:], feed[:, -1:]], axis=1)         # the last one is never fed
    args = (_layers(params), _own_buffers(pre.cache), feed[:, 0], start_positions(pre), jax.random.PRNGKey(0),
            None if pre.state is None else jnp.copy(pre.state), n_keep, forced)
    out, secs = runner.timed(decode_loop, *args, **static)
    return out, secs


def start_positions(pre: Prefilled) -> jax.Array:
    """[batch] position of the first continuation token: the context length, or right after the
    highest in-cache position for re-rotating policies (kvjax.generate's convention); `pre.start`
    when the prefill set it (Locret's contiguous in-cache positions)."""
    if pre.start is not None:
        return pre.start
    return decode_start(pre.cache, [pre.context_len] * pre.logits.shape[0], pre.compression)


def continuation_logits(params, config: ModelConfig, pre: Prefilled, targets, *, stepwise: bool = True,
                        runner: Optional[Runner] = None, attention: str = "auto"):
    """Next-token log-probabilities for every continuation token: `targets [batch, C]` ->
    [batch, C, vocab] where [:, i] predicts targets[:, i] (i = 0 from the prefill).

    stepwise: feed targets[:, :-1] one decode step at a time (the engine's decode loop; required for
    "decode" compression); otherwise in one forward over the compressed cache. Returns
    (log-probs, seconds, cache)."""
    runner = runner or Runner()
    targets = check_tokens(targets)
    c = targets.shape[1]
    if c > pre.plan.decode_capacity - int(jnp.max(policy_part(pre.cache, config).lengths)) and not (
            pre.compression is not None and pre.compression.when == "decode"):
        raise ValueError(f"{c} continuation tokens do not fit the cache ({pre.plan.decode_capacity} slots)")
    first = jax.nn.log_softmax(pre.logits[:, None].astype(jnp.float32), axis=-1)
    if c == 1:
        return first, 0.0, pre.cache
    feed = targets[:, :-1]
    start = start_positions(pre)
    in_loop = pre.compression is not None and pre.compression.when == "decode"
    if stepwise or in_loop:
        (_, _, cache, _, logp), secs = teacher_forced(params, config, pre, feed, runner, attention)
    else:
        pos = start[:, None] + jnp.arange(c - 1, dtype=jnp.int32)[None]
        (logits, cache, _), secs = runner.timed(forward_jit, _layers(params), feed, pos, _own_buffers(pre.cache),
                                                config=config, all_logits=True, attention=attention)
        logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.concatenate([first, logp], axis=1), secs, cache


def decode_seconds_per_token(params, config: ModelConfig, pre: Prefilled, targets, n_steps: int,
                             runner: Optional[Runner] = None) -> float:
    """Time `n_steps` real decode steps (teacher-forced on targets[:, :n_steps]) over the prefilled
    cache with the engine's decode loop: seconds per step, compilation excluded."""
    runner = runner or Runner()
    targets = check_tokens(targets)
    n = min(n_steps, targets.shape[1])
    if n <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    _, secs = teacher_forced(params, config, pre, targets[:, :n], runner)
    return secs / n


def prefill_locret(params, config: ModelConfig, tokens, heads: dict, policy, max_new_tokens: int = 1,
                   runner: Optional[Runner] = None) -> Prefilled:
    """Locret's chunked prefill with trained retaining heads (`kvjax.policies.locret.locret_prefill`)
    of `tokens [batch, T]`, with room for `max_new_tokens`. The continuation then goes at the
    contiguous in-cache positions (`Prefilled.start`). `seconds` is a second (compiled) run; peak
    bytes: the largest cache the loop allocates (retained + chunk, or the final one)."""
    from kvjax.policies.locret import locret_prefill
    runner = runner or Runner()
    tokens = check_tokens(tokens)
    b, t = tokens.shape
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    run = lambda: jax.block_until_ready(locret_prefill(params, config, heads, tokens, policy,
                                                       extra_capacity=max_new_tokens))
    t0 = time.perf_counter()
    run()                                        # compiles chunk_step for these shapes
    runner.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, state = run()
    secs = time.perf_counter() - t0
    cache = state.cache
    n_loc = min(policy.n_local, t - 1)
    m = t - n_loc
    chunk_cap = min(policy.budget + policy.chunk, m) if m > policy.chunk else m
    per_slot = cache.memory_bytes() / cache.capacity
    peak = int(max(chunk_cap, cache.capacity) * per_slot)
    kept = int(jnp.max(cache.lengths))
    plan = CachePlan(chunk_cap, cache.capacity, kept, (kept,) * b)
    start = (jnp.max(cache.positions, axis=(0, 2, 3)) + 1).astype(jnp.int32)
    return Prefilled(logits, cache, None, plan, None, t, secs, peak, (), start)


def prefill_quantized(params, config: ModelConfig, tokens, cache_init: Callable, max_new_tokens: int = 1,
                      runner: Optional[Runner] = None, cache_dtype=None, mesh=None) -> Prefilled:
    """Prefill `tokens [batch, T]` into a quantized cache `cache_init(config, batch, T + max_new_tokens)`
    (e.g. `kvjax.quant.make_cache_init("kivi2")`): the whole context is kept (full token budget).
    cache_dtype: of the cache's fp parts (default: the parameters' dtype, as in generate).
    mesh: as in `prefill_context`."""
    runner = runner or Runner()
    tokens = check_tokens(tokens)
    b, t = tokens.shape
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    cache = init_engine_cache(config, b, t + max_new_tokens,
                              params["embed"].dtype if cache_dtype is None else cache_dtype, cache_init)
    cache, _, tokens, positions = _place(mesh, config, cache, None, tokens, _positions(tokens))
    t0 = time.perf_counter()
    with sharding.use(mesh):
        logits, cache, _ = prefill(_layers(params), config, tokens, positions, cache)
    cache = _place(mesh, config, cache)[0]
    logits = jax.block_until_ready(logits)
    secs = time.perf_counter() - t0
    plan = CachePlan(t + max_new_tokens, t + max_new_tokens, t, (t,) * b)
    return Prefilled(logits, cache, None, plan, None, t, secs, cache.memory_bytes())


def fidelity_metrics(full_logits, comp_logits, targets) -> dict:
    """kl (mean nats/token), kl_max, ppl (compressed), ppl_full and nll gap, over [batch, C]."""
    kl = kl_per_token(full_logits, comp_logits)
    return {"kl": float(jnp.mean(kl)), "kl_max": float(jnp.max(kl)),
            "ppl": perplexity(comp_logits, targets), "ppl_full": perplexity(full_logits, targets)}


def split_text(tokenizer, text: str, context_tokens: int, continuation_tokens: int) -> tuple[list[int], list[int]]:
    """Tokenize `text` and cut it into a context of `context_tokens` and the next
    `continuation_tokens` tokens. ValueError if the text is too short."""
    if context_tokens <= 0 or continuation_tokens <= 0:
        raise ValueError(f"context and continuation lengths must be positive, got {context_tokens}, "
                         f"{continuation_tokens}")
    ids = tokenizer.encode(text)
    need = context_tokens + continuation_tokens
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, need {need} (context {context_tokens} + "
                         f"continuation {continuation_tokens})")
    return ids[:context_tokens], ids[context_tokens:need]


def evaluate_fidelity(params, config: ModelConfig, context: Sequence[int], continuation: Sequence[int],
                      compression: Optional[Compression] = None, *, chunk_size: Optional[int] = None,
                      stepwise: bool = False, runner: Optional[Runner] = None,
                      full_logits: Optional[jax.Array] = None) -> dict:
    """One fidelity measurement for one context: the full cache (reference) and `compression`.

    Returns the metrics of `fidelity_metrics` plus cache bytes and timings; `full_logits`
    ([1, C, vocab]) may be passed to skip the reference run."""
    runner = runner or Runner()
    ctx = jnp.asarray([list(context)], jnp.int32)
    tgt = jnp.asarray([list(continuation)], jnp.int32)
    if full_logits is None:
        ref = prefill_context(params, config, ctx, None, tgt.shape[1], runner=runner)
        full_logits, _, _ = continuation_logits(params, config, ref, tgt, stepwise=False, runner=runner)
    chunk = chunk_size if (compression is not None and compression.when == "chunk") else None
    pre = prefill_context(params, config, ctx, compression, tgt.shape[1], chunk, runner=runner)
    logits, secs, cache = continuation_logits(params, config, pre, tgt, stepwise=stepwise, runner=runner)
    out = fidelity_metrics(full_logits, logits, tgt)
    out.update(cache_bytes=cache.memory_bytes(), peak_cache_bytes=max(pre.peak_bytes, cache.memory_bytes()),
               prefill_s=pre.seconds, continuation_s=secs, notes=pre.notes)
    return out
