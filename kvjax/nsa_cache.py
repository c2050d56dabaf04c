"""NSA in the engine: `kvjax.generate` (jitted prefill + `lax.while_loop` decode) with NSA layers.

    result = generate(params, config, prompts, 32, cache_init=nsa_cache_init(cfg, nsa))

`nsa_cache_init(cfg, nsa)` builds an `NSAEngineCache`: a per-layer cache (`LayerwiseCache`) whose
NSA layers are `NSALayer`s -- the RoPE'd keys and values of every token at slot = position
([batch, kv_heads, capacity, D], so NSA's blocks are slot ranges however the prompts are
left-padded) plus the compressed keys (RoPE'd at i*d) / values of the compression blocks
([batch, kv_heads, n_compressed(capacity), D]) -- and whose other layers are dense `KVCache`s.
The layers' NSA parameters (compressor, position embedding, gates) ride along in the cache
pytree (`weights`, handed to each layer by `enter`, as MiniCache hands its shared directions) so
the engine's prefill/decode functions need no new argument; `memory_bytes` counts the K/V, the
compressed K/V and the lengths, not the weights.

Per layer (`models.llama.decoder_layer` calls `attend_hidden`: the gates read the normed layer
input):
- append: the new tokens' K/V at their positions (padding dropped); a prefill chunk recomputes
  every compressed block from the cache (un-rotating the keys: `models.nsa.compressed_kv`), a
  decode step writes the block its token completes (`kvjax.nsa_decode.update_compressed`).
- attend: a decode step runs `kvjax.nsa_decode.decode_attention` (compressed tokens in XLA, the
  selected blocks through `pallas_kernels.sparse_decode` in page mode, the window through
  `dense_decode`); a prefill chunk runs `chunk_attention` (jnp, masks [chunk, capacity]).

Not combined with compression policies, query-aware selection, sparse prefill or a mesh (errors).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.cache import tree_bytes
from kvjax.layerwise import LayerwiseCache
from kvjax.nsa_decode import decode_attention, update_compressed
from models.config import ModelConfig
from models.nsa import (NSAConfig, block_importance, check_model, check_nsa_params, compressed_kv,
                        compressed_visible, gates, masked_attention, select_blocks)


def chunk_attention(q, h, keys, values, ck, cv, nlp, qpos, cfg: NSAConfig, config: ModelConfig) -> jax.Array:
    """New queries q [b, hq, n, D] (RoPE'd) at positions qpos [b, n] (-1 = padding: output 0) over
    a layer holding token p at slot p (keys/values [b, hkv, cap, D], ck/cv [b, hkv, n_cmp, D]);
    h the normed layer input [b, n, d_model]. -> [b, hq, n, D] float32, the gated branches."""
    b, hq, n, hd = q.shape
    cap = keys.shape[2]
    scale = hd ** -0.5
    o_cmp, p_cmp = masked_attention(q, ck, cv, compressed_visible(qpos, ck.shape[2], cfg)[:, None], scale)
    nb = cfg.n_selection_blocks(cap)
    idx, _ = select_blocks(block_importance(p_cmp, nb, cfg), qpos, cfg)           # [b, hkv, n, top_n]
    slot = jnp.arange(cap, dtype=jnp.int32)
    causal = slot <= qpos[..., None]                                               # [b, n, cap]
    chosen = (idx[..., None] == jnp.arange(nb, dtype=jnp.int32)).any(-2)           # [b, hkv, n, nb]
    o_slc = masked_attention(q, keys, values, chosen[..., slot // cfg.block_size] & causal[:, None], scale)[0]
    in_window = causal & (slot > qpos[..., None] - cfg.window)
    o_win = masked_attention(q, keys, values, in_window[:, None], scale)[0]
    g = gates(h, nlp, cfg, hq)
    return g[0] * o_cmp + g[1] * o_slc + g[2] * o_win


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSALayer:
    """One NSA layer's cache. keys/values [batch, kv_heads, capacity, D] (token p at slot p);
    ck/cv [batch, kv_heads, n_compressed(capacity), D]; lengths [batch, kv_heads] (1 + the highest
    position held); weights: the layer's NSA params while the layer runs (None when stored)."""

    keys: jax.Array
    values: jax.Array
    ck: jax.Array
    cv: jax.Array
    lengths: jax.Array
    weights: Optional[dict] = None
    cfg: NSAConfig = dataclasses.field(metadata=dict(static=True), default=NSAConfig())
    model: Optional[ModelConfig] = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    @property
    def positions(self) -> jax.Array:
        slot = jnp.arange(self.capacity, dtype=jnp.int32)
        return jnp.where(slot < self.lengths[..., None], slot, -1)

    def memory_bytes(self) -> int:
        """Bytes of the K/V, compressed K/V and lengths (not the NSA weights)."""
        return tree_bytes((self.keys, self.values, self.ck, self.cv, self.lengths))

    def _weights(self) -> dict:
        if self.weights is None:
            raise ValueError("NSALayer without its weights: run it inside an NSAEngineCache (nsa_cache_init)")
        return self.weights

    def append(self, keys, values, positions, keys_pre_rope=None) -> "NSALayer":
        """keys (RoPE'd), values [batch, kv_heads, new, D] at positions [batch, new] (-1: dropped)."""
        b, h, new, _ = keys.shape
        slot = jnp.where(positions >= 0, positions, self.capacity)                  # out of range: dropped
        write = jax.vmap(lambda buf, s, u: buf.at[:, s].set(u.astype(buf.dtype), mode="drop"))
        k, v = write(self.keys, slot, keys), write(self.values, slot, values)
        top = jnp.max(positions, axis=1) + 1                                        # [batch]
        lengths = jnp.maximum(self.lengths, top[:, None])
        w = self._weights()
        if new == 1:                                                                # a decode step
            ck, cv = update_compressed(k, v, self.ck, self.cv, w, positions[:, 0], self.cfg, self.model)
        else:                                                                       # a prefill chunk: all blocks
            from models.rope import apply_rope
            pos = jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32), (b, self.capacity))
            ck, cv = compressed_kv(apply_rope(k, -pos, self.model), v, w, self.cfg, self.model)
            ck, cv = ck.astype(self.ck.dtype), cv.astype(self.cv.dtype)
        return dataclasses.replace(self, keys=k, values=v, ck=ck, cv=cv, lengths=lengths)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        raise ValueError("an NSA layer's gates read the layer input: models.llama.decoder_layer calls "
                         "attend_hidden(h, q, positions, ...)")

    def attend_hidden(self, h, q, query_positions, *, observe, backend="auto"):
        """h [b, new, d_model] (normed layer input), q [b, hq, new, D] (RoPE'd) at query_positions
        [b, new] -> (out [b, hq, new, D] float32, {})."""
        if observe.wants_attention:
            raise ValueError("NSA layers return no attention observations (compression policies do not apply)")
        w = self._weights()
        if q.shape[2] == 1:
            out = decode_attention(q, h, self.keys, self.values, self.ck, self.cv, w, query_positions[:, 0],
                                   self.cfg, self.model, backend)
        else:
            out = chunk_attention(q, h, self.keys, self.values, self.ck, self.cv, w, query_positions, self.cfg,
                                  self.model)
        return out, {}

    def resize(self, capacity: int) -> "NSALayer":
        """Same tokens in `capacity` slots (shrinking below the longest row is an error; eager)."""
        cur, nc = self.capacity, self.cfg.n_compressed(capacity)
        if capacity < cur and capacity < int(jnp.max(self.lengths)):
            raise ValueError(f"cannot shrink an NSA layer to {capacity} slots: a row holds "
                             f"{int(jnp.max(self.lengths))} tokens")
        fit = lambda x, n: (jnp.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)]) if n >= x.shape[2]
                            else x[:, :, :n])
        return dataclasses.replace(self, keys=fit(self.keys, capacity), values=fit(self.values, capacity),
                                   ck=fit(self.ck, nc), cv=fit(self.cv, nc))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSAEngineCache(LayerwiseCache):
    """The engine's per-layer cache with NSA layers; weights[i]: layer i's NSA params (None for a
    dense layer), handed to the layer by `enter` and taken back by `leave`."""

    weights: tuple = ()

    def enter(self, i: int):
        lc = self.layers[i]
        return dataclasses.replace(lc, weights=self.weights[i]) if isinstance(lc, NSALayer) else lc

    def leave(self, i: int, layer):
        return dataclasses.replace(layer, weights=None) if isinstance(layer, NSALayer) else layer

    def memory_bytes(self) -> int:
        """Bytes of every layer's cache (K/V, compressed K/V, positions / lengths), not the weights."""
        return sum(lc.memory_bytes() for lc in self.layers)

    def attention_name(self, attention: str = "auto") -> str:
        """What generate's decode steps run (its stats' "attention")."""
        from kvjax.attention import decode_impl
        kernels = []
        for kernel in ("sparse_decode", "dense_decode"):
            sel = decode_impl(kernel, attention)
            kernels.append("xla" if sel is None else f"pallas-{sel[0]}{'-interpret' if sel[1] else ''}:{kernel}")
        return (f"nsa decode: compressed xla, selected blocks {kernels[0]}, window {kernels[1]} (xla if the "
                f"kernel does not take the head dim / dtype); xla prefill")


def check_engine(**options) -> None:
    """ValueError for the generate options an NSA cache does not combine with (name=value; None = unused)."""
    bad = sorted(n for n, v in options.items() if v is not None)
    if bad:
        raise ValueError(f"NSA attention runs alone: {', '.join(bad)} not supported with an NSA cache")


def nsa_cache_init(cfg: NSAConfig, nsa: dict):
    """`cache_init` for `kvjax.generate`: (config, batch, capacity, dtype=) -> an empty
    NSAEngineCache with `nsa` ({layer: NSA params}, `models.nsa.init_nsa_params` or
    `models.nsa_weights.load_nsa`) copied into it (the engine donates its cache)."""
    nsa = {int(i): lp for i, lp in nsa.items()}

    def init(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> NSAEngineCache:
        check_model(config, cfg)
        check_nsa_params(nsa, config, cfg)
        if min(batch, capacity) <= 0:
            raise ValueError(f"batch and capacity must be positive, got {batch}, {capacity}")
        from kvjax.cache import init_cache
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        cshape = shape[:2] + (cfg.n_compressed(capacity), config.head_dim)
        layers, weights = [], []
        for i in range(config.n_layers):
            if i in nsa:
                layers.append(NSALayer(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(cshape, dtype),
                                       jnp.zeros(cshape, dtype), jnp.zeros(shape[:2], jnp.int32), None, cfg, config))
                weights.append({n: jnp.array(a, dtype) for n, a in nsa[i].items()})
            else:
                layers.append(jax.tree_util.tree_map(lambda x: x[0], init_cache(1, batch, config.n_kv_heads, capacity,
                                                                                config.head_dim, dtype)))
                weights.append(None)
        return NSAEngineCache(layers=tuple(layers), capacity=capacity, uniform=True, weights=tuple(weights))

    init.takes_engine_dtype = True
    init.check_engine = check_engine
    return init



def load_engine(path, config: ModelConfig, params):
    """An NSA export (`models.nsa_weights.save_nsa`, `python -m train.nsa`) for `kvjax.generate`:
    -> (params: the export's backbone in `params`' dtype when it has one, else `params`;
    cache_init: `nsa_cache_init` of its config and weights). Errors of `load_nsa` (another model)."""
    from models.nsa_weights import load_nsa
    cfg, nsa, backbone = load_nsa(path, config)
    if backbone is not None:
        dtype = params["embed"].dtype
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), backbone)
    return params, nsa_cache_init(cfg, nsa)
