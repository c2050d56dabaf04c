"""Natively trainable sparse attention (NSA, Yuan et al., arXiv 2502.11089) for the Llama family.

A layer's attention output is a gated sum of three branches over the layer's own q/k/v
(the branches share the checkpoint's K/V, as the FSA module does):

    o_t = g_cmp(t) * Attn(q_t, K_cmp, V_cmp) + g_slc(t) * Attn(q_t, K_slc(t), V_slc(t))
        + g_win(t) * Attn(q_t, K[t-w+1 .. t], V[t-w+1 .. t])

- compression: compressed key/value i covers tokens [i*d, i*d + l) (l = `kernel_size` 32,
  d = `kernel_stride` 16). phi is `linear_compress` of the spec: the l pre-RoPE keys (plus a
  learned intra-block position embedding) are flattened to l*D and projected by a learned
  [kv_heads, l*D, D] matrix; values likewise without the embedding. Compressed keys are rotated
  at position i*d ("RoPE at stride d"). Query t sees block i iff t >= i*d + l - 1.
- selection: importance = the compression branch's softmax probabilities summed over the g query
  heads of a KV head, mapped to selection blocks of l' = `block_size` 64 tokens with the overlap
  weights (`overlap_weights`, [1, 2, 2, 2, 1] for 32/16/64); the `init_blocks` first and the
  `local_blocks` last blocks (the query's own block and the one before) are forced in; the top
  `top_n` (forced ones included) are attended causally.
- sliding window: the last `window` tokens (the query included).
- gates: g = sigmoid(h_t W_g + b_g), one gate per query head and branch, from the normed hidden
  state h_t of the layer input.

Initialisation (`init_nsa_layer`) reuses a pretrained dense model: q/k/v/o stay the checkpoint's;
the compressor starts as mean pooling (position embedding 0), the gate weights at 0 with biases
`gate_bias_init` (default: compression off, sigmoid(-4) = 0.018; selection and window 0.5 each,
which sum to the dense output while the context fits in both).

Everything here is the pure-jnp reference path (float32 softmax, masks over [T, T]: for tests,
training at short context and as the kernels' oracle). `pallas_kernels.gpu.nsa_select` /
`pallas_kernels.tpu.nsa_select` run the selected-block branch without the [T, T] mask.

Shapes: q [batch, q_heads, seq, head_dim]; k, v [batch, kv_heads, seq, head_dim];
selection indices [batch, kv_heads, seq, top_n] int32 (block ids, -1 = none).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.attention import NEG_INF, attend
from models.config import ModelConfig
from models.llama import layer_params, project_qkv, rms_norm
from models.rope import apply_rope

Params = dict[str, Any]
BRANCHES = ("cmp", "slc", "win")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters; defaults are the spec's (FSA README: kernel_size 32, kernel_stride 16,
    block_size 64, topk 16, init_blocks 1, local_blocks 2, window 512).

    gate_bias_init: initial gate biases (cmp, slc, win). gate_override: constant gates (cmp, slc,
    win) instead of the learned sigmoid (ablations / the dense-equivalence check).
    layers: the layers whose attention is NSA (None: all); the others stay dense causal."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    top_n: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    gate_bias_init: tuple[float, float, float] = (-4.0, 0.0, 0.0)
    gate_override: Optional[tuple[float, float, float]] = None
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        l, d, bs = self.kernel_size, self.kernel_stride, self.block_size
        if min(l, d, bs, self.top_n, self.window) <= 0:
            raise ValueError(f"kernel_size, kernel_stride, block_size, top_n and window must be positive: {self}")
        if l % d or bs % d:
            raise ValueError(f"kernel_size ({l}) and block_size ({bs}) must be multiples of kernel_stride ({d})")
        if self.init_blocks < 0 or self.local_blocks < 1:
            raise ValueError(f"init_blocks must be >= 0 and local_blocks >= 1, got {self.init_blocks}, "
                             f"{self.local_blocks}")
        if self.init_blocks + self.local_blocks > self.top_n:
            raise ValueError(f"init_blocks + local_blocks ({self.init_blocks + self.local_blocks}) are counted "
                             f"inside top_n ({self.top_n}) and must not exceed it")
        for name in ("gate_bias_init", "gate_override"):
            val = getattr(self, name)
            if val is not None and len(val) != 3:
                raise ValueError(f"{name} must be 3 numbers (cmp, slc, win), got {val}")

    @property
    def overlap_weights(self) -> np.ndarray:
        """w_o = #{(a, b): a + b = o, a < l/d, b < l'/d}: compressed block j*(l'/d) - (l/d - 1) + o
        overlaps selection block j by w_o strides ([1, 2, 2, 2, 1] for 32/16/64)."""
        a, b = self.kernel_size // self.kernel_stride, self.block_size // self.kernel_stride
        return np.bincount((np.arange(a)[:, None] + np.arange(b)[None, :]).ravel()).astype(np.float32)

    def n_compressed(self, t: int) -> int:
        """Compressed blocks that fit in t tokens: floor((t - l) / d) + 1 (0 when t < l)."""
        return max(0, (t - self.kernel_size) // self.kernel_stride + 1)

    def n_selection_blocks(self, t: int) -> int:
        return -(-t // self.block_size)

    def nsa_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = tuple(range(n_layers)) if self.layers is None else tuple(sorted(set(self.layers)))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"NSA layers {bad} out of range for a model of {n_layers} layers")
        return layers


def check_model(config: ModelConfig, cfg: NSAConfig) -> None:
    """Errors for a model the NSA layout does not fit."""
    if config.n_heads % config.n_kv_heads:
        raise ValueError(f"GQA group does not divide: {config.n_heads} q heads over {config.n_kv_heads} kv heads")
    cfg.nsa_layers(config.n_layers)


# ----------------------------------------------------------------------------------------------
# Parameters.

def layer_param_shapes(config: ModelConfig, cfg: NSAConfig) -> dict[str, tuple[int, ...]]:
    hkv, hd, l = config.n_kv_heads, config.head_dim, cfg.kernel_size
    return {"cmp_wk": (hkv, l * hd, hd), "cmp_wv": (hkv, l * hd, hd), "cmp_pe": (hkv, l, hd),
            "gate_w": (config.d_model, config.n_heads * 3), "gate_b": (config.n_heads * 3,)}


def init_nsa_layer(config: ModelConfig, cfg: NSAConfig, key: Optional[jax.Array] = None, noise: float = 0.0,
                   dtype=jnp.float32) -> Params:
    """One layer's NSA parameters: compressor = mean pooling (+ `noise` * normal), position
    embedding 0, gate weights 0 (+ noise), gate biases `cfg.gate_bias_init` (per head)."""
    hkv, hd, l = config.n_kv_heads, config.head_dim, cfg.kernel_size
    pool = np.tile(np.eye(hd, dtype=np.float32) / l, (l, 1))                 # [l*hd, hd]
    pool = jnp.broadcast_to(jnp.asarray(pool), (hkv, l * hd, hd))
    shapes = layer_param_shapes(config, cfg)
    p = {"cmp_wk": pool, "cmp_wv": pool, "cmp_pe": jnp.zeros(shapes["cmp_pe"]),
         "gate_w": jnp.zeros(shapes["gate_w"]),
         "gate_b": jnp.tile(jnp.asarray(cfg.gate_bias_init, jnp.float32), config.n_heads)}
    if noise and key is not None:
        keys = dict(zip(p, jax.random.split(key, len(p))))
        p = {n: a + noise * jax.random.normal(keys[n], a.shape) if n != "gate_b" else a for n, a in p.items()}
    return {n: jnp.asarray(a, dtype) for n, a in p.items()}


def init_nsa_params(config: ModelConfig, cfg: NSAConfig, key: Optional[jax.Array] = None, noise: float = 0.0,
                    dtype=jnp.float32) -> dict[int, Params]:
    """{layer index: NSA params} for the NSA layers of `cfg`."""
    check_model(config, cfg)
    key = jax.random.PRNGKey(0) if key is None else key
    return {i: init_nsa_layer(config, cfg, jax.random.fold_in(key, i), noise, dtype)
            for i in cfg.nsa_layers(config.n_layers)}


def check_nsa_params(nsa: dict, config: ModelConfig, cfg: NSAConfig) -> None:
    want = layer_param_shapes(config, cfg)
    layers = cfg.nsa_layers(config.n_layers)
    if sorted(int(i) for i in nsa) != list(layers):
        raise ValueError(f"NSA params cover layers {sorted(nsa)}, the config needs {list(layers)}")
    for i, lp in nsa.items():
        for name, shape in want.items():
            if name not in lp or tuple(lp[name].shape) != shape:
                got = None if name not in lp else tuple(lp[name].shape)
                raise ValueError(f"NSA layer {i} {name}: shape {got}, model {config.name} needs {shape}")


# ----------------------------------------------------------------------------------------------
# Branches (pure jnp).

def compress(x: jax.Array, w: jax.Array, pe: Optional[jax.Array], cfg: NSAConfig) -> jax.Array:
    """x [batch, kv_heads, seq, D] -> [batch, kv_heads, n_compressed, D]: block i = tokens
    [i*d, i*d + l) (+ pe [kv_heads, l, D]) flattened to l*D and projected by w [kv_heads, l*D, D]."""
    b, h, t, dd = x.shape
    n = cfg.n_compressed(t)
    if n == 0:
        return jnp.zeros((b, h, 0, dd), x.dtype)
    idx = np.arange(n)[:, None] * cfg.kernel_stride + np.arange(cfg.kernel_size)[None, :]
    blocks = x[:, :, idx].astype(jnp.float32)                                # [b, h, n, l, D]
    if pe is not None:
        blocks = blocks + pe[None, :, None].astype(jnp.float32)
    flat = blocks.reshape(b, h, n, -1)
    return jnp.einsum("bhnf,hfe->bhne", flat, w.astype(jnp.float32)).astype(x.dtype)


def compressed_kv(k_pre: jax.Array, v: jax.Array, lp: Params, cfg: NSAConfig, config: ModelConfig):
    """Compressed keys (RoPE'd at positions i*d) and values [batch, kv_heads, n_compressed, D]."""
    ck = compress(k_pre, lp["cmp_wk"], lp["cmp_pe"], cfg)
    cv = compress(v, lp["cmp_wv"], None, cfg)
    b, _, n, _ = ck.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * cfg.kernel_stride, (b, n))
    return apply_rope(ck, pos, config), cv


def _grouped_logits(q, k, scale):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, d).astype(jnp.float32)
    return jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32)) * scale


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float):
    """q [b, hq, t, D], k/v [b, hkv, s, D], mask [b, hkv, t, s] (or broadcastable) ->
    (out [b, hq, t, D] float32, probs [b, hkv, g, t, s]); rows without a visible key give 0."""
    b, hq, t, _ = q.shape
    logits = _grouped_logits(q, k, scale)
    m = jnp.broadcast_to(mask, (b, k.shape[1], t, k.shape[2]))[:, :, None]
    logits = jnp.where(m, logits, NEG_INF)
    probs = jnp.where(m, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhgts,bhsd->bhgtd", probs, v.astype(jnp.float32))
    return out.reshape(b, hq, t, -1), probs


def compressed_visible(query_pos: jax.Array, n: int, cfg: NSAConfig) -> jax.Array:
    """[..., n] bool: query at position p sees compressed block i iff p >= i*d + l - 1."""
    ends = jnp.arange(n, dtype=jnp.int32) * cfg.kernel_stride + cfg.kernel_size - 1
    return query_pos[..., None] >= ends


def block_importance(p_cmp: jax.Array, n_blocks: int, cfg: NSAConfig) -> jax.Array:
    """p_cmp [b, hkv, g, t, n_cmp] -> [b, hkv, t, n_blocks]: summed over the group, then
    s_j = sum_o w_o p[j*(l'/d) - (l/d - 1) + o] (indices outside [0, n_cmp) count 0)."""
    p = p_cmp.sum(axis=2)
    w = cfg.overlap_weights
    n_cmp = p.shape[-1]
    lo = cfg.kernel_size // cfg.kernel_stride - 1
    idx = np.arange(n_blocks)[:, None] * (cfg.block_size // cfg.kernel_stride) - lo + np.arange(len(w))[None, :]
    ok = (idx >= 0) & (idx < n_cmp)
    gathered = p[..., np.clip(idx, 0, max(n_cmp - 1, 0))] if n_cmp else jnp.zeros(p.shape[:-1] + idx.shape)
    return jnp.sum(jnp.where(ok, gathered, 0.0) * w, axis=-1)


def select_blocks(scores: jax.Array, query_pos: jax.Array, cfg: NSAConfig) -> tuple[jax.Array, jax.Array]:
    """scores [b, hkv, t, n_blocks], query_pos [t] or [b, t] -> (indices [b, hkv, t, n] int32,
    counts [b, hkv, t] int32), n = min(top_n, n_blocks). Blocks after the query's own are out;
    the first `init_blocks` and the `local_blocks` up to the query's own are forced in; the
    valid indices come first (descending score), the rest are -1."""
    nb = scores.shape[-1]
    n = min(cfg.top_n, nb)
    qp = jnp.broadcast_to(query_pos, scores.shape[:1] + query_pos.shape[-1:])[:, None, :, None]
    cur = qp // cfg.block_size
    j = jnp.arange(nb, dtype=jnp.int32)
    forced = (j < cfg.init_blocks) | ((j > cur - cfg.local_blocks) & (j <= cur))
    s = jnp.where(forced, jnp.inf, scores.astype(jnp.float32))
    s = jnp.where(j <= cur, s, -jnp.inf)
    top, idx = jax.lax.top_k(s, n)
    valid = top > -jnp.inf
    return jnp.where(valid, idx, -1).astype(jnp.int32), valid.sum(-1).astype(jnp.int32)


def selected_mask(indices: jax.Array, t: int, block_size: int, query_pos: jax.Array) -> jax.Array:
    """[b, hkv, t, s] bool: key s is in a selected block of the query and not after it."""
    blocks = jnp.arange(t, dtype=jnp.int32) // block_size
    hit = (indices[..., None, :] == blocks[:, None]).any(-1)                   # [b, hkv, t, s]
    return hit & (jnp.arange(t)[None, :] <= query_pos[:, None])


def selected_attention(q, k, v, indices, block_size: int, scale: float):
    """Reference of the selection kernels: q [b, hq, t, D] at positions 0..t-1 attends causally to
    the blocks `indices` [b, hkv, t, n] (-1 = none) of k/v [b, hkv, t, D] -> [b, hq, t, D] f32."""
    t = q.shape[2]
    return masked_attention(q, k, v, selected_mask(indices, t, block_size, jnp.arange(t)), scale)[0]


def window_blocks(t: int, window: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sliding window as block lists: (indices [t, nw] int32, counts [t] int32), token p lists
    the blocks of [max(0, p - window + 1), p] (own block first, -1 after the count); with the
    kernels' `window` lower bound this is the window branch without a [t, t] mask."""
    p = np.arange(t)
    cur, lo = p // block_size, np.maximum(0, p - window + 1) // block_size
    nw = int((cur - lo).max()) + 1 if t else 1
    j = np.arange(nw)
    counts = cur - lo + 1
    idx = np.where(j[None, :] < counts[:, None], cur[:, None] - j[None, :], -1)
    return idx.astype(np.int32), counts.astype(np.int32)


def window_mask(t: int, window: int) -> jax.Array:
    i = jnp.arange(t)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def gates(h: jax.Array, lp: Params, cfg: NSAConfig, n_heads: int) -> jax.Array:
    """h [b, t, d_model] -> [3, b, hq, t, 1] float32 gates (cmp, slc, win)."""
    if cfg.gate_override is not None:
        g = jnp.broadcast_to(jnp.asarray(cfg.gate_override, jnp.float32), h.shape[:2] + (n_heads, 3))
    else:
        z = h.astype(jnp.float32) @ lp["gate_w"].astype(jnp.float32) + lp["gate_b"].astype(jnp.float32)
        g = jax.nn.sigmoid(z.reshape(h.shape[:2] + (n_heads, 3)))
    return g.transpose(3, 0, 2, 1)[..., None]


SelectFn = Any  # (q, k, v, indices, counts, block_size, scale, window=0) -> [b, hq, t, D]


def nsa_attention(q_rot, k_rot, k_pre, v, h, lp: Params, cfg: NSAConfig, config: ModelConfig,
                  select_fn: Optional[SelectFn] = None, return_aux: bool = False):
    """The three gated branches for a full sequence at positions 0..t-1.

    q_rot [b, hq, t, D] (RoPE'd), k_rot / k_pre [b, hkv, t, D] (with / without RoPE), v, h the
    normed layer input [b, t, d_model]. select_fn: the selected-block attention (None: the jnp
    reference `selected_attention` and a [t, t] window mask; a Pallas kernel wrapper otherwise,
    which then also runs the window branch over `window_blocks` with its `window` lower bound).
    -> [b, hq, t, D] float32
    (and with return_aux a dict of the branch outputs, gates, indices and compressed k/v)."""
    b, hq, t, hd = q_rot.shape
    scale = hd ** -0.5
    pos = jnp.arange(t, dtype=jnp.int32)
    ck, cv = compressed_kv(k_pre, v, lp, cfg, config)
    vis = compressed_visible(pos, ck.shape[2], cfg)[None, None]
    o_cmp, p_cmp = masked_attention(q_rot, ck, cv, vis, scale)
    nb = cfg.n_selection_blocks(t)
    scores = block_importance(p_cmp, nb, cfg)
    idx, counts = select_blocks(jax.lax.stop_gradient(scores), pos, cfg)
    if select_fn is None:
        o_slc = selected_attention(q_rot, k_rot, v, idx, cfg.block_size, scale)
    else:
        o_slc = select_fn(q_rot, k_rot, v, idx, counts, cfg.block_size, scale).astype(jnp.float32)
    if select_fn is None:
        o_win = masked_attention(q_rot, k_rot, v, window_mask(t, cfg.window)[None, None], scale)[0]
    else:
        widx, wcnt = window_blocks(t, cfg.window, cfg.block_size)
        hkv = k_rot.shape[1]
        o_win = select_fn(q_rot, k_rot, v, jnp.broadcast_to(jnp.asarray(widx), (b, hkv) + widx.shape),
                          jnp.broadcast_to(jnp.asarray(wcnt), (b, hkv, t)), cfg.block_size, scale,
                          cfg.window).astype(jnp.float32)
    g = gates(h, lp, cfg, hq)
    out = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
    if return_aux:
        return out, {"cmp": o_cmp, "slc": o_slc, "win": o_win, "gates": g, "indices": idx, "counts": counts,
                     "scores": scores, "ck": ck, "cv": cv}
    return out


# ----------------------------------------------------------------------------------------------
# The model: Llama layers with NSA attention (full-sequence forward, for training and as the
# decode reference).

def _mlp(lp, x, config):
    h = rms_norm(x, lp["mlp_norm"], config.norm_eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def nsa_layer(lp: Params, nlp: Optional[Params], x: jax.Array, config: ModelConfig, cfg: NSAConfig,
              select_fn: Optional[SelectFn] = None):
    """One pre-norm block over a full sequence at positions 0..t-1 (NSA attention when `nlp` is
    given, dense causal otherwise). -> (x, (k_rot, v, ck, cv)) (ck/cv None for a dense layer)."""
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], config.norm_eps)
    q, k, v = project_qkv(lp, h, config)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_rot, k_rot = apply_rope(q, pos, config), apply_rope(k, pos, config)
    if nlp is None:
        slots = jnp.broadcast_to(pos[:, None], (b, config.n_kv_heads, t))
        out = attend(q_rot, k_rot, v, slots, pos, backend="xla")[0]
        ck = cv = None
    else:
        out, aux = nsa_attention(q_rot, k_rot, k, v, h, nlp, cfg, config, select_fn, return_aux=True)
        ck, cv = aux["ck"], aux["cv"]
    x = x + out.transpose(0, 2, 1, 3).reshape(b, t, -1).astype(x.dtype) @ lp["wo"]
    return _mlp(lp, x, config), (k_rot, v, ck, cv)


def nsa_forward(params: Params, nsa: dict, tokens: jax.Array, config: ModelConfig, cfg: NSAConfig,
                select_fn: Optional[SelectFn] = None, remat: bool = False, return_kv: bool = False):
    """Logits [batch, seq, vocab] float32 of the model with NSA attention in `cfg`'s layers.

    params: the dense model's params pytree (`models.llama`); nsa: {layer: NSA params}
    (`init_nsa_params`); tokens [batch, seq] int at positions 0..seq-1 (no padding).
    remat: recompute each layer in the backward pass (training memory)."""
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, seq] array, got shape {tokens.shape}")
    check_model(config, cfg)
    check_nsa_params(nsa, config, cfg)
    x = params["embed"][tokens]
    fn = lambda lp, nlp, x: nsa_layer(lp, nlp, x, config, cfg, select_fn)
    if remat:
        fn = jax.checkpoint(fn)
    layers = layer_params(params)
    nsa_layers = [nsa.get(i, nsa.get(str(i))) for i in range(len(layers))]
    if all(n is not None for n in nsa_layers):     # every layer NSA: one scanned layer (compile time flat)
        stack = lambda *xs: jnp.stack(xs)

        def body(x, lps):
            return fn(*lps, x)
        x, kv = jax.lax.scan(body, x, (jax.tree_util.tree_map(stack, *layers),
                                       jax.tree_util.tree_map(stack, *nsa_layers)))
        kvs = [jax.tree_util.tree_map(lambda a: a[i], kv) for i in range(len(layers))]
    else:
        kvs = []
        for lp, nlp in zip(layers, nsa_layers):
            x, kv = fn(lp, nlp, x)
            kvs.append(kv)
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = (x @ head).astype(jnp.float32)
    return (logits, kvs) if return_kv else logits


# ----------------------------------------------------------------------------------------------
# Flax NNX: the NSA parameters as modules next to a `models.nnx_llama.Llama`.

class NSAAttention(nnx.Module):
    """One layer's NSA parameters (compressor, position embedding, gates) as `nnx.Param`s."""

    def __init__(self, config: ModelConfig, cfg: NSAConfig, *, rngs: nnx.Rngs, noise: float = 0.0,
                 param_dtype=jnp.float32):
        p = init_nsa_layer(config, cfg, rngs.params(), noise, param_dtype)
        self.names = tuple(p)
        for name, a in p.items():
            setattr(self, name, nnx.Param(a))

    def params(self) -> Params:
        return {n: getattr(self, n).get_value() for n in self.names}


class NSALlama(nnx.Module):
    """A pretrained `models.nnx_llama.Llama` (`base`, q/k/v/o reused) with NSA attention in the
    layers `cfg.layers`; `__call__(tokens) -> logits [batch, seq, vocab]` (`nsa_forward`)."""

    def __init__(self, base, cfg: NSAConfig, *, rngs: nnx.Rngs, noise: float = 0.0):
        check_model(base.config, cfg)
        self.base = base
        self.cfg = cfg
        self.layer_ids = cfg.nsa_layers(base.config.n_layers)
        mods = [NSAAttention(base.config, cfg, rngs=rngs, noise=noise) for _ in self.layer_ids]
        self.nsa = getattr(nnx, "List", list)(mods)

    def nsa_params(self) -> dict[int, Params]:
        return {i: m.params() for i, m in zip(self.layer_ids, self.nsa)}

    def __call__(self, tokens: jax.Array, select_fn: Optional[SelectFn] = None) -> jax.Array:
        from models.nnx_llama import cast, params_of
        params = params_of(self.base)
        if self.base.dtype is not None:
            params = cast(params, self.base.dtype)
        return nsa_forward(params, self.nsa_params(), tokens, self.base.config, self.cfg, select_fn)


nsa_forward_jit = jax.jit(nsa_forward, static_argnames=("config", "cfg", "select_fn", "remat", "return_kv"))
nsa_forward_jit.__doc__ = """`nsa_forward` compiled once per (shapes, config, cfg, select_fn, remat, return_kv)."""
