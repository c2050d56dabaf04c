"""NSA decode: a cache of raw K/V plus compressed keys/values, one token per step.

    cache, logits = nsa_prefill(params, nsa, tokens, config, cfg, capacity)
    logits, cache = nsa_decode_step(params, nsa, cache, token, config, cfg)
    tokens = nsa_generate(params, nsa, prompts, config, cfg, max_new_tokens=32)   # greedy

Per NSA layer the cache holds the RoPE'd keys and the values of every token ([batch, kv_heads,
capacity, D]) and the compressed keys (RoPE'd at i*d) / values of the complete compression
blocks ([batch, kv_heads, n_compressed(capacity), D]). A decode step at position t writes its
key/value at slot t and, when t + 1 - l >= 0 is a multiple of d, the compressed block
i = (t + 1 - l) / d from the last l keys (un-rotated back to pre-RoPE, then `models.nsa.compress`).
The new query then attends to

- the visible compressed blocks (XLA: n_compressed(capacity) keys, a few % of the context),
- its top-n selection blocks of l' tokens (`pallas_kernels.sparse_decode` in page mode,
  page = l', lengths = t + 1: the Pallas kernel on gpu/tpu, its jnp reference on cpu),
- the window [t - w + 1, t] (`pallas_kernels.dense_decode` with starts/lengths),

gated as in `models.nsa.nsa_attention`, so step t's logits equal the full forward's (`nsa_forward`)
at position t. Dense (non-NSA) layers attend [0, t] with `dense_decode`. All rows of a batch hold
the same number of tokens (no left padding: prompts of one batch have one length).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from kvjax.attention import check_backend, decode_impl, dense_kernel_ok
from models.config import ModelConfig
from models.llama import layer_params, project_qkv, rms_norm
from models.nsa import (NSAConfig, _mlp, block_importance, check_model, check_nsa_params, compress,
                        compressed_visible, gates, masked_attention, nsa_forward_jit, select_blocks)
from models.rope import apply_rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NSACache:
    """keys/values: per layer [batch, kv_heads, capacity, D]; ck/cv: per layer [batch, kv_heads,
    n_compressed(capacity), D] (0 rows for a dense layer); length: tokens held (scalar int32)."""

    keys: tuple
    values: tuple
    ck: tuple
    cv: tuple
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def _impl(kernel: str, backend: str, head_dim: int, dtype):
    sel = decode_impl(kernel, backend)
    if sel is None or not dense_kernel_ok(head_dim, dtype, sel[0]):
        return dict(impl="reference")
    return dict(impl=sel[0], interpret=sel[1])


def nsa_prefill(params, nsa: dict, tokens: jax.Array, config: ModelConfig, cfg: NSAConfig, capacity: int):
    """Full-sequence NSA forward over the prompt [batch, T] (positions 0..T-1), keeping its K/V and
    compressed K/V in a cache of `capacity` slots. -> (cache, logits [batch, T, vocab])."""
    b, t = tokens.shape
    if capacity < t:
        raise ValueError(f"capacity {capacity} is smaller than the prompt ({t} tokens)")
    logits, kvs = nsa_forward_jit(params, nsa, tokens, config, cfg, return_kv=True)
    nc = cfg.n_compressed(capacity)
    keys, values, cks, cvs = [], [], [], []
    for i, (k, v, ck, cv) in enumerate(kvs):
        pad = ((0, 0), (0, 0), (0, capacity - t), (0, 0))
        keys.append(jnp.pad(k, pad))
        values.append(jnp.pad(v, pad))
        rows = nc if ck is not None else 0
        shape = (b, config.n_kv_heads, rows, config.head_dim)
        if ck is None:
            cks.append(jnp.zeros(shape, k.dtype))
            cvs.append(jnp.zeros(shape, v.dtype))
        else:
            cks.append(jnp.zeros(shape, k.dtype).at[:, :, :ck.shape[2]].set(ck))
            cvs.append(jnp.zeros(shape, v.dtype).at[:, :, :cv.shape[2]].set(cv))
    cache = NSACache(tuple(keys), tuple(values), tuple(cks), tuple(cvs), jnp.asarray(t, jnp.int32))
    return cache, logits


def update_compressed(keys, values, ck, cv, nlp, t, cfg: NSAConfig, config: ModelConfig):
    """Write compressed block i = (t + 1 - l) / d of each row when the token at position t (int or
    [batch]; keys/values [batch, kv_heads, capacity, D] hold token p at slot p) completes it.
    -> (ck, cv) [batch, kv_heads, n_compressed, D]."""
    l, d = cfg.kernel_size, cfg.kernel_stride
    b, h, _, hd = keys.shape
    if ck.shape[2] == 0:                                     # capacity < l: no block ever completes
        return ck, cv
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))

    def row(keys, values, ck, cv, t):                        # one row: [kv_heads, ..., D], t scalar
        e = t + 1
        done = (e >= l) & ((e - l) % d == 0)
        start = jnp.maximum(e - l, 0)
        kb = jax.lax.dynamic_slice(keys, (0, start, 0), (h, l, hd))[None]
        vb = jax.lax.dynamic_slice(values, (0, start, 0), (h, l, hd))[None]
        k_pre = apply_rope(kb, -(start + jnp.arange(l, dtype=jnp.int32))[None], config)   # the inverse rotation
        i = jnp.clip((e - l) // d, 0, ck.shape[1] - 1)
        new_k = apply_rope(compress(k_pre, nlp["cmp_wk"], nlp["cmp_pe"], cfg),
                           jnp.reshape(i * d, (1, 1)).astype(jnp.int32), config)[0]
        new_v = compress(vb, nlp["cmp_wv"], None, cfg)[0]
        old_k = jax.lax.dynamic_slice(ck, (0, i, 0), (h, 1, hd))
        old_v = jax.lax.dynamic_slice(cv, (0, i, 0), (h, 1, hd))
        ck = jax.lax.dynamic_update_slice(ck, jnp.where(done, new_k, old_k).astype(ck.dtype), (0, i, 0))
        cv = jax.lax.dynamic_update_slice(cv, jnp.where(done, new_v, old_v).astype(cv.dtype), (0, i, 0))
        return ck, cv

    return jax.vmap(row)(keys, values, ck, cv, t)


def decode_attention(q, h, keys, values, ck, cv, nlp, t, cfg: NSAConfig, config: ModelConfig, backend: str):
    """q [b, hq, 1, D] at position t (int or [b]; keys/values hold token p at slot p, h the normed
    layer input [b, 1, d_model]) -> [b, hq, 1, D] float32 (the three gated branches)."""
    b, hq, _, hd = q.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    scale = hd ** -0.5
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
    qpos = t[:, None]
    vis = compressed_visible(qpos, ck.shape[2], cfg)[:, None]              # [b, 1, 1, n_cmp]
    o_cmp, p_cmp = masked_attention(q, ck, cv, vis, scale)
    scores = block_importance(p_cmp, cfg.n_selection_blocks(cap), cfg)     # [b, hkv, 1, nb]
    idx, counts = select_blocks(scores, qpos, cfg)
    lengths = jnp.broadcast_to(qpos + 1, (b, hkv))
    kw = _impl("sparse_decode", backend, hd, keys.dtype)
    o_slc = pallas_kernels.sparse_decode(q[:, :, 0], keys, values, jnp.maximum(idx[:, :, 0], 0), counts[:, :, 0],
                                         lengths, scale=scale, page_size=cfg.block_size, **kw)
    starts = jnp.maximum(lengths - cfg.window, 0)
    kw = _impl("dense_decode", backend, hd, keys.dtype)
    o_win = pallas_kernels.dense_decode(q[:, :, 0], keys, values, lengths, starts, scale=scale, **kw)
    g = gates(h, nlp, cfg, hq)
    return (g[0] * o_cmp + g[1] * o_slc[:, :, None].astype(jnp.float32)
            + g[2] * o_win[:, :, None].astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "cfg", "backend"), donate_argnames=("cache",))
def nsa_decode_step(params, nsa: dict, cache: NSACache, token: jax.Array, config: ModelConfig, cfg: NSAConfig,
                    backend: str = "auto"):
    """One token [batch] at position cache.length -> (logits [batch, vocab] float32, cache)."""
    check_backend(backend)
    t = cache.length
    b = token.shape[0]
    pos = jnp.broadcast_to(t, (b, 1)).astype(jnp.int32)
    x = params["embed"][token[:, None]]
    keys, values, cks, cvs = [], [], [], []
    for i, lp in enumerate(layer_params(params)):
        nlp = nsa.get(i, nsa.get(str(i)))
        h = rms_norm(x, lp["attn_norm"], config.norm_eps)
        q, k, v = project_qkv(lp, h, config)
        q_rot, k_rot = apply_rope(q, pos, config), apply_rope(k, pos, config)
        kc = jax.lax.dynamic_update_slice(cache.keys[i], k_rot.astype(cache.keys[i].dtype), (0, 0, t, 0))
        vc = jax.lax.dynamic_update_slice(cache.values[i], v.astype(cache.values[i].dtype), (0, 0, t, 0))
        ck, cv = cache.ck[i], cache.cv[i]
        if nlp is None:
            lengths = jnp.full(kc.shape[:2], t + 1, jnp.int32)
            out = pallas_kernels.dense_decode(q_rot[:, :, 0], kc, vc, lengths,
                                              **_impl("dense_decode", backend, config.head_dim, kc.dtype))[:, :, None]
        else:
            ck, cv = update_compressed(kc, vc, ck, cv, nlp, t, cfg, config)
            out = decode_attention(q_rot, h, kc, vc, ck, cv, nlp, t, cfg, config, backend)
        keys.append(kc)
        values.append(vc)
        cks.append(ck)
        cvs.append(cv)
        x = x + out.transpose(0, 2, 1, 3).reshape(b, 1, -1).astype(x.dtype) @ lp["wo"]
        x = _mlp(lp, x, config)
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = (x[:, 0] @ head).astype(jnp.float32)
    return logits, NSACache(tuple(keys), tuple(values), tuple(cks), tuple(cvs), t + 1)


def nsa_generate(params, nsa: dict, prompts, config: ModelConfig, cfg: NSAConfig, max_new_tokens: int = 32,
                 backend: str = "auto", capacity: Optional[int] = None) -> list[list[int]]:
    """Greedy generation with NSA attention; prompts: equal-length token lists (one batch)."""
    check_model(config, cfg)
    check_nsa_params({int(i): lp for i, lp in nsa.items()}, config, cfg)
    if not prompts or len({len(p) for p in prompts}) != 1 or len(prompts[0]) == 0:
        raise ValueError("nsa_generate takes non-empty prompts of one length (no padding)")
    tokens = jnp.asarray(prompts, jnp.int32)
    cap = capacity or tokens.shape[1] + max_new_tokens
    cache, logits = nsa_prefill(params, nsa, tokens, config, cfg, cap)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = [tok]
    for _ in range(max_new_tokens - 1):
        if int(cache.length) >= cap:
            raise ValueError(f"cache capacity {cap} is full")
        logits, cache = nsa_decode_step(params, nsa, cache, tok, config, cfg, backend)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(tok)
    return jnp.stack(out, 1).tolist()
