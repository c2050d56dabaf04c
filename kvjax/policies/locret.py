"""Locret: trained retaining heads + chunked prefill with eviction.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining
Heads" (arXiv 2410.01805; github huangyuxiang03/Locret). Spec: shared/methods/eviction_merging_learned.md §2.

Retaining head (one per layer): `s_t = W2 · silu(W1 · concat(q_t, k_t, v_t))`, with q/k/v the
PRE-RoPE projections of the new token t (all query heads, then the kv heads of k, then of v),
one unbounded output per kv head (the predicted causal importance score, CIS).

Inference (`locret_prefill`): the prompt except its last `n_local` tokens is prefilled in chunks of
`chunk` tokens; after each chunk the heads score the chunk's new tokens (scores of retained
tokens are never recomputed and travel with their KV), the `n_stabilizers` most recent cache
entries are protected on every chunk except the last one, and each (layer, kv-head) keeps its
top-`budget` entries in chronological order. Keys are re-rotated to contiguous in-cache positions
0..kept-1 after every eviction (the official code caches pre-RoPE keys and rotates them with
`arange(cache_len)`; rotating post-RoPE keys by (new - old) is the same, see
`policies.base.rerotate_keys`). The local tail is then prefilled with no eviction, and decode is
plain (no eviction, the cache grows by one per token).

Heads are a pytree `{"w1": [L, in, hidden], "w2": [L, hidden, kv_heads]}` saved with
`save_heads(dir, heads, spec)` (meta.json + heads.npz) and loaded with `load_heads(dir, config)`,
which raises a clear error for a missing directory or heads that belong to another model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.policies.base import rerotate_keys, select
from kvjax.observation import Observe
from models.config import ModelConfig
from models.llama import forward

HEADS_FORMAT = "kvjax-locret-heads"
HEADS_VERSION = 1
META_FILE = "meta.json"
WEIGHTS_FILE = "heads.npz"


# ----------------------------------------------------------------------------------------------
# Retaining heads.

@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Shapes of the retaining heads of one model.

    hidden: width of the MLP. The paper uses 1024 for 4096-wide models (Llama-3.1-8B); the
    default `hidden_for(config)` scales that ratio to the model (d_model // 4, rounded up to 16).
    """

    model: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int

    @property
    def in_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @staticmethod
    def for_model(config: ModelConfig, hidden: Optional[int] = None) -> "HeadSpec":
        """The heads' shapes for `config`; ValueError for a model with sliding-window layers."""
        check_all_global(config)
        return HeadSpec(model=config.name, n_layers=config.n_layers, n_heads=config.n_heads,
                        n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                        hidden=hidden_for(config) if hidden is None else int(hidden))


def check_all_global(config: ModelConfig) -> None:
    """Locret's prefill keeps one dense cache of every layer, evicts in each and re-rotates the kept
    keys with the global RoPE base: a model with sliding-window layers (Gemma 3) is not supported."""
    if config.local_layers:
        raise ValueError(
            f"Locret needs a model whose layers are all global (full attention): {config.name} has "
            f"{len(config.local_layers)} sliding-window layers of {config.n_layers}. Use a scoring policy "
            f"(snapkv, h2o, ...), which acts on the global layers only")


def hidden_for(config: ModelConfig) -> int:
    """The paper's 1024/4096 hidden-to-model width ratio applied to `config` (multiple of 16)."""
    return max(16, -(-(config.d_model // 4) // 16) * 16)


def init_heads(spec: HeadSpec, key: jax.Array, std: float = 0.02, dtype=jnp.float32) -> dict:
    """Normal(0, std) weights (HF `initializer_range` = 0.02), no biases, as in the official code."""
    k1, k2 = jax.random.split(key)
    return {"w1": (std * jax.random.normal(k1, (spec.n_layers, spec.in_dim, spec.hidden))).astype(dtype),
            "w2": (std * jax.random.normal(k2, (spec.n_layers, spec.hidden, spec.n_kv_heads))).astype(dtype)}


def head_inputs(q_pre: jax.Array, k_pre: jax.Array, v: jax.Array) -> jax.Array:
    """Concatenate pre-RoPE q/k/v per token.

    q_pre [L, B, Hq, T, d], k_pre / v [L, B, Hkv, T, d] -> [L, B, T, (Hq + 2 Hkv) d]
    (head-major inside each of q, k, v: the order of the q_proj/k_proj/v_proj output features)."""
    def flat(x):
        L, B, H, T, d = x.shape
        return x.transpose(0, 1, 3, 2, 4).reshape(L, B, T, H * d)
    return jnp.concatenate([flat(q_pre), flat(k_pre), flat(v)], axis=-1)


def head_scores(heads: dict, q_pre: jax.Array, k_pre: jax.Array, v: jax.Array,
                dtype=jnp.float32) -> jax.Array:
    """Retaining-head outputs `[L, B, Hkv, T]` (float32) for the tokens whose q/k/v are given."""
    x = head_inputs(q_pre, k_pre, v).astype(dtype)
    h = jax.nn.silu(jnp.einsum("lbti,lih->lbth", x, heads["w1"].astype(dtype)))
    s = jnp.einsum("lbth,lhk->lbkt", h, heads["w2"].astype(dtype))
    return s.astype(jnp.float32)


def check_heads(heads: dict, spec: HeadSpec) -> None:
    want = {"w1": (spec.n_layers, spec.in_dim, spec.hidden), "w2": (spec.n_layers, spec.hidden, spec.n_kv_heads)}
    if not isinstance(heads, dict) or set(heads) != set(want):
        raise ValueError(f"retaining heads must be a dict with keys {sorted(want)}, got "
                         f"{sorted(heads) if isinstance(heads, dict) else type(heads).__name__}")
    for name, shape in want.items():
        if tuple(heads[name].shape) != shape:
            raise ValueError(f"retaining head {name} has shape {tuple(heads[name].shape)}, expected {shape} "
                             f"for {spec.model} ({spec.n_layers} layers, {spec.n_kv_heads} kv heads)")


def save_heads(directory, heads: dict, spec: HeadSpec, extra: Optional[dict] = None,
               dtype: str = "float32") -> pathlib.Path:
    """Write `meta.json` + `heads.npz` (only the trained pieces) into `directory`.

    dtype: "float32" (exact) or "float16" (half the size, for shipping)."""
    check_heads(heads, spec)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"export dtype must be float32 or float16, got {dtype!r}")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v), np.float32).astype(dtype) for k, v in heads.items()}
    np.savez(d / WEIGHTS_FILE, **arrays)
    meta = {"format": HEADS_FORMAT, "version": HEADS_VERSION, **dataclasses.asdict(spec),
            "activation": "silu", "input": "concat(q, k, v) pre-RoPE", "dtype": dtype, **(extra or {})}
    (d / META_FILE).write_text(json.dumps(meta, indent=1))
    return d


def load_heads(path, config: ModelConfig, check_name: bool = True) -> dict:
    """Load heads saved by `save_heads` for `config`; ValueError/FileNotFoundError with the reason
    when the directory is missing, not a heads export, or made for another model."""
    d = pathlib.Path(path)
    if not d.exists():
        raise FileNotFoundError(f"Locret heads not found: {d} does not exist (train them with "
                                f"`python -m train.locret --config configs/locret_smollm2.json --out DIR`)")
    if d.is_file():
        d = d.parent
    meta_path, w_path = d / META_FILE, d / WEIGHTS_FILE
    if not meta_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{d} is not a Locret heads export: expected {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: corrupt metadata ({e})") from None
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{meta_path}: not a Locret heads export (format {meta.get('format')!r})")
    spec = HeadSpec(**{f.name: meta[f.name] for f in dataclasses.fields(HeadSpec) if f.name in meta}) \
        if all(f.name in meta for f in dataclasses.fields(HeadSpec)) else None
    if spec is None:
        raise ValueError(f"{meta_path}: metadata lacks the head shapes")
    mine = HeadSpec.for_model(config, spec.hidden)
    if check_name and spec.model != config.name:
        raise ValueError(f"Locret heads in {d} were trained for model {spec.model!r}, not {config.name!r}")
    for field in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        if getattr(spec, field) != getattr(mine, field):
            raise ValueError(f"Locret heads in {d} do not fit {config.name}: {field} is {getattr(spec, field)} "
                             f"in the heads but {getattr(mine, field)} in the model")
    try:
        with np.load(w_path) as z:
            heads = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
    except Exception as e:  # zipfile / pickle errors: say which file
        raise ValueError(f"{w_path}: cannot read the head weights ({type(e).__name__}: {e})") from None
    check_heads(heads, spec)
    return heads


# ----------------------------------------------------------------------------------------------
# The inference loop.

@dataclasses.dataclass(frozen=True)
class Locret:
    """Chunked-prefill eviction with retaining heads; defaults of the official `infer.py`.

    budget: cache entries kept per (layer, kv-head) after each chunk (B).
    chunk: prefill chunk size (C). n_stabilizers: most recent entries protected on every chunk but
    the last (n_s). n_local: prompt tail prefilled without eviction (n_loc).
    """

    budget: int = 6000
    chunk: int = 3072
    n_stabilizers: int = 2500
    n_local: int = 100

    def __post_init__(self):
        if self.budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget}")
        if self.chunk <= 0:
            raise ValueError(f"chunk must be positive, got {self.chunk}")
        if self.n_stabilizers < 0 or self.n_local < 0:
            raise ValueError(f"n_stabilizers and n_local must be >= 0, got {self.n_stabilizers}, {self.n_local}")


@dataclasses.dataclass
class LocretState:
    """cache: the compressed KV cache (in-cache contiguous positions); scores: head score of every
    slot [L, B, Hkv, capacity] (-inf when empty); origin: prompt index of the token in every slot
    (-1 when empty), for diagnostics and tests."""

    cache: kvcache.KVCache
    scores: jax.Array
    origin: jax.Array


jax.tree_util.register_dataclass(LocretState, data_fields=["cache", "scores", "origin"], meta_fields=[])


def _write_slots(buf: jax.Array, lengths: jax.Array, new: jax.Array) -> jax.Array:
    """buf [L, B, H, S], lengths [L, B, H], new [L, B, H, T] -> new written at slots lengths + t."""
    T = new.shape[-1]
    slot = lengths[..., None] + jnp.arange(T, dtype=jnp.int32)
    L, B, H, _ = buf.shape
    li = jnp.arange(L)[:, None, None, None]
    bi = jnp.arange(B)[None, :, None, None]
    hi = jnp.arange(H)[None, None, :, None]
    return buf.at[li, bi, hi, slot].set(new.astype(buf.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("config", "budget", "n_stabilizers", "evict", "protect_recent",
                                             "capacity"))
def chunk_step(params, heads, tokens, origin_idx, state: LocretState, *, config: ModelConfig, budget: int,
               n_stabilizers: int, evict: bool, protect_recent: bool, capacity: int):
    """Prefill one chunk (tokens [B, T], origin_idx [T] prompt indices) then, if `evict`, keep the
    top-`budget` entries of every (layer, kv-head) in a cache of `capacity` slots.
    returns (last logits [B, vocab], new state)."""
    cache = state.cache
    b, t = tokens.shape
    start = jnp.max(cache.positions, axis=(0, 2, 3)) + 1                 # [B] in-cache positions
    pos = (start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]).astype(jnp.int32)
    before = cache.lengths
    logits, cache, obs = forward(params, tokens, pos, cache, config, Observe(qkv=True), False)
    new_scores = head_scores(heads, obs["q_pre"], obs["k_pre"], obs["v"])           # [L, B, Hkv, T]
    scores = _write_slots(state.scores, before, new_scores)
    origin = _write_slots(state.origin, before,
                          jnp.broadcast_to(origin_idx.astype(jnp.int32), new_scores.shape))
    if evict:
        live = cache.valid
        sc = jnp.where(live, scores, -jnp.inf)
        if protect_recent and n_stabilizers > 0:
            # Stabilizers: the n_s most recent entries of (retained cache + chunk). In-cache
            # positions are contiguous, so they are the n_s highest positions.
            top = jnp.max(cache.positions, axis=-1, keepdims=True)
            sc = jnp.where(live & (cache.positions > top - n_stabilizers), jnp.inf, sc)
        counts = jnp.minimum(cache.lengths, budget)
        keep = min(budget, cache.capacity)
        idx = select(sc, live, counts, keep)                               # sorted, -1 padded
        safe = jnp.clip(idx, 0, None)
        ok = idx >= 0
        cache = rerotate_keys(kvcache.gather(cache, idx, capacity), config)
        pad = [(0, 0)] * 3 + [(0, capacity - keep)]
        scores = jnp.pad(jnp.where(ok, jnp.take_along_axis(scores, safe, -1), -jnp.inf), pad,
                         constant_values=-jnp.inf)
        origin = jnp.pad(jnp.where(ok, jnp.take_along_axis(origin, safe, -1), -1), pad, constant_values=-1)
    elif capacity != cache.capacity:
        raise ValueError("capacity can only change on an evicting step")
    return logits[:, -1], LocretState(cache, scores, origin)



def empty_state(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> LocretState:
    cache = kvcache.init_cache(config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim, dtype)
    return LocretState(cache, jnp.full(cache.positions.shape, -jnp.inf, jnp.float32),
                       jnp.full(cache.positions.shape, -1, jnp.int32))


def locret_prefill(params, config: ModelConfig, heads: dict, tokens, policy: Locret, extra_capacity: int = 0,
                   cache_dtype=jnp.float32, trace: Optional[list] = None, progress: bool = False):
    """Locret's prefill of `tokens [batch, n]` (rows of equal length, no padding).

    extra_capacity: free slots left after the local tail (room for decode / a continuation).
    trace: if a list is given, the state after every evicting chunk is appended to it.
    returns (last-position logits [batch, vocab], LocretState). The cache's positions are in-cache
    positions: the next token goes at `max(positions) + 1`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    check_heads(heads, HeadSpec.for_model(config, heads["w1"].shape[-1]))
    n = tokens.shape[1]
    B, C = policy.budget, policy.chunk
    n_loc = min(policy.n_local, n - 1)        # at least one token goes through the evicting loop
    m = n - n_loc
    final_cap = min(B, m) + n_loc + extra_capacity
    state = empty_state(config, tokens.shape[0], min(B + C, m) if m > C else m, cache_dtype)
    starts = list(range(0, m, C))
    it = starts
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        it = tqdm(starts, desc="locret prefill", unit="chunk")
    logits = None
    for s in it:
        e = min(s + C, m)
        last = e >= m
        cap = final_cap if last else min(B + C, m)
        logits, state = chunk_step(params, heads, tokens[:, s:e], jnp.arange(s, e), state, config=config,
                                   budget=B, n_stabilizers=policy.n_stabilizers, evict=True,
                                   protect_recent=not last, capacity=cap)
        if trace is not None:
            trace.append(state)
    if n_loc:
        logits, state = chunk_step(params, heads, tokens[:, m:], jnp.arange(m, n), state, config=config,
                                   budget=B, n_stabilizers=0, evict=False, protect_recent=False,
                                   capacity=state.cache.capacity)
    return logits, state


def locret_generate(params, config: ModelConfig, heads: dict, prompt: list[int], policy: Locret,
                    max_new_tokens: int = 64, seed: int = 0, sampling=None, eos_ids=None) -> list[int]:
    """Locret prefill, then plain decode (no eviction) with `kvjax.generate.decode_loop`.

    What `kvjax.generate` would need to host this natively: a Compression whose policy can score
    from `Observe(qkv=True)` with learned parameters passed at call time (not in the hashable
    policy), scores kept per slot like H2O's `state` but *written* (not accumulated) for the new
    tokens, stabilizer protection on non-final chunks only, and a local tail excluded from eviction."""
    from kvjax.generate import decode_loop
    from kvjax.layerwise import per_layer
    from kvjax.sampling import Sampling, sample
    sampling = Sampling() if sampling is None else sampling
    eos_ids = tuple(config.eos_token_ids if eos_ids is None else eos_ids)
    logits, state = locret_prefill(params, config, heads, jnp.asarray([prompt], jnp.int32), policy,
                                   extra_capacity=max_new_tokens)
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    first = sample(logits, sub, sampling)
    start = jnp.max(state.cache.positions, axis=(0, 2, 3)) + 1
    out, steps, *_ = decode_loop(params, per_layer(state.cache), first, start, key, None, None, config=config,
                                 sampling=sampling, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    row = np.asarray(out)[0, :int(steps)].tolist()
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i + 1]
    return row
