"""Functional Llama-family decoder: `forward(params, tokens, positions, cache, config)`.

Gemma 3 runs through the same function: its options of `ModelConfig` (embedding scale, post-norms,
GeGLU, query_pre_attn_scalar, soft-capping) are a few branches here, and its interleaved
sliding-window layers are `models.local_attention`'s (per-layer RoPE base and window).

One pure function serves prefill, chunked prefill and decode: each layer appends the new tokens'
keys/values to its cache, then the new queries attend over everything the cache holds (the cache
routes its own attention: dense, quantized, packed, ...). Parameters follow the layout
documented in `models.config.ModelConfig`; `params["layers"]` is either a tuple of per-layer
dicts (what `generate` uses: every layer's weights are their own buffers) or one dict of arrays
stacked on a leading layer axis (as `models.loading` reads them).

Two layer loops over the same `decoder_layer`:
- a per-layer cache (`kvjax.layerwise.LayerwiseCache`, a tuple of one cache per layer): a Python
  loop over the layers (the compiled program grows with depth). Each layer reads and writes
  its own cache buffers and weights, so a decode step under a donated `while_loop` updates the
  cache in place: only the new token is written, nothing cache-sized is copied.
- a cache stacked over layers: `lax.scan` (compile time flat in depth; each call copies the
  cache through the scan, which is fine for tests and one-off forwards, not for a decode loop).

Policies see each layer's attention through a static `kvjax.observation.Observer`: the layer
reduces its observation to the policy's scores `[batch, kv_heads, slots]` (and running state)
before the next layer runs, so no array with a layers axis and a window x slots axis is built.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.attention import check_backend
from kvjax.layerwise import LayerwiseCache
from kvjax.observation import Observe, Observer, reduce_layer
from kvjax.ring import policy_config, policy_index
from models.config import ModelConfig
from models.gated_attention import apply_gate
from models.local_attention import attend_local, layer_rope, layer_window

Params = dict[str, Any]

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
    if "wqkv" in lp:      # fused (fuse_projections): one matmul reads the three weights
        qd, kd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        qkv = h @ lp["wqkv"]
        q, k, v = qkv[..., :qd], qkv[..., qd:qd + kd], qkv[..., qd + kd:]
    else:
        q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if config.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k, v = _heads(q, config.n_heads), _heads(k, config.n_kv_heads), _heads(v, config.n_kv_heads)
    if config.qk_norm:
        q = rms_norm(q, lp["q_norm"], config.norm_eps)
        k = rms_norm(k, lp["k_norm"], config.norm_eps)
    if config.query_pre_attn_scalar is not None and config.query_pre_attn_scalar != config.head_dim:
        # attention scales by head_dim**-0.5: fold the rest of query_pre_attn_scalar**-0.5 into q
        q = (q.astype(jnp.float32) * math.sqrt(config.head_dim / config.query_pre_attn_scalar)).astype(q.dtype)
    return q, k, v


def decoder_layer(lp: Params, x: jax.Array, positions: jax.Array, layer_cache, config: ModelConfig,
                  observe: Observe, observer: Optional[Observer], backend: str, layer, accumulated,
                  attn_mod=None, prefill_attention=None, policy_layer=None):
    """One pre-norm block. x [batch, seq, d_model] -> (x, layer_cache, outputs).

    attn_mod: this layer's slice of `forward`'s `attn_mod` (or None): its `attention(h, q,
    positions, cache, out)` replaces the attention output `out` [batch, q_heads, seq, head_dim].
    prefill_attention: a `kvjax.sparse_prefill` method (static) or None: several queries (a prefill
    chunk) attend through the block-sparse kernel with its block mask; outputs gain
    "prefill_density" [batch, kv_heads, 2] (listed, live causal blocks). Decode steps are unchanged.

    policy_layer: this layer's index among the layers policies act on (`kvjax.ring.policy_index`:
    a model with sliding-window layers shows the observer its global layers only, as a model of
    those layers, `kvjax.ring.policy_config`); None: `layer` of `config`.

    outputs: the per-token observations `observe` asks for (q_pre, k_pre, v, hidden) and what
    the observer reduced this layer's observation to (scores, accumulated, queries, queries_pre)."""
    out_obs = {}
    if observe.hidden:
        out_obs["hidden"] = x
    hidden = x
    h = rms_norm(x, lp["attn_norm"], config.norm_eps)
    q, k, v = project_qkv(lp, h, config)
    if observe.qkv:
        out_obs.update(q_pre=q, k_pre=k, v=v)
    ring = getattr(layer_cache, "append_attend", None)      # a local layer's ring buffer (kvjax.ring)
    if ring is not None:
        positions = layer_cache.true_positions(positions)
    rope = layer_rope(config, layer)
    q_rot, k_rot = rope(q, positions), rope(k, positions)
    if ring is None:
        layer_cache = layer_cache.append(k_rot, v, positions, keys_pre_rope=k)
    wants = observer.observe.attention if observer is not None else Observe()
    stateful = getattr(layer_cache, "attend_and_update", None)  # caches that carry decode state (kvjax.selection)
    with_input = getattr(layer_cache, "attend_hidden", None)    # attention that reads the layer input (NSA's gates)
    window = layer_window(config, layer)
    if window is not None:                                 # a sliding-window layer (models.local_attention)
        if prefill_attention is not None or stateful is not None:
            raise ValueError("sparse prefill and selection caches are not supported on sliding-window layers")
        if ring is not None:
            out, attn_obs, layer_cache = ring(q_rot, k_rot, v, positions, observe=wants, backend=backend)
        else:
            out, attn_obs = attend_local(layer_cache, q_rot, positions, window, observe=wants, backend=backend)
    elif with_input is not None:                           # kvjax.nsa_cache: gates from h, no prefill_attention
        if prefill_attention is not None:
            raise ValueError("sparse prefill does not apply to NSA layers (they select their own blocks)")
        out, attn_obs = with_input(h, q_rot, positions, observe=wants, backend=backend)
    elif prefill_attention is not None and q_rot.shape[2] > 1:
        from kvjax.sparse_prefill.attend import attend as sparse_attend
        out, attn_obs = sparse_attend(prefill_attention, q_rot, layer_cache, positions, layer=layer,
                                      observe=wants, backend=backend)
        out_obs["prefill_density"] = attn_obs.pop("prefill_density")
    elif stateful is not None:
        out, attn_obs, layer_cache = stateful(q_rot, positions, observe=wants, backend=backend, rope=rope)
    else:
        out, attn_obs = layer_cache.attend(q_rot, positions, observe=wants, backend=backend, rope=rope)
    if attn_mod is not None:
        out = attn_mod.attention(h, q_rot, positions, layer_cache, out)
    if config.attn_gate:                                   # Gated Attention (models.gated_attention)
        out = apply_gate(lp, h, out, config.n_heads)
    if observer is not None:
        if policy_layer is None:
            red = reduce_layer(observer, layer_cache, config, layer, config.n_layers, attn_obs, q_rot, q, k, v,
                               hidden, accumulated)
        else:
            pconfig = policy_config(config)
            red = reduce_layer(observer, layer_cache, pconfig, policy_layer, pconfig.n_layers, attn_obs, q_rot,
                               q, k, v, hidden, accumulated)
        out_obs.update({("queries_pre" if n == "q_pre" else n): a for n, a in red.items()})
    b, _, t, _ = out.shape
    attn = out.transpose(0, 2, 1, 3).reshape(b, t, -1).astype(x.dtype) @ lp["wo"]
    if config.post_norms:                                  # Gemma: norm each branch before its residual add
        attn = rms_norm(attn, lp["post_attn_norm"], config.norm_eps)
    x = x + attn
    h = rms_norm(x, lp["mlp_norm"], config.norm_eps)
    m = mlp(lp, h, config.mlp_activation)
    if config.post_norms:
        m = rms_norm(m, lp["post_mlp_norm"], config.norm_eps)
    return x + m, layer_cache, out_obs


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def mlp(lp: Params, h: jax.Array, activation: str = "silu") -> jax.Array:
    """Gated feed-forward of the normed input h [batch, seq, d_model] (fused gate|up or not):
    act(h @ w_gate) * (h @ w_up) @ w_down, act "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)."""
    act = _ACTIVATIONS[activation]
    if "w_gate_up" in lp:
        gu = h @ lp["w_gate_up"]
        f = gu.shape[-1] // 2
        return (act(gu[..., :f]) * gu[..., f:]) @ lp["w_down"]
    return (act(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def fuse_projections(params: Params) -> Params:
    """Per-layer parameters with q|k|v concatenated into `wqkv` [d_model, (q_heads + 2 kv_heads) *
    head_dim] and gate|up into `w_gate_up` [d_model, 2 ffn]: two matmuls per layer instead of five
    in decode, where each is a weight-bandwidth-bound GEMV with fixed launch and tail costs. Same
    outputs (up to matmul summation order). For inference: training code and tensor-parallel
    sharding (kvjax.sharding) expect the separate weights. Eager; call once (it copies the weights)."""
    def fuse(lp):
        lp = dict(lp)
        lp["wqkv"] = jnp.concatenate([lp.pop("wq"), lp.pop("wk"), lp.pop("wv")], axis=-1)
        lp["w_gate_up"] = jnp.concatenate([lp.pop("w_gate"), lp.pop("w_up")], axis=-1)
        return lp
    return {**params, "layers": tuple(fuse(lp) for lp in layer_params(params))}


def layer_params(params: Params) -> tuple[Params, ...]:
    """`params["layers"]` as a tuple of per-layer dicts (slices a stacked dict; a tuple is returned as is)."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return tuple(layers)
    n = next(iter(layers.values())).shape[0]
    return tuple({k: v[i] for k, v in layers.items()} for i in range(n))


def unstack_params(params: Params) -> Params:
    """The same parameters with `layers` as a tuple of per-layer dicts: every layer's weights are
    their own buffers, so a decode loop reads them without slicing copies (eager; call once)."""
    return {**params, "layers": tuple(jax.tree_util.tree_map(jnp.array, lp) for lp in layer_params(params))}


def stacked_layer_params(params: Params) -> Params:
    """`params["layers"]` as one dict of arrays stacked on a leading layer axis."""
    layers = params["layers"]
    if isinstance(layers, dict):
        return layers
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def n_layers_of(params: Params) -> int:
    layers = params["layers"]
    return len(layers) if isinstance(layers, (tuple, list)) else next(iter(layers.values())).shape[0]


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
    if config.attn_gate:
        layers = params["layers"]
        names = layers if isinstance(layers, dict) else (layers[0] if len(layers) else {})
        if "w_attn_gate" not in names:
            raise ValueError(f"config {config.name} has a {config.attn_gate} attention gate but the params have no "
                             f"w_attn_gate (models.gated_attention.convert adds it)")
    if isinstance(cache, kvcache.KVCache):
        if cache.keys.shape[-1] != config.head_dim:
            raise ValueError(f"cache head_dim {cache.keys.shape[-1]} != model head_dim {config.head_dim}")
        if not jnp.issubdtype(cache.keys.dtype, jnp.floating):
            raise TypeError(f"cache keys must be floating point, got {cache.keys.dtype}")


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache, config: ModelConfig,
            observe: Observe = Observe(), all_logits: bool = True, *, observer: Optional[Observer] = None,
            attention: str = "auto", accumulated: Optional[jax.Array] = None, attn_mod=None,
            return_hidden: bool = False, prefill_attention=None):
    """Run new tokens through the model, appending their K/V to the cache.

    tokens:    [batch, new] int; positions: [batch, new] int (-1 marks left padding).
    cache:     a `kvjax.layerwise.LayerwiseCache` (one cache per layer: the engine's layout, looped
               over in Python, updated in place under a donated loop), or any cache pytree stacked
               over layers (`KVCache [layers, batch, kv_heads, capacity, head_dim]`, a quantized
               cache of `kvjax.quant`, ...: scanned). Every cache implements `kvjax.cache.LayerCache`.
    observe:   per-token observations to return stacked over layers: `qkv` -> "q_pre"
               [L, B, Hq, new, d], "k_pre", "v" [L, B, Hkv, new, d]; `hidden` -> "hidden"
               [L, B, new, d_model]. Attention statistics are not returned: ask an `observer`.
    observer:  a static `kvjax.observation.Observer`: every layer reduces its observation to the
               policy's "scores" [L, B, Hkv, S] / "accumulated" (running state, given in
               `accumulated` [L, B, Hkv, S]) / last "queries" [L, B, Hq, w, d].
    attention: "auto" | "xla" | "pallas" | "interpret" (static): which attention implementation
               the caches use (see kvjax.attention).
    attn_mod:  optional attention modification (training of learned pieces, e.g. DuoAttention's
               gates `train.duo.DuoMix`): a pytree whose array leaves carry a leading layers axis
               [L, ...]; each layer calls its slice's `attention(h [B, new, d_model] (normed layer
               input), q [B, Hq, new, d] (post-RoPE), positions, layer_cache, out [B, Hq, new, d])`
               and uses the result as its attention output.
    return_hidden: return the final (normed) hidden states [batch, new or 1, d_model] in place
               of the logits.
    prefill_attention: optional `kvjax.sparse_prefill` method (static): chunks of several tokens
               attend block-sparsely (outputs gain "prefill_density" [L, B, Hkv, 2]).
    returns (logits [batch, new or 1, vocab] float32, cache, outputs dict stacked over layers).
    `all_logits=False` returns only the last position's logits (prefill of long prompts).
    """
    check_backend(attention)
    if observe.window or observe.column_sums:
        raise ValueError("attention statistics are reduced inside the layer: pass observer=Observer(policy) "
                         "instead of Observe(window=/column_sums=)")
    check_inputs(params, tokens, positions, cache, config)
    x = params["embed"][tokens]
    if config.embed_scale:                                 # Gemma: sqrt(d_model), rounded to the weights' dtype
        x = x * jnp.asarray(math.sqrt(config.d_model), x.dtype)
    if observer is not None and observer.policy.accumulates and accumulated is None:
        raise ValueError(f"{type(observer.policy).__name__} accumulates a running score: pass accumulated=")

    def layer_fn(lp, x, lc, layer, acc, mod=None, obs=observer, policy_layer=None):
        return decoder_layer(lp, x, positions, lc, config, observe, obs, attention, layer, acc, mod,
                             prefill_attention, policy_layer)

    if isinstance(cache, LayerwiseCache):
        layers, outs = [], []
        carry = None         # a selection handed from layer to layer (kvjax.selection.delta's Δ-layers)
        for i, (lp, lc) in enumerate(zip(layer_params(params), cache.layers)):
            mod = None if attn_mod is None else jax.tree_util.tree_map(lambda a: a[i], attn_mod)
            lc = cache.enter(i)
            if carry is not None and hasattr(lc, "receive"):
                lc = lc.receive(carry)
            g = policy_index(config, i)        # None: a sliding-window layer, which policies leave alone
            acc = None if accumulated is None or g is None else accumulated[g]
            x, lc, out = layer_fn(lp, x, lc, i, acc, mod, observer if g is not None else None,
                                  g if config.local_layers else None)
            handed = lc.hand_over() if hasattr(lc, "hand_over") else None
            carry = carry if handed is None else handed
            layers.append(cache.leave(i, lc))
            outs.append(out)
        cache = dataclasses.replace(cache, layers=tuple(layers))
        outs = _stack_outputs(outs)
    else:
        if observer is not None and config.local_layers:
            raise ValueError("policies act on the global layers of a model with sliding-window layers: pass the "
                             "engine's per-layer cache (kvjax.generate.init_engine_cache) to observe them")
        def body(x, xs):
            lp, lc, layer, acc, mod = xs
            x, lc, out = layer_fn(lp, x, lc, layer, acc, mod)
            return x, (lc, out)

        xs = (stacked_layer_params(params), cache, jnp.arange(config.n_layers), accumulated, attn_mod)
        x, (cache, outs) = jax.lax.scan(body, x, xs)
    if not all_logits:
        x = x[:, -1:]
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    if return_hidden:
        return x, cache, outs
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = (x @ head).astype(jnp.float32)
    if config.final_logit_softcap is not None:
        logits = config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)
    return logits, cache, outs


def _stack_outputs(outs: list[dict]) -> dict:
    """Per-layer outputs stacked over the layers that return each (observer outputs come from the
    global layers only, per-token observations from every layer)."""
    stacked = {}
    for name in dict.fromkeys(k for o in outs for k in o):
        xs = [o[name] for o in outs if name in o]
        if any(len({a.shape for a in col}) > 1 for col in zip(*(jax.tree_util.tree_leaves(x) for x in xs))):
            raise ValueError("a LayerwiseCache with layers of different sizes cannot return per-slot "
                             "observations (it is a final layout: compress before converting to it)")
        stacked[name] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    return stacked


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02,
                stacked: bool = False) -> Params:
    """Random parameters in the documented layout (for shape tests and benchmarks); `layers` is a
    tuple of per-layer dicts (drawn layer by layer), or with `stacked=True` one dict stacked over layers."""
    d, f = config.d_model, config.ffn_dim
    qd, kd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"wq": (d, qd), "wk": (d, kd), "wv": (d, kd), "wo": (qd, d),
              "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if config.qkv_bias:
        shapes.update(bq=(qd,), bk=(kd,), bv=(kd,))
    if config.attn_gate:
        from models.gated_attention import gate_shapes
        shapes.update(gate_shapes(config))

    def one_layer(layer_key):
        keys = jax.random.split(layer_key, len(shapes))
        lp = {n: (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype) for (n, s), k in zip(shapes.items(), keys)}
        lp["attn_norm"] = jnp.ones((d,), dtype)
        lp["mlp_norm"] = jnp.ones((d,), dtype)
        if config.post_norms:
            lp["post_attn_norm"] = jnp.ones((d,), dtype)
            lp["post_mlp_norm"] = jnp.ones((d,), dtype)
        if config.qk_norm:
            lp["q_norm"] = jnp.ones((config.head_dim,), dtype)
            lp["k_norm"] = jnp.ones((config.head_dim,), dtype)
        return lp

    k_layers, k_embed, k_head = jax.random.split(key, 3)
    layers = tuple(one_layer(jax.random.fold_in(k_layers, i)) for i in range(config.n_layers))
    params = {"embed": (scale * jax.random.normal(k_embed, (config.vocab_size, d), jnp.float32)).astype(dtype),
              "final_norm": jnp.ones((d,), dtype),
              "layers": stacked_layer_params({"layers": layers}) if stacked else layers}
    if not config.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(k_head, (d, config.vocab_size), jnp.float32)).astype(dtype)
    return params
