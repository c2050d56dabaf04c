"""Functional Llama-family decoder: `forward(params, tokens, positions, cache, config)`.

One pure function serves prefill, chunked prefill and decode: the new tokens' keys/values are
appended to the explicit `KVCache` pytree, then the new queries attend over everything the
cache holds. Layers are scanned over stacked parameters, so compile time is flat in depth
(except for a `LayerwiseCache` of per-layer sizes, which is looped over: compile time ~ depth).
Parameters follow the layout documented in `models.config.ModelConfig`.

Observation hooks for compression policies are requested with a static `Observe` spec and come
back stacked over layers; the model code does not change when a policy needs them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.attention import AttentionStats
from kvjax.layerwise import LayerwiseCache
from models.config import ModelConfig
from models.rope import apply_rope

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Observe:
    """What `forward` should return for policies (static; all stacked over layers).

    window: attention probabilities of the last `window` new queries over the cache slots
            -> "window_probs" [layers, batch, q_heads, window, slots], plus their post-RoPE
            queries -> "window_queries" [layers, batch, q_heads, window, head_dim].
    column_sums: attention mass each slot received from all new queries
            -> "column_sums" [layers, batch, q_heads, slots].
    qkv: pre-RoPE projections of the new tokens -> "q_pre" [layers, batch, q_heads, new, head_dim],
            "k_pre", "v" [layers, batch, kv_heads, new, head_dim].
    hidden: the input of every layer -> "hidden" [layers, batch, new, d_model].
    """

    window: int = 0
    column_sums: bool = False
    qkv: bool = False
    hidden: bool = False


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def _heads(x: jax.Array, n: int) -> jax.Array:
    """[batch, seq, n*head_dim] -> [batch, n, seq, head_dim]"""
    b, t, f = x.shape
    return x.reshape(b, t, n, f // n).transpose(0, 2, 1, 3)


def project_qkv(lp: Params, h: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-RoPE q [batch, q_heads, seq, hd], k, v [batch, kv_heads, seq, hd] from normed input."""
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if config.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k, v = _heads(q, config.n_heads), _heads(k, config.n_kv_heads), _heads(v, config.n_kv_heads)
    if config.qk_norm:
        q = rms_norm(q, lp["q_norm"], config.norm_eps)
        k = rms_norm(k, lp["k_norm"], config.norm_eps)
    return q, k, v


def decoder_layer(lp: Params, x: jax.Array, positions: jax.Array, layer_cache: kvcache.KVCache,
                  config: ModelConfig, observe: Observe):
    """One pre-norm block. x [batch, seq, d_model] -> (x, layer_cache, observations)."""
    obs = {}
    if observe.hidden:
        obs["hidden"] = x
    h = rms_norm(x, lp["attn_norm"], config.norm_eps)
    q, k, v = project_qkv(lp, h, config)
    if observe.qkv:
        obs.update(q_pre=q, k_pre=k, v=v)
    q_rot, k_rot = apply_rope(q, positions, config), apply_rope(k, positions, config)
    layer_cache = layer_cache.append(k_rot, v, positions, keys_pre_rope=k)
    stats = AttentionStats(window=observe.window, column_sums=observe.column_sums)
    out, attn_obs = layer_cache.attend(q_rot, positions, stats=stats,
                                       rope=lambda x, pos: apply_rope(x, pos, config))
    obs.update(attn_obs)
    if observe.window:
        obs["window_queries"] = q_rot[:, :, -min(observe.window, q.shape[2]):]
    b, _, t, _ = out.shape
    x = x + out.transpose(0, 2, 1, 3).reshape(b, t, -1) @ lp["wo"]
    h = rms_norm(x, lp["mlp_norm"], config.norm_eps)
    x = x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]
    return x, layer_cache, obs


def check_inputs(params: Params, tokens: jax.Array, positions: jax.Array, cache, config: ModelConfig) -> None:
    """Trace-time validation (shapes and dtypes are static): clear errors instead of wrong results."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got {tokens.dtype}")
    if positions.shape != tokens.shape:
        raise ValueError(f"positions {positions.shape} must match tokens {tokens.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got {positions.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError("empty input: tokens has 0 positions")
    want = (config.n_layers, tokens.shape[0], config.n_kv_heads)
    if cache.lengths.shape != want:
        raise ValueError(f"cache is [layers, batch, kv_heads] = {cache.lengths.shape}, model/input needs {want}")
    if params["embed"].shape != (config.vocab_size, config.d_model):
        raise ValueError(f"params do not match config {config.name}: embed is {params['embed'].shape}")
    if not jnp.issubdtype(params["embed"].dtype, jnp.floating):
        raise TypeError(f"params must be floating point, got {params['embed'].dtype}")
    if isinstance(cache, kvcache.KVCache):
        if cache.keys.shape[-1] != config.head_dim:
            raise ValueError(f"cache head_dim {cache.keys.shape[-1]} != model head_dim {config.head_dim}")
        if not jnp.issubdtype(cache.keys.dtype, jnp.floating):
            raise TypeError(f"cache keys must be floating point, got {cache.keys.dtype}")


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: kvcache.KVCache,
            config: ModelConfig, observe: Observe = Observe(), all_logits: bool = True):
    """Run new tokens through the model, appending their K/V to the cache.

    tokens:    [batch, new] int; positions: [batch, new] int (-1 marks left padding).
    cache:     KVCache stacked over layers, `[layers, batch, kv_heads, capacity, head_dim]`, or any
               cache pytree with the same protocol (`append`, `attend`, `lengths`; e.g. kvjax.quant).
               A `kvjax.layerwise.LayerwiseCache` (layers of different sizes, e.g. PyramidKV) is run
               with an unrolled Python loop over layers instead of `lax.scan`.
    returns (logits [batch, new or 1, vocab] float32, cache, observations dict stacked over layers).
    `all_logits=False` returns only the last position's logits (prefill of long prompts).
    """
    check_inputs(params, tokens, positions, cache, config)
    x = params["embed"][tokens]

    def body(x, layer):
        lp, lc = layer
        x, lc, obs = decoder_layer(lp, x, positions, lc, config, observe)
        return x, (lc, obs)

    if isinstance(cache, LayerwiseCache):
        # layers of different sizes cannot be scanned: unrolled loop (compile time grows with depth)
        outs = []
        for i, lc in enumerate(cache.layers):
            x, out = body(x, (jax.tree_util.tree_map(lambda a: a[i], params["layers"]), lc))
            outs.append(out)
        layers, obs = zip(*outs)
        cache = dataclasses.replace(cache, layers=tuple(layers))
        if any(len({x.shape for x in xs}) > 1 for xs in zip(*(jax.tree_util.tree_leaves(o) for o in obs))):
            raise ValueError("a LayerwiseCache with layers of different sizes cannot return per-slot "
                             "observations (it is a final layout: compress before converting to it)")
        obs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *obs)
    else:
        x, (cache, obs) = jax.lax.scan(body, x, (params["layers"], cache))
    if not all_logits:
        x = x[:, -1:]
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = (x @ head).astype(jnp.float32)
    return logits, cache, obs


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters in the documented layout (for shape tests and benchmarks)."""
    L, d, f = config.n_layers, config.d_model, config.ffn_dim
    qd, kd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"wq": (L, d, qd), "wk": (L, d, kd), "wv": (L, d, kd), "wo": (L, qd, d),
              "w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d)}
    if config.qkv_bias:
        shapes.update(bq=(L, qd), bk=(L, kd), bv=(L, kd))
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {n: (scale * jax.random.normal(k, s)).astype(dtype) for (n, s), k in zip(shapes.items(), keys)}
    layers["attn_norm"] = jnp.ones((L, d), dtype)
    layers["mlp_norm"] = jnp.ones((L, d), dtype)
    if config.qk_norm:
        layers["q_norm"] = jnp.ones((L, config.head_dim), dtype)
        layers["k_norm"] = jnp.ones((L, config.head_dim), dtype)
    params = {"embed": (scale * jax.random.normal(keys[-2], (config.vocab_size, d))).astype(dtype),
              "final_norm": jnp.ones((d,), dtype), "layers": layers}
    if not config.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(keys[-1], (d, config.vocab_size))).astype(dtype)
    return params
