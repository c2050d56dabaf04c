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
import sys
import time
import types
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import check_backend, decode_impl, dense_kernel_ok, kivi_kernel_ok, qjl_kernel_ok
from kvjax.compression import (Compression, compress_cache, decode_compress, fit_window, init_query_buffer,
                               push_query)
from kvjax.layerwise import LayerwiseCache, per_layer
from kvjax.ring import (RingCache, first_policy_layer, init_ring, policy_config, policy_part, policy_positions,
                        with_policy_part)
from kvjax.observation import Observe, Observer, bind_weights, split_weights
from kvjax.sampling import Sampling, sample
from models.config import ModelConfig
from models.llama import forward, unstack_params


@dataclasses.dataclass
class GenerateResult:
    """tokens: generated ids per row (EOS included when hit); stats: timings and memory;
    cache: the cache after the last decode step (for inspection)."""

    tokens: list[list[int]]
    stats: dict
    text: Optional[list[str]] = None
    cache: Optional[object] = None


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


_FORWARD_STATIC = ("config", "observe", "all_logits", "observer", "attention", "prefill_attention")


def _forward(params, tokens, positions, cache, config: ModelConfig, observe: Observe = Observe(),
             all_logits: bool = False, observer: Optional[Observer] = None, attention: str = "auto",
             accumulated=None, prefill_attention=None, policy_weights=None):
    if policy_weights is not None:          # a learned policy's arrays: jit arguments, not constants
        observer = dataclasses.replace(observer, policy=bind_weights(observer.policy, policy_weights))
    return forward(params, tokens, positions, cache, config, observe, all_logits, observer=observer,
                   attention=attention, accumulated=accumulated, prefill_attention=prefill_attention)


class _WithPolicyWeights:
    """A jitted `_forward` called with the observer's policy weights (`kvjax.observation.Frozen`
    fields) split off into the `policy_weights` argument: traced inputs, not baked-in constants.
    `lower` (and the jit's other attributes) work as on the jitted function."""

    def __init__(self, jitted):
        self.jitted = jitted
        functools.update_wrapper(self, _forward)

    @staticmethod
    def _split(observer, kwargs):
        policy, weights = split_weights(None if observer is None else observer.policy)
        if weights is None:          # the call (and `lower`'s compiled program) as without this wrapper
            return {**kwargs, "observer": observer}
        return {**kwargs, "observer": dataclasses.replace(observer, policy=policy), "policy_weights": weights}

    def __call__(self, *args, observer: Optional[Observer] = None, **kwargs):
        return self.jitted(*args, **self._split(observer, kwargs))

    def lower(self, *args, observer: Optional[Observer] = None, **kwargs):
        return self.jitted.lower(*args, **self._split(observer, kwargs))

    def __getattr__(self, name):
        return getattr(self.jitted, name)


forward_jit = _WithPolicyWeights(jax.jit(_forward, static_argnames=_FORWARD_STATIC))
forward_jit.__doc__ = """`models.llama.forward` compiled once per (shapes, config, observe, observer, attention)."""
# the engine's prefill step: same, with the cache donated (written in place, the argument is consumed)
forward_step = _WithPolicyWeights(jax.jit(_forward, static_argnames=_FORWARD_STATIC, donate_argnames=("cache",)))


def continue_positions(cache, positions: jax.Array) -> jax.Array:
    """Shift `positions [batch, new]` so each row continues after the highest position its cache
    holds (padding stays -1; a model's sliding-window rings are left out: `kvjax.ring`). Used when a
    policy re-assigns contiguous in-cache positions."""
    start = jnp.max(policy_positions(cache), axis=(0, 2, 3)) + 1        # [batch]
    first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max), axis=1)
    shifted = positions - first[:, None] + start[:, None]
    return jnp.where(positions >= 0, shifted, -1).astype(jnp.int32)


def quantizes_after_prefill(cache) -> bool:
    """Whether the cache's method prefills in full precision and quantizes the prompt afterwards
    (KIVI: `quantize_after_prefill` on its layer class), so `prefill` may run the prompt through
    a dense cache first."""
    layer = first_policy_layer(cache) if isinstance(cache, LayerwiseCache) and cache.layers else cache
    return isinstance(cache, LayerwiseCache) and bool(getattr(layer, "quantize_after_prefill", False))


@functools.partial(jax.jit, static_argnames=("t",), donate_argnames=("target",))
def _store_prompt(target, dense: kvcache.KVCache, positions: jax.Array, t: int):
    """Append the first `t` slots of one dense layer (the prompt, left padding included) to the
    empty quantized layer `target` (donated): the cache's own quantization rule (e.g. KIVI's)."""
    return target.append(dense.keys[..., :t, :], dense.values[..., :t, :], positions)


def prefill(params, config: ModelConfig, tokens, positions, cache, chunk_size: Optional[int] = None,
            progress: bool = False, compression: Optional[Compression] = None, n_keep=None, max_keep: int = 0,
            state=None, attention: str = "auto", all_logits: bool = False, dense_first: Optional[bool] = None,
            prefill_attention=None):
    """Feed the prompt through the model, in chunks of `chunk_size` tokens if given.

    tokens, positions: [batch, T]; cache: the engine's per-layer cache (donated: do not reuse the
    argument). With a compression whose `when` is "chunk", the cache is compressed to `n_keep`
    ([batch] tokens per head, at most `max_keep`) after every chunk; with "prefill"/"decode" it is
    compressed once at the end. The policy's observation is reduced inside the layers of the
    forward that precedes a compression (scores [L, B, Hkv, S]); accumulating policies update
    `state` ([layers, batch, kv_heads, capacity] or None) in every forward. `prefill_attention`: a
    `kvjax.sparse_prefill` method: chunks attend through the block-sparse kernel with its mask.
    dense_first: prefill through a dense cache of the same capacity (in `params`' dtype), then append
    the prompt's K/V to the given empty quantized cache: the prompt attends in full precision, as
    KIVI's prefill does, at the dense prefill's speed (peak memory: both caches). None: when the
    cache asks for it (`quantizes_after_prefill`) and no compression runs; False: the quantized
    cache's own append/attend in every chunk (earlier chunks seen dequantized; less memory).
    returns (logits [batch, vocab] of the last position, or [batch, T, vocab] with all_logits, cache, state)."""
    if dense_first is None:
        dense_first = compression is None and quantizes_after_prefill(cache)
    if dense_first:
        if compression is not None or not quantizes_after_prefill(cache):
            raise ValueError("dense_first prefill needs a per-layer cache whose method quantizes after prefill "
                             "(e.g. KIVI) and no compression")
        target = cache
        b, h = target.layers[0].lengths.shape
        rings = [lc.capacity for lc in target.layers if isinstance(lc, RingCache)]
        dense = init_engine_cache(config, b, target.capacity, params["embed"].dtype, context=max(rings, default=None))
        logits, dense, state = prefill(params, config, tokens, positions, dense, chunk_size, progress, None,
                                       n_keep, max_keep, state, attention, all_logits, dense_first=False)
        layers, dense_layers = list(target.layers), list(dense.layers)
        del dense
        for i in range(len(layers)):   # layer by layer: each dense layer is freed once stored
            layers[i] = (dense_layers[i] if isinstance(layers[i], RingCache)     # a local layer's ring as is
                         else _store_prompt(layers[i], dense_layers[i], positions, tokens.shape[1]))
            dense_layers[i] = None
        return logits, dataclasses.replace(target, layers=tuple(layers)), state
    t = tokens.shape[1]
    chunk = t if not chunk_size else chunk_size
    starts = list(range(0, t, chunk))
    it = starts
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        it = tqdm(starts, desc="prefill", unit="chunk")
    logits, pieces = None, []
    # "decode" with a budget the prompt fits in: nothing to evict yet (the decode loop compresses)
    at_end = compression is not None and not (compression.when == "decode" and max_keep >= t)
    for s in it:
        e = min(s + chunk, t)
        pos = positions[:, s:e]
        observer = None
        compress_now = False
        if compression is not None:
            if compression.policy.rerotate and s > 0:
                pos = continue_positions(cache, pos)   # in-cache positions: continue after the cache
            compress_now = compression.when == "chunk" or (s == starts[-1] and at_end)
            if compress_now or compression.policy.accumulates:
                observer = compression.observer(score=compress_now)
        logits, cache, outs = forward_step(params, tokens[:, s:e], pos, cache, config, all_logits=all_logits,
                                          observer=observer, attention=attention,
                                          accumulated=state if observer is not None and compression.policy.accumulates
                                          else None, prefill_attention=prefill_attention)
        if all_logits:
            pieces.append(logits)
        if observer is not None and compression.policy.accumulates:
            state = outs["accumulated"]
        if compress_now:
            capacity = cache.capacity if compression.when == "chunk" else max_keep
            cache, state = compress_cache(compression.policy, config, cache, outs, n_keep, capacity, max_keep, state)
    if all_logits:
        return jnp.concatenate(pieces, axis=1), cache, state
    return logits[:, -1], cache, state


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens", "eos_ids", "compression",
                                             "attention", "selection"),
                   donate_argnames=("cache", "state"))
def decode_loop(params, cache, first_token, start_positions, key, state=None, n_keep=None, forced=None, *,
                config: ModelConfig, sampling: Sampling, max_new_tokens: int, eos_ids: tuple[int, ...],
                compression: Optional[Compression] = None, attention: str = "auto", selection=None):
    """Autoregressive decode after prefill, updating the (donated) per-layer cache in place.

    first_token: [batch] int32, the token sampled from the prefill logits (output slot 0).
    start_positions: [batch] int32, the position of first_token for each row.
    forced: optional [batch, max_new_tokens - 1] int32 tokens to feed instead of sampling
    (teacher forcing, for evaluation); then also the log-softmax of every step's logits is returned.
    compression (when == "decode"): whenever a head's slots are full, compress back to
    `n_keep` [batch] tokens per head inside the loop (same capacity, so shapes stay static);
    window / query-statistics scorers observe the last decode queries (kvjax.compression.QueryBuffer).
    selection: optional query-aware selector (`kvjax.selection`, e.g. Quest): the cache's layers are
    wrapped with its metadata (built from the prefilled cache, kept up to date on append) and every
    decode step attends only to the tokens / pages it selects (the returned cache is the wrapped one).
    returns (tokens [batch, max_new_tokens] with eos_ids[0] (or 0) after a row stopped,
             n_steps: number of tokens written, cache, state, log-probs [batch, max_new_tokens - 1, vocab] or None)."""
    if selection is not None:
        from kvjax.selection import wrap
        if compression is not None and compression.when == "decode":
            raise ValueError("selection with decode-time compression is not supported (the selector's metadata "
                             "is built once after prefill)")
        from kvjax.selection.base import is_wrapped
        if getattr(selection, "offloaded", False) and not is_wrapped(cache):
            raise ValueError(f"{type(selection).__name__} with offload=True: wrap the cache before decode_loop "
                             "(cache = jax.jit(kvjax.selection.wrap, static_argnums=(0, 2))(selection, cache, config); "
                             "generate does this): host-memory (pinned_host) metadata created inside this jitted "
                             "loop aborts XLA:CPU with 'PjRtBuffer's memory kind does not match'")
        cache = wrap(selection, cache, config)
    batch = first_token.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    filler = eos_ids[0] if eos_ids else 0
    out = jnp.full((batch, max_new_tokens), filler, jnp.int32).at[:, 0].set(first_token)
    done = jnp.isin(first_token, eos) if forced is None else jnp.zeros((batch,), bool)
    in_loop = compression is not None and compression.when == "decode"
    observer = compression.decode_observer() if in_loop else None
    accumulates = in_loop and compression.policy.accumulates
    max_keep = cache.capacity - compression.interval if in_loop else 0
    # rolling buffer of the last decode queries: what window scorers observe when compressing
    buf = init_query_buffer(compression, policy_config(config), batch, _buffer_dtype(cache)) if in_loop else None
    logp = None
    if forced is not None:
        logp = jnp.zeros((batch, max(max_new_tokens - 1, 0), config.vocab_size), jnp.float32)

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tok, pos, out, done, key, state, buf, logp = carry
        key, sub = jax.random.split(key)
        if in_loop:  # make room first: the new token must fit
            cache, state, buf = decode_compress(compression, config, cache, state, buf, n_keep, max_keep)
            if compression.policy.rerotate:  # contiguous in-cache positions: continue after them
                pos = jnp.max(policy_positions(cache), axis=(0, 2, 3)) + 1
        logits, cache, outs = forward(params, tok[:, None], pos[:, None], cache, config, Observe(), False,
                                      observer=observer, attention=attention,
                                      accumulated=state if accumulates else None)
        if accumulates:
            state = outs["accumulated"]
        if in_loop:
            buf = push_query(buf, outs, pos)
        if forced is not None:
            logp = jax.lax.dynamic_update_slice(logp, jax.nn.log_softmax(logits[:, -1:], axis=-1), (0, step - 1, 0))
            nxt = forced[:, step - 1]
        else:
            nxt = sample(logits[:, -1], sub, sampling)
        nxt = jnp.where(done, filler, nxt)
        out = out.at[:, step].set(nxt)
        return step + 1, cache, nxt, pos + 1, out, done | jnp.isin(nxt, eos), key, state, buf, logp

    if forced is not None:
        first_token = first_token
    carry = (jnp.int32(1), cache, first_token, start_positions, out, done, key, state, buf, logp)
    step, cache, _, _, out, _, _, state, _, logp = jax.lax.while_loop(cond, body, carry)
    return out, step, cache, state, logp


def _buffer_dtype(cache):
    layer = first_policy_layer(cache) if isinstance(cache, LayerwiseCache) else cache
    return layer.keys.dtype if isinstance(layer, kvcache.KVCache) else jnp.float32


def decode_start(cache, prompt_lengths, compression: Optional[Compression]) -> jax.Array:
    """[batch] position of the first decoded token.

    Original-position regimes: the prompt length (the last prompt token may have been evicted
    from every head, so the cache's highest position can be lower). Re-rotating policies: one
    past the highest in-cache position (their kept keys sit at contiguous positions 0..kept-1)."""
    if compression is not None and compression.policy.rerotate:
        return (jnp.max(policy_positions(cache), axis=(0, 2, 3)) + 1).astype(jnp.int32)
    return jnp.asarray(prompt_lengths, jnp.int32)


def attention_name(cache, compression=None, attention: str = "auto") -> str:
    """What generate's decode steps run, for its stats: "pallas-gpu:dense_decode ..." or
    "xla-reference". Mirrors the trace-time dispatch of the caches' `attend`."""
    from kvjax.quant.kivi import KIVICache
    from kvjax.quant.qjl import QJLCache
    if hasattr(cache, "attention_name"):        # a cache that routes its own attention (kvjax.nsa_cache)
        return cache.attention_name(attention)
    layer = first_policy_layer(cache) if isinstance(cache, LayerwiseCache) and cache.layers else cache
    layer = getattr(layer, "kivi", layer)      # kvjax.quant.evicted: the KIVI storage of an evicted set
    if compression is not None and getattr(compression, "when", None) == "decode":
        obs = compression.decode_observer()
        if obs is not None and obs.observe.wants_attention:
            return "xla-reference (decode observes attention)"
    prefill = "xla prefill"
    if isinstance(layer, kvcache.KVCache):
        sel = decode_impl("dense_decode", attention)
        if sel is None or not dense_kernel_ok(layer.keys.shape[-1], layer.keys.dtype, sel[0]):
            return "xla-reference"
        name, fallback = "dense_decode", " (XLA if a head's live slots are not contiguous)"
        if decode_impl("flash_prefill", attention) is not None:
            prefill = "flash prefill"
    elif isinstance(layer, KIVICache):
        sel = decode_impl("kivi_decode", attention)
        if sel is None or not kivi_kernel_ok(layer.k_bits, layer.v_bits, layer.group, layer.residual,
                                             layer.head_dim, sel[0]):
            return "xla-reference"
        name, fallback = "kivi_decode", ""
        if decode_impl("flash_prefill", attention) is not None:
            prefill = "flash prefill over dequantized K/V"
    elif isinstance(layer, QJLCache):
        sel = decode_impl("qjl_scores", attention)
        if sel is None or not qjl_kernel_ok(layer.cfg, sel[0]):
            return "xla-reference"
        name, fallback = "qjl_scores", " (scores of sketched keys; fp buffer, softmax, values in XLA)"
    else:
        return "xla-reference"
    impl, interpret = sel
    return f"pallas-{impl}{'-interpret' if interpret else ''}:{name} decode{fallback}, {prefill}"


def _trim(row: np.ndarray, n: int, eos_ids: tuple[int, ...]) -> list[int]:
    row = row[:n].tolist()
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row


def default_dtype():
    """The compute/cache dtype on this backend: bfloat16 on gpu/tpu, float32 on cpu."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def default_chunk_size() -> Optional[int]:
    """Prefill chunk by backend: 4096 tokens on gpu/tpu (flash attention, matmuls at full rate),
    512 on cpu (the XLA attention materialises chunk x context scores: bounded memory)."""
    return 512 if jax.default_backend() == "cpu" else 4096


def prefill_chunk(padded_len: int, chunk_size: Optional[int],
                  compression: Optional[Compression]) -> tuple[Optional[int], tuple[str, ...]]:
    """generate's prefill chunk when none is given: prompts longer than `default_chunk_size()` are
    prefilled in ~equal chunks (multiples of 64) of at most that size: peak attention memory bounded
    by the chunk, one or two compiled shapes, and a window scorer still sees its whole window in the
    last chunk (else one forward), except for scorers fitting statistics to all prompt queries (ExpectedAttention,
    Keyformer: `observe.qkv`). `when="chunk"` without a chunk size uses the default with a note.
    returns (chunk_size or None for one forward, notes)."""
    if chunk_size is not None:
        return chunk_size, ()
    default = default_chunk_size()
    if compression is not None and compression.when == "chunk":
        return default, (f"when='chunk' without a chunk size: chunks of {default} tokens "
                         f"(kvjax.generate.default_chunk_size; give chunk_size / --chunk-size to choose)",)
    if padded_len <= default or (compression is not None and (compression.policy.observe.qkv
                                                              or compression.policy.observe.hidden)):
        return None, ()
    n = -(-padded_len // default)
    chunk = -(-padded_len // (64 * n)) * 64               # ~equal chunks, multiples of 64 (kernel tiles)
    last = padded_len - (padded_len - 1) // chunk * chunk
    if compression is not None and last < compression.policy.observe.window:
        return None, ()
    return chunk, ()


def init_engine_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32,
                      cache_init: Optional[Callable] = None, context: Optional[int] = None) -> LayerwiseCache:
    """An empty per-layer cache (the engine's layout): dense KVCache layers of `capacity` slots, or
    `cache_init(config, batch, capacity)`'s cache type split per layer (given `dtype=` too when it
    says `takes_engine_dtype`, as `kvjax.quant.make_cache_init`'s do: the dtype of its fp parts).
    A model's sliding-window layers get a `kvjax.ring.RingCache` of min(window, context) slots
    (context: the most positions the cache will see; default `capacity`), in `dtype`."""
    if cache_init is None:
        layer = lambda: kvcache.init_cache(1, batch, config.n_kv_heads, capacity, config.head_dim, dtype)
        layers = tuple(jax.tree_util.tree_map(lambda x: x[0], layer()) for _ in range(config.n_layers))
        cache = LayerwiseCache(layers=layers, capacity=capacity, uniform=True)
    elif getattr(cache_init, "takes_engine_dtype", False):      # kvjax.quant.make_cache_init's
        cache = per_layer(cache_init(config, batch, capacity, dtype=dtype))
    else:
        cache = per_layer(cache_init(config, batch, capacity))
    if not config.local_layers:
        return cache
    ring = lambda: init_ring(config, batch, capacity if context is None else context, dtype)   # own buffers
    layers = tuple(ring() if i in config.local_layers else lc for i, lc in enumerate(cache.layers))
    return dataclasses.replace(cache, layers=layers)


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             sampling: Sampling = Sampling(), chunk_size: Optional[int] = None,
             capacity: Optional[int] = None, cache_dtype=None, pad_id: int = 0,
             eos_ids: Optional[tuple[int, ...]] = None, seed: int = 0, bucket: int = 64,
             compression: Optional[Compression] = None, progress: bool = False,
             tokenizer=None, cache_init: Optional[Callable] = None, attention: str = "auto",
             mesh=None, selection=None, prefill_attention=None,
             kv_quant: Optional[str] = None, quantized_prefill: bool = False) -> GenerateResult:
    """Generate up to `max_new_tokens` for each prompt (a list of token-id lists).

    tokenizer: optional (models.tokenizer); when given, `result.text` holds the decoded answers
    (special tokens skipped) and its stop ids (e.g. ChatML's <|im_end|>) end generation.
    cache_init: `(config, batch, capacity) -> cache` for another cache type with the same protocol
    (e.g. `kvjax.quant.make_cache_init("kivi2")`); default: a dense KVCache per layer.
    cache_dtype: of the dense cache (default: the parameters' dtype).
    attention: "auto" | "xla" | "pallas" | "interpret" (kvjax.attention).
    chunk_size: prefill chunk (None: `prefill_chunk` decides: one forward up to `default_chunk_size()`
    tokens, equal chunks of at most that size above).
    mesh: a `jax.sharding.Mesh` with axes ("data", "model") (`kvjax.sharding.make_mesh("data=2,model=4")`):
    parameters tensor-parallel over `model`, the batch and cache over `data` x kv heads (see
    kvjax.sharding); None runs on one device.
    selection: optional query-aware sparse decode (`kvjax.selection.make_selection("quest", budget=...)`):
    the full cache is kept and every decode step attends to the selected tokens / pages only; the
    decode capacity is rounded up to a multiple of its page size; stats gain "selection" and
    "read_bytes_per_step" (K/V + metadata a step reads, vs the dense read).
    kv_quant: a quantized cache by registry name ("kivi4"; same as cache_init=make_cache_init(name)).
    With a compression too, the policy evicts and KIVI stores the kept tokens (kvjax.quant.evicted:
    full-precision prefill and scores, kept tokens quantized after prefill, decode-time compression
    requantizes); other quantized caches raise ValueError.
    quantized_prefill: for a cache that quantizes after prefill (KIVI), append every prefill chunk
    to the quantized cache at once (later chunks attend to earlier ones dequantized) instead of
    prefilling through a full-precision cache beside it: the peak is the quantized cache alone
    (at 8x32K Llama-3-8B KIVI-4: 10.9 GB instead of 45.6 GB), at some fidelity cost.

    prefill_attention: block-sparse prefill (`kvjax.sparse_prefill`): a method object or a string
    'block_sparse:<method>[:k=v,...]' (flexprefill, minference, a_shape, streaming); prefill chunks
    attend through `pallas_kernels.block_sparse_prefill` over the blocks the method selects from the
    chunk's queries and the cache's keys (dense KVCache only); decode is unchanged; stats gain
    "prefill_attention".

    capacity: cache slots per head; defaults to the padded prompt length + max_new_tokens (or,
    with compression, to what the budget needs). Raises ValueError for empty prompts, prompts that
    do not fit the capacity or the model's context, and non-positive max_new_tokens."""
    check_backend(attention)
    if hasattr(cache_init, "check_engine"):   # a cache with its own attention (kvjax.nsa_cache): what it refuses
        cache_init.check_engine(compression=compression, selection=selection, prefill_attention=prefill_attention,
                                mesh=mesh, kv_quant=kv_quant)
    compression, cache_init, evict_quant = _evict_quant(compression, cache_init, kv_quant)
    if prefill_attention is not None:
        from kvjax.sparse_prefill import check_sparse_prefill, make_sparse_prefill
        prefill_attention = make_sparse_prefill(prefill_attention)
        check_sparse_prefill(prefill_attention, config)
        if cache_init is not None:
            raise ValueError("prefill_attention (block-sparse prefill) needs the dense cache: drop cache_init")
        if mesh is not None:
            raise ValueError("prefill_attention (block-sparse prefill) does not run under a mesh yet")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if eos_ids is None:
        eos_ids = tuple(tokenizer.stop_ids) if tokenizer is not None else tuple(config.eos_token_ids)
    eos_ids = tuple(int(i) for i in eos_ids)
    if not isinstance(params["layers"], (tuple, list)):
        params = unstack_params(params)       # per-layer weights: no slicing copies in the loop
    if cache_dtype is None:
        cache_dtype = params["embed"].dtype
    if mesh is not None:
        from kvjax import sharding
        sharding.plan(config, mesh, batch=len(prompts))          # clear errors for axes that do not divide
        params = sharding.shard_params(params, config, mesh)
    tokens, positions = left_pad(prompts, pad_id, bucket)
    lengths = [len(p) for p in prompts]
    if max(lengths) + max_new_tokens > config.max_position:
        raise ValueError(f"prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {config.max_position} positions")
    chunk_size, chunk_notes = prefill_chunk(tokens.shape[1], chunk_size, compression)
    plan = plan_cache(tokens.shape[1], lengths, max_new_tokens, chunk_size, compression)
    plan = dataclasses.replace(plan, notes=chunk_notes + plan.notes)
    if capacity is not None:
        if plan.prefill_capacity > capacity:
            raise ValueError(f"prompt of {tokens.shape[1]} padded tokens + {max_new_tokens} new tokens needs "
                             f"{plan.prefill_capacity} cache slots, but capacity is {capacity}")
        plan = dataclasses.replace(plan, prefill_capacity=capacity)
    if selection is not None:
        from kvjax.selection.base import check_selection
        check_selection(selection, config)
        if config.local_layers:
            raise ValueError(f"query-aware selection is not supported on {config.name}'s sliding-window layers "
                             f"(their ring caches are already bounded by the window); run it without selection")
    if selection is not None and selection.page_size > 1:
        plan = dataclasses.replace(plan, decode_capacity=-(-plan.decode_capacity // selection.page_size)
                                   * selection.page_size)
    if selection is not None and plan.compression is not None and plan.compression.when == "decode":
        raise ValueError("selection with decode-time compression is not supported (the selector's metadata "
                         "is built once after prefill)")
    if jax.default_backend() != "cpu":
        # decode kernels tile the slots in blocks of 64: a capacity they divide is never padded (copied)
        plan = dataclasses.replace(plan, decode_capacity=-(-plan.decode_capacity // 64) * 64)
    context = tokens.shape[1] + max_new_tokens
    if evict_quant is None:
        cache_init, note = no_larger_than_dense(cache_init, config, len(prompts),
                                                max(plan.prefill_capacity, plan.decode_capacity), cache_dtype, context)
        plan = dataclasses.replace(plan, notes=plan.notes + note)
        quantized_prefill = quantized_prefill and not note
    cache = init_engine_cache(config, len(prompts), plan.prefill_capacity, cache_dtype, cache_init, context)
    peak_bytes = cache.memory_bytes()  # prefill capacity is the largest the cache gets
    if quantized_prefill and (plan.compression is not None or not quantizes_after_prefill(cache)):
        raise ValueError("quantized_prefill applies to a quantized cache that quantizes after prefill "
                         "(e.g. kv_quant='kivi4') without a compression policy")
    dense_first = None if not quantized_prefill else False
    if plan.compression is None and quantizes_after_prefill(cache) and not quantized_prefill:
        peak_bytes += kvcache.tree_bytes(jax.eval_shape(
            lambda: init_engine_cache(config, len(prompts), plan.prefill_capacity, params["embed"].dtype,
                                      context=context)))
        plan = dataclasses.replace(plan, notes=plan.notes + (
            "the prompt is prefilled in full precision through a dense cache, then quantized (KIVI's prefill "
            "rule; peak_cache_bytes counts both)",))
    state = (jnp.zeros((policy_config(config).n_layers, len(prompts), config.n_kv_heads, plan.prefill_capacity),
                       jnp.float32) if plan.compression is not None and plan.compression.policy.accumulates else None)
    n_keep = jnp.asarray(plan.n_keep, jnp.int32) if plan.compression is not None else None
    if mesh is not None:
        cache, state = _on_mesh(cache, config, mesh), _on_mesh(state, config, mesh)
        tokens, positions = sharding.shard_batch((tokens, positions), mesh)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)

    t0 = time.perf_counter()
    with _mesh_context(mesh):
        last_logits, cache, state = prefill(params, config, jnp.asarray(tokens), jnp.asarray(positions), cache,
                                            chunk_size, progress, plan.compression, n_keep, plan.max_keep, state,
                                            attention, prefill_attention=prefill_attention,
                                            dense_first=dense_first)
    cache = cache.resize(plan.decode_capacity) if isinstance(cache, LayerwiseCache) else kvcache.resize(
        cache, plan.decode_capacity)
    if state is not None:
        extra = max(plan.decode_capacity - state.shape[-1], 0)
        state = jnp.pad(state, [(0, 0)] * 3 + [(0, extra)])[..., :plan.decode_capacity]
    if evict_quant is not None:   # the kept tokens of every head stored in KIVI form (global layers)
        cache = with_policy_part(cache, evict_quant.quantize(policy_part(cache, config)), config)
        if state is not None:
            state = jnp.pad(state, [(0, 0)] * 3 + [(0, first_policy_layer(cache).capacity - state.shape[-1])])
    if mesh is not None:  # compression may have built another layout: place it again
        cache, state = _on_mesh(cache, config, mesh), _on_mesh(state, config, mesh)
    first = sample(last_logits, sub, sampling)
    first.block_until_ready()
    t1 = time.perf_counter()
    start = decode_start(cache, lengths, plan.compression)
    name = attention_name(cache, plan.compression, attention)
    if selection is not None and getattr(selection, "offloaded", False):
        from kvjax.selection import wrap       # host-memory metadata must exist before the decode jit
        cache = jax.jit(wrap, static_argnums=(0, 2))(selection, cache, config)
    # the loop's static compression only when it acts in the loop: a policy that compressed the
    # prefill leaves the same decode loop as the full cache of its shape (one compilation, not one per policy)
    in_loop = plan.compression if plan.compression is not None and plan.compression.when == "decode" else None
    if in_loop is None:
        state = n_keep = None
    with _mesh_context(mesh):
        out, steps, cache, _, _ = decode_loop(params, cache, first, start, key, state, n_keep, config=config,
                                              sampling=sampling, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                              compression=in_loop, attention=attention,
                                              **({"selection": selection} if selection is not None else {}))
    out = np.asarray(out)
    steps = int(steps)
    t2 = time.perf_counter()
    rows = [_trim(r, steps, eos_ids) for r in out]
    empty = [i for i, r in enumerate(rows) if not [t for t in r if t not in eos_ids]]
    if empty:
        plan = dataclasses.replace(plan, notes=plan.notes + (
            f"the model ended at once (end-of-sequence first) for prompt(s) {empty}: empty answer; an instruct "
            f"model may need its chat template (CLI: --chat)",))
    n_prompt = sum(lengths)
    stats = {
        "prompt_tokens": n_prompt,
        "generated_tokens": sum(len(r) for r in rows),
        "decode_steps": max(steps - 1, 0),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tok_per_s": n_prompt / (t1 - t0),
        "decode_tok_per_s": len(prompts) * max(steps - 1, 1) / (t2 - t1),
        "cache_bytes": cache.memory_bytes(),
        "peak_cache_bytes": max(peak_bytes, cache.memory_bytes()),  # allocated, not live
        "query_buffer_bytes": _query_buffer_bytes(plan.compression, policy_config(config), len(prompts), cache),
        "cache_capacity": cache.capacity,
        "prefill_chunk": chunk_size or tokens.shape[1],
        "compression": str(plan.compression) if plan.compression else "none",
        "notes": plan.notes,
        "backend": jax.default_backend(),
        "attention": name,
        "dtype": str(jnp.dtype(params["embed"].dtype)),
    }
    if prefill_attention is not None:
        stats["prefill_attention"] = str(prefill_attention)
    if mesh is not None:
        per_device = sharding.device_bytes(cache)
        stats.update(mesh=dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))),
                     cache_bytes_per_device=max(per_device.values()) if per_device else 0,
                     sharding_notes=sharding.plan(config, mesh).notes)
    if selection is not None:
        from kvjax.selection import read_bytes_per_step
        stats["selection"] = str(selection)
        stats["read_bytes_per_step"] = read_bytes_per_step(cache)
        if selection.covers(cache.capacity):
            stats["notes"] = tuple(stats["notes"]) + (
                f"selection budget {selection.budget} >= cache capacity {cache.capacity}: dense decode",)
    text = [tokenizer.decode(r, skip_special_tokens=True) for r in rows] if tokenizer is not None else None
    return GenerateResult(tokens=rows, stats=stats, text=text, cache=cache)


def no_larger_than_dense(cache_init, config: ModelConfig, batch: int, capacity: int, dtype,
                         context: Optional[int] = None) -> tuple[Optional[Callable], tuple[str, ...]]:
    """(cache_init, notes): a registered KIVI cache (`kvjax.quant.make_cache_init`) that would
    allocate at least as many bytes as the dense cache for this context -- its full-precision
    residual windows (KIVI: R = 128 tokens for keys and for values) outgrow a short prompt -- is
    replaced by the dense cache (None), with a note. A context within KIVI's residual window would
    never be quantized anyway, so the dense cache computes the same attention. Shapes only
    (`jax.eval_shape`): nothing is allocated here."""
    name = getattr(cache_init, "quant_name", None)
    from kvjax.quant import QUANT_CACHES
    if name is None or QUANT_CACHES[name].method != "kivi":   # others size their fp parts per phase (ZipCache)
        return cache_init, ()
    size = lambda init: kvcache.tree_bytes(jax.eval_shape(
        lambda: init_engine_cache(config, batch, capacity, dtype, init, context)))
    quant, dense = size(cache_init), size(None)
    if quant < dense:
        return cache_init, ()
    return None, (f"the {name} cache for {capacity} slots per head would take {quant:,} bytes, not less than the "
                  f"full cache's {dense:,} (its full-precision windows outgrow this short context): the full cache "
                  f"is used",)


def _evict_quant(compression, cache_init, kv_quant: Optional[str]):
    """(compression, cache_init for the prefill cache, kvjax.quant.evicted.EvictQuant or None):
    `kv_quant` names a registered quantized cache; with a compression, prefill runs dense and the
    kept tokens are quantized after it (ValueError for combinations that cannot work)."""
    if kv_quant is not None:
        if cache_init is not None:
            raise ValueError("give kv_quant or cache_init, not both")
        from kvjax.quant import make_cache_init
        cache_init = make_cache_init(kv_quant)
    if compression is None or cache_init is None:
        return compression, cache_init, None
    from kvjax.quant.evicted import check_combination
    plan = check_combination(compression, cache_init)
    return plan.compression, None, plan


def _on_mesh(tree, config: ModelConfig, mesh):
    """A cache or policy state placed on `mesh` (kvjax.sharding.cache_specs); None stays None."""
    from kvjax import sharding
    return None if tree is None else sharding.shard_cache(tree, config, mesh)


def _mesh_context(mesh):
    """The mesh as JAX's context (`jax.set_mesh`) while tracing, for the kernels' shard_map."""
    from kvjax import sharding
    return sharding.use(mesh)


def _query_buffer_bytes(compression, config, batch: int, cache) -> int:
    """Bytes of decode_loop's query buffer (decode-time compression of window/qkv scorers)."""
    buf = init_query_buffer(compression, config, batch, _buffer_dtype(cache)) if compression is not None else None
    return buf.memory_bytes() if buf is not None else 0


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static cache sizes for one generate call.

    prefill_capacity: slots during prefill; max_keep / n_keep: kept tokens per head after
    compression (max over rows / per row); decode_capacity: slots during decode."""

    prefill_capacity: int
    decode_capacity: int
    max_keep: int = 0
    n_keep: tuple[int, ...] = ()
    compression: Optional[Compression] = None
    notes: tuple[str, ...] = ()


def plan_cache(padded_len: int, lengths: Sequence[int], max_new_tokens: int, chunk_size: Optional[int],
               compression: Optional[Compression]) -> CachePlan:
    """Decide cache capacities (all static) from prompt lengths, budget and schedule."""
    full = CachePlan(padded_len + max_new_tokens, padded_len + max_new_tokens)
    if compression is None:
        return full
    decode_tokens = compression.when == "decode" and compression.budget.tokens is not None
    if decode_tokens:
        # a token budget during decode bounds the live cache (prompt + generated tokens), even when
        # the prompt alone fits in it
        n_keep = tuple(compression.budget.kept(n + max_new_tokens) for n in lengths)
        covered = all(k >= n + max_new_tokens for k, n in zip(n_keep, lengths))
    else:
        n_keep = tuple(compression.budget.kept(n) for n in lengths)
        covered = all(k >= n for k, n in zip(n_keep, lengths))
    # a cache transform (MiniCache's cross-layer merge) runs even when the budget keeps every token
    if covered and not getattr(compression.policy, "transforms_cache", False):
        total = "prompt + new tokens" if decode_tokens else "context"
        longest = max(lengths) + (max_new_tokens if decode_tokens else 0)
        return dataclasses.replace(full, notes=(
            f"budget {compression.budget} keeps the whole {total} ({longest} tokens): no compression",))
    notes = []
    compression, note = fit_window(compression, min(n_keep))
    if note:
        notes.append(note)
    window = compression.observe.window
    if window and compression.when == "chunk" and chunk_size is not None and chunk_size < window:
        raise ValueError(f"chunk size {chunk_size} is smaller than {type(compression.policy).__name__}'s "
                         f"observation window ({window} queries)")
    # per-layer/per-head budgets (PyramidKV, AdaKV, head-type methods) may need more slots than n_keep
    max_keep = max(compression.policy.max_keep(k, max(k, n)) for k, n in zip(n_keep, lengths))
    if compression.when == "chunk":
        chunk = chunk_size or padded_len
        prefill_cap = min(padded_len, max_keep + chunk)
        decode_cap = max_keep + max_new_tokens
    elif compression.when == "decode":
        prefill_cap = padded_len
        decode_cap = max_keep + compression.interval
        if max_keep >= max(lengths):
            notes.append(f"the prompt ({max(lengths)} tokens) fits the budget of {max_keep} tokens: the cache is "
                         f"compressed during decode, once it holds more")
    else:
        prefill_cap = padded_len
        decode_cap = max_keep + max_new_tokens
    return CachePlan(prefill_cap, decode_cap, max_keep, n_keep, compression, tuple(notes))


class _CallableModule(types.ModuleType):
    """`kvjax.generate` names both this module and its `generate` function; once the module is
    imported, the package attribute is the module (Python's import system sets it), so calling the
    module calls the function: `kvjax.generate(params, ...)` works however often and in whichever
    order it is reached, and `kvjax.generate.plan_cache` still reads the module."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
