"""Jitted generation: (chunked) prefill, then a decode loop under `lax.while_loop`.

    result = generate(params, config, [tokenizer.encode(prompt)], max_new_tokens=64)

Prompts of a batch are left-padded (padding gets position -1 and is never attended to), so every
row's last prompt token sits at the same index and decode advances all rows in lock-step, each
with its own position. Compiled functions are cached per shape bucket: prompt lengths are rounded
up to a multiple of `bucket` tokens.
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
from kvjax.sampling import Sampling, sample
from models.config import ModelConfig
from models.llama import Observe, forward


@dataclasses.dataclass
class GenerateResult:
    """tokens: generated ids per row (EOS included when hit); stats: timings and memory."""

    tokens: list[list[int]]
    stats: dict
    text: Optional[list[str]] = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length rounded up to `bucket`.

    returns tokens [batch, T] int32 and positions [batch, T] int32 (-1 on padding)."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: nothing to condition on")
    longest = max(len(p) for p in prompts)
    t = -(-longest // bucket) * bucket
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    positions = np.full((len(prompts), t), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        positions[i, t - len(p):] = np.arange(len(p))
    return tokens, positions


@functools.partial(jax.jit, static_argnames=("config", "observe", "all_logits"))
def forward_jit(params, tokens, positions, cache, config: ModelConfig, observe: Observe = Observe(),
                all_logits: bool = False):
    """`models.llama.forward` compiled once per (shapes, config, observe)."""
    return forward(params, tokens, positions, cache, config, observe, all_logits)


def prefill(params, config: ModelConfig, tokens, positions, cache: kvcache.KVCache,
            chunk_size: Optional[int] = None, progress: bool = False,
            after_chunk: Optional[Callable] = None, observe: Observe = Observe()):
    """Feed the prompt through the model, in chunks of `chunk_size` tokens if given.

    tokens, positions: [batch, T]. after_chunk(cache, observations, chunk_end) -> cache is called
    after every chunk (a compression policy's hook). returns (last-position logits [batch, vocab], cache)."""
    t = tokens.shape[1]
    chunk = t if not chunk_size else chunk_size
    starts = range(0, t, chunk)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="prefill", unit="chunk")
    logits = None
    for s in starts:
        e = min(s + chunk, t)
        logits, cache, obs = forward_jit(params, tokens[:, s:e], positions[:, s:e], cache, config, observe)
        if after_chunk is not None:
            cache = after_chunk(cache, obs, e)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens", "eos_ids"))
def decode_loop(params, cache: kvcache.KVCache, first_token, start_positions, key, *, config: ModelConfig,
                sampling: Sampling, max_new_tokens: int, eos_ids: tuple[int, ...]):
    """Autoregressive decode after prefill.

    first_token: [batch] int32, the token sampled from the prefill logits (output slot 0).
    start_positions: [batch] int32, the position of first_token for each row.
    returns (tokens [batch, max_new_tokens] with eos_ids[0] (or 0) after a row stopped,
             n_steps: number of tokens written, cache)."""
    batch = first_token.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    filler = eos_ids[0] if eos_ids else 0
    out = jnp.full((batch, max_new_tokens), filler, jnp.int32).at[:, 0].set(first_token)
    done = jnp.isin(first_token, eos)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tok, pos, out, done, key = state
        key, sub = jax.random.split(key)
        logits, cache, _ = forward(params, tok[:, None], pos[:, None], cache, config, Observe(), False)
        nxt = sample(logits[:, -1], sub, sampling)
        nxt = jnp.where(done, filler, nxt)
        out = out.at[:, step].set(nxt)
        return step + 1, cache, nxt, pos + 1, out, done | jnp.isin(nxt, eos), key

    state = (jnp.int32(1), cache, first_token, start_positions, out, done, key)
    step, cache, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out, step, cache


def _trim(row: np.ndarray, n: int, eos_ids: tuple[int, ...]) -> list[int]:
    row = row[:n].tolist()
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             sampling: Sampling = Sampling(), chunk_size: Optional[int] = None,
             capacity: Optional[int] = None, cache_dtype=jnp.float32, pad_id: int = 0,
             eos_ids: Optional[tuple[int, ...]] = None, seed: int = 0, bucket: int = 64,
             progress: bool = False) -> GenerateResult:
    """Generate up to `max_new_tokens` for each prompt (a list of token-id lists).

    capacity: cache slots per head; defaults to the padded prompt length + max_new_tokens.
    Raises ValueError for empty prompts, prompts that do not fit the capacity or the model's
    context, and non-positive max_new_tokens."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    eos_ids = tuple(config.eos_token_ids if eos_ids is None else eos_ids)
    tokens, positions = left_pad(prompts, pad_id, bucket)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {config.max_position} positions")
    needed = tokens.shape[1] + max_new_tokens
    if capacity is None:
        capacity = needed
    elif needed > capacity:
        raise ValueError(f"prompt of {tokens.shape[1]} padded tokens + {max_new_tokens} new tokens needs "
                         f"{needed} cache slots, but capacity is {capacity}")
    cache = kvcache.init_cache(config.n_layers, len(prompts), config.n_kv_heads, capacity,
                               config.head_dim, cache_dtype)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)

    t0 = time.perf_counter()
    last_logits, cache = prefill(params, config, jnp.asarray(tokens), jnp.asarray(positions), cache,
                                 chunk_size, progress)
    first = sample(last_logits, sub, sampling)
    first.block_until_ready()
    t1 = time.perf_counter()
    start = jnp.asarray([len(p) for p in prompts], jnp.int32)
    out, steps, cache = decode_loop(params, cache, first, start, key, config=config, sampling=sampling,
                                    max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    out = np.asarray(out)
    steps = int(steps)
    t2 = time.perf_counter()
    rows = [_trim(r, steps, eos_ids) for r in out]
    n_prompt = sum(len(p) for p in prompts)
    stats = {
        "prompt_tokens": n_prompt,
        "generated_tokens": sum(len(r) for r in rows),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tok_per_s": n_prompt / (t1 - t0),
        "decode_tok_per_s": len(prompts) * max(steps - 1, 1) / (t2 - t1),
        "cache_bytes": cache.memory_bytes(),
        "cache_capacity": cache.capacity,
        "backend": jax.default_backend(),
        "attention": "xla-reference",
    }
    return GenerateResult(tokens=rows, stats=stats)
