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
from kvjax.compression import (Compression, accumulate, compress_cache, decode_compress, init_query_buffer,
                               push_query)
from kvjax.generate import CachePlan, continue_positions, decode_start, forward_jit, plan_cache
from models.config import ModelConfig
from models.llama import Observe, forward


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
        shapes = tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)
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


@functools.partial(jax.jit, static_argnames=("policy", "config"))
def _accumulate(cache, obs, state, *, policy, config):
    return accumulate(policy, config, cache, obs, state)


@functools.partial(jax.jit, static_argnames=("policy", "config", "capacity", "max_keep"))
def _compress(cache, obs, n_keep, state, *, policy, config, capacity, max_keep):
    return compress_cache(policy, config, cache, obs, n_keep, capacity, max_keep, state)


def _resize(cache, state, capacity: int):
    """generate's post-prefill resize (eager: shrinking checks the live lengths) -> (cache, state, seconds)."""
    t0 = time.perf_counter()
    cache = kvcache.resize(cache, capacity)
    if state is not None:
        extra = max(capacity - state.shape[-1], 0)
        state = jnp.pad(state, [(0, 0)] * 3 + [(0, extra)])[..., :capacity]
    cache, state = jax.block_until_ready((cache, state))
    return cache, state, time.perf_counter() - t0


_continue_positions = jax.jit(continue_positions)


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


@dataclasses.dataclass
class ForwardOut:
    """One unchunked forward over the whole context (shareable by every policy with the same
    `observe`): last logits [batch, vocab], the full cache, the observation dict, seconds."""

    logits: jax.Array
    cache: kvcache.KVCache
    obs: dict
    seconds: float
    observe: Observe


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


def forward_context(params, config: ModelConfig, tokens, observe: Observe = Observe(),
                    runner: Optional[Runner] = None, cache_dtype=jnp.float32) -> ForwardOut:
    """One forward over the whole context `tokens [batch, T]` (positions 0..T-1) into a cache of
    exactly T slots, returning what `observe` asks for."""
    runner = runner or Runner()
    tokens = check_tokens(tokens)
    cache = kvcache.init_cache(config.n_layers, tokens.shape[0], config.n_kv_heads, tokens.shape[1],
                               config.head_dim, cache_dtype)
    (logits, cache, obs), secs = runner.timed(forward_jit, params, tokens, _positions(tokens), cache,
                                              config=config, observe=observe, all_logits=False)
    return ForwardOut(logits[:, -1], cache, obs, secs, observe)


def prefill_context(params, config: ModelConfig, tokens, compression: Optional[Compression] = None,
                    max_new_tokens: int = 1, chunk_size: Optional[int] = None,
                    runner: Optional[Runner] = None, shared: Optional[ForwardOut] = None,
                    cache_dtype=jnp.float32) -> Prefilled:
    """Prefill `tokens [batch, T]` (unpadded, equal lengths) and compress as `compression` says.

    Mirrors `kvjax.generate.prefill` + `generate`'s resize: capacities come from
    `generate.plan_cache`; "chunk" compresses after every chunk of `chunk_size` tokens,
    "prefill"/"decode" once at the end. `shared`: a `forward_context` output with this
    compression's `observe`, reused instead of recomputing the forward (unchunked only).
    The cache comes back with `plan.decode_capacity` slots (room for `max_new_tokens`)."""
    runner = runner or Runner()
    tokens = check_tokens(tokens)
    b, t = tokens.shape
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if compression is not None and compression.when == "chunk" and not chunk_size:
        raise ValueError("compression when='chunk' needs a chunk_size")
    plan = plan_cache(t, [t] * b, max_new_tokens, chunk_size, compression)
    comp = plan.compression  # None when the budget keeps the whole context
    positions = _positions(tokens)
    secs = 0.0
    if comp is None or (comp.when != "chunk" and not chunk_size):
        observe = comp.observe if comp is not None else Observe()
        if shared is None or shared.observe != observe or shared.cache.keys.shape[1] != b:
            shared = forward_context(params, config, tokens, observe, runner, cache_dtype)
        logits, cache, obs, secs = shared.logits, shared.cache, shared.obs, shared.seconds
        peak = cache.memory_bytes()
        state = jnp.zeros(cache.positions.shape, jnp.float32) if comp is not None and comp.policy.accumulates else None
        if comp is not None:
            if state is not None:
                state, s = runner.timed(_accumulate, cache, obs, state, policy=comp.policy, config=config)
                secs += s
            n_keep = jnp.asarray(plan.n_keep, jnp.int32)
            (cache, state), s = runner.timed(_compress, cache, obs, n_keep, state, policy=comp.policy,
                                             config=config, capacity=plan.max_keep, max_keep=plan.max_keep)
            secs += s
    else:  # chunked prefill, compressed after every chunk ("chunk") or once at the end
        cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, plan.prefill_capacity,
                                   config.head_dim, cache_dtype)
        peak = cache.memory_bytes()
        observe = comp.observe
        state = jnp.zeros(cache.positions.shape, jnp.float32) if comp.policy.accumulates else None
        n_keep = jnp.asarray(plan.n_keep, jnp.int32)
        obs, logits = {}, None
        for s0 in range(0, t, chunk_size):
            pos = positions[:, s0:s0 + chunk_size]
            if comp.policy.rerotate and s0 > 0:
                pos, s = runner.timed(_continue_positions, cache, pos)
                secs += s
            (logits, cache, obs), s = runner.timed(forward_jit, params, tokens[:, s0:s0 + chunk_size], pos, cache,
                                                   config=config, observe=observe, all_logits=False)
            secs += s
            logits = logits[:, -1]
            if state is not None:
                state, s = runner.timed(_accumulate, cache, obs, state, policy=comp.policy, config=config)
                secs += s
            if comp.when == "chunk":
                (cache, state), s = runner.timed(_compress, cache, obs, n_keep, state, policy=comp.policy,
                                                 config=config, capacity=cache.capacity, max_keep=plan.max_keep)
                secs += s
        if comp.when != "chunk":
            (cache, state), s = runner.timed(_compress, cache, obs, n_keep, state, policy=comp.policy,
                                             config=config, capacity=plan.max_keep, max_keep=plan.max_keep)
            secs += s
    cache, state, s = _resize(cache, state, plan.decode_capacity)
    secs += s
    peak = max(peak, cache.memory_bytes())
    return Prefilled(logits, cache, state, plan, comp, t, secs, peak, plan.notes)


@functools.partial(jax.jit, static_argnames=("config", "compression", "max_keep"))
def teacher_forced_steps(params, cache, tokens, start, state, n_keep, *, config: ModelConfig,
                         compression: Optional[Compression], max_keep: int):
    """Feed `tokens [batch, n]` one decode step at a time (a `lax.scan`), like
    `generate.decode_loop` but with the tokens given instead of sampled.

    start [batch]: position of tokens[:, 0]. With a "decode" compression, whenever a head's slots
    are full the cache is compressed back to `n_keep` before the step (same rule, same
    query-buffer observation as decode_loop), and re-rotating policies continue after the in-cache positions.
    returns (logits [batch, n, vocab] after each fed token, cache)."""
    in_loop = compression is not None and compression.when == "decode"
    observe = compression.decode_observe if in_loop else Observe()
    buf = init_query_buffer(compression, config, tokens.shape[0],
                            cache.keys.dtype if isinstance(cache, kvcache.KVCache) else jnp.float32) \
        if in_loop else None

    def body(carry, tok):
        cache, pos, state, buf = carry
        if in_loop:
            cache, state, buf = decode_compress(compression, config, cache, state, buf, n_keep, max_keep)
            if compression.policy.rerotate:
                pos = jnp.max(cache.positions, axis=(0, 2, 3)) + 1
        logits, cache, obs = forward(params, tok[:, None], pos[:, None], cache, config, observe, False)
        if in_loop:
            state = accumulate(compression.policy, config, cache, obs, state)
            buf = push_query(buf, obs, pos)
        return (cache, pos + 1, state, buf), logits[:, -1]

    (cache, _, _, _), logits = jax.lax.scan(body, (cache, start, state, buf), jnp.swapaxes(tokens, 0, 1))
    return jnp.swapaxes(logits, 0, 1), cache


def start_positions(pre: Prefilled) -> jax.Array:
    """[batch] position of the first continuation token: the context length, or right after the
    highest in-cache position for re-rotating policies (kvjax.generate's convention); `pre.start`
    when the prefill set it (Locret's contiguous in-cache positions)."""
    if pre.start is not None:
        return pre.start
    return decode_start(pre.cache, [pre.context_len] * pre.logits.shape[0], pre.compression)


def continuation_logits(params, config: ModelConfig, pre: Prefilled, targets, *, stepwise: bool = True,
                        runner: Optional[Runner] = None) -> tuple[jax.Array, float, kvcache.KVCache]:
    """Next-token logits for every continuation token: `targets [batch, C]` ->
    logits [batch, C, vocab] where logits[:, i] predicts targets[:, i] (i = 0 from the prefill).

    stepwise: feed targets[:, :-1] one decode step at a time (required for "decode" compression);
    otherwise in one forward over the compressed cache. Returns (logits, seconds, cache)."""
    runner = runner or Runner()
    targets = check_tokens(targets)
    c = targets.shape[1]
    if c > pre.plan.decode_capacity - int(jnp.max(pre.cache.lengths)) and not (
            pre.compression is not None and pre.compression.when == "decode"):
        raise ValueError(f"{c} continuation tokens do not fit the cache ({pre.plan.decode_capacity} slots)")
    first = pre.logits[:, None]
    if c == 1:
        return first, 0.0, pre.cache
    feed = targets[:, :-1]
    start = start_positions(pre)
    in_loop = pre.compression is not None and pre.compression.when == "decode"
    if stepwise or in_loop:
        n_keep = jnp.asarray(pre.plan.n_keep if pre.plan.n_keep else (0,) * targets.shape[0], jnp.int32)
        max_keep = pre.cache.capacity - pre.compression.interval if in_loop else 0
        (logits, cache), secs = runner.timed(teacher_forced_steps, params, pre.cache, feed, start, pre.state,
                                             n_keep, config=config,
                                             compression=pre.compression if in_loop else None, max_keep=max_keep)
    else:
        pos = start[:, None] + jnp.arange(c - 1, dtype=jnp.int32)[None]
        (logits, cache, _), secs = runner.timed(forward_jit, params, feed, pos, pre.cache, config=config,
                                                observe=Observe(), all_logits=True)
    return jnp.concatenate([first, logits], axis=1), secs, cache


def decode_seconds_per_token(params, config: ModelConfig, pre: Prefilled, targets, n_steps: int,
                             runner: Optional[Runner] = None) -> float:
    """Time `n_steps` real decode steps (teacher-forced on targets[:, :n_steps]) over the prefilled
    cache, as `teacher_forced_steps` runs them: seconds per step, compilation excluded.
    A cheap decode-speed probe when the continuation's quality is computed in one forward."""
    runner = runner or Runner()
    targets = check_tokens(targets)
    n = min(n_steps, targets.shape[1])
    if n <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    in_loop = pre.compression is not None and pre.compression.when == "decode"
    n_keep = jnp.asarray(pre.plan.n_keep if pre.plan.n_keep else (0,) * targets.shape[0], jnp.int32)
    max_keep = pre.cache.capacity - pre.compression.interval if in_loop else 0
    _, secs = runner.timed(teacher_forced_steps, params, pre.cache, targets[:, :n], start_positions(pre), pre.state,
                           n_keep, config=config, compression=pre.compression if in_loop else None,
                           max_keep=max_keep)
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
                      runner: Optional[Runner] = None) -> Prefilled:
    """Prefill `tokens [batch, T]` into a quantized cache `cache_init(config, batch, T + max_new_tokens)`
    (e.g. `kvjax.quant.make_cache_init("kivi2")`): the whole context is kept (full token budget)."""
    runner = runner or Runner()
    tokens = check_tokens(tokens)
    b, t = tokens.shape
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    cache = cache_init(config, b, t + max_new_tokens)
    (logits, cache, _), secs = runner.timed(forward_jit, params, tokens, _positions(tokens), cache,
                                            config=config, observe=Observe(), all_logits=False)
    plan = CachePlan(t + max_new_tokens, t + max_new_tokens, t, (t,) * b)
    return Prefilled(logits[:, -1], cache, None, plan, None, t, secs, cache.memory_bytes())


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
