"""QJL: 1-bit quantized Johnson-Lindenstrauss sketch of the keys, with an asymmetric estimator.

Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero
Overhead", arXiv 2406.03482 (code: amirzandieh/QJL). Spec: quantization_and_sparse_attention.md §3.

Keys (post-RoPE) are kept in a full-precision buffer of `buffer` (128) tokens; when it is full the
block is sketched in groups of `group` (32) tokens:
  * per group, the `outlier_count` (8) channels with the largest L2 norm over the group's tokens
    are the outlier channels (uint8 indices per group);
  * per token: k_in = k with the outlier channels zeroed, k_out = k on them only;
    sign(k_in^T S) (m bits) and sign(k_out^T S[:, :m_out]) (m_out bits), packed 1 bit each
    (`kvjax.quant.packing`, planar), and the fp16 norms ||k||, ||k_out||
    (||k_in|| = sqrt(||k||^2 - ||k_out||^2)).
S in R^{d x m} is iid N(0, 1) with every d x d column block replaced by QR(block).Q * sqrt(d)
(orthogonalised JL, the code's `rot=True`), drawn per layer from `seed`.

Scores use the asymmetric estimator (the query is projected, never quantized):
  <q, k> ~ sqrt(pi/2)/m * ||k_in|| * sum_j sign_j(k_in) (S^T q - S_out^T q_out)_j
         + sqrt(pi/2)/m_out * ||k_out|| * sum_{j<m_out} sign_j(k_out) (S_out^T q_out)_j
with S_out = S restricted to the outlier rows. The XLA reference path evaluates it in the
equivalent form q . k_eff with
  k_eff = sqrt(pi/2)/m ||k_in|| (1 - mask) * (S s) + sqrt(pi/2)/m_out ||k_out|| mask * (S[:, :m_out] s_out)
(linear in q, so it is the same number), then calls `kvjax.attention.attend`.
Values are quantized with KIVI's per-token quantizer (2 bits, G = 32, a window of 128 fp tokens).

Not implemented: the paper's larger sketch for the first 15 layers (m = 512, m_out = 128): the
stacked-over-layers cache needs one shape for every layer, so m is uniform (configurable).

Layout (leading `layers` axis in the stacked cache; C = capacity rounded up to `group`):
    k_sign [b, h, C, m/8] uint8, k_out_sign [b, h, C, m_out/8] uint8, k_norm, k_out_norm [b, h, C] f16
    k_out_idx [b, h, C/group, outlier_count] uint8, k_resid [b, h, buffer, d] (fp tail, 0..buffer-1)
    v_codes, v_scale, v_min, v_resid as kvjax.quant.kivi; k_len, v_len, lengths, pos_offset [b, h] int32
    sketch [d, m] float32 per layer (a constant regenerated from the seed: not counted in memory_bytes)
Accounting per token per kv-head: m/8 + m_out/8 + 4 + outlier_count/group bytes of keys
(d = 128 defaults: 68.25 B, 4.27 bit/coordinate) -- `key_bits_per_coordinate` reports it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from kvjax.attention import _planar_sketch_columns, attend, attend_logits, decode_impl, is_decode_step, qjl_kernel_ok
from kvjax.cache import tree_bytes
from kvjax.observation import Observe
from kvjax.quant import packing
from kvjax.quant.kivi import (NO_POSITION, _scatter_rows, flush_blocks, merge_resid, slide_window,
                              slot_positions, update_pos_offset)

SQRT_HALF_PI = math.sqrt(math.pi / 2)


@dataclasses.dataclass(frozen=True)
class QJLConfig:
    """Defaults from the official code: m = 256 (`key_quantization_bits`), m_out = 256
    (`dim_outlier` of general layers), 8 outlier channels per 32-token group, buffer 128,
    values KIVI 2-bit with G = 32 and a 128-token window."""

    sketch_dim: int = 256
    outlier_sketch_dim: int = 256
    outlier_count: int = 8
    group: int = 32
    buffer: int = 128
    value_bits: int = 2
    value_group: int = 32
    value_residual: int = 128
    seed: int = 0

    def validate(self, head_dim: int) -> None:
        if self.sketch_dim <= 0 or self.sketch_dim % head_dim:
            raise ValueError(f"sketch_dim {self.sketch_dim} must be a positive multiple of head_dim={head_dim} "
                             "(orthogonalised d x d blocks)")
        if not 0 < self.outlier_sketch_dim <= self.sketch_dim or self.outlier_sketch_dim % 8:
            raise ValueError(f"outlier_sketch_dim {self.outlier_sketch_dim} must be a multiple of 8 in (0, sketch_dim]")
        if self.sketch_dim % 8:
            raise ValueError(f"sketch_dim {self.sketch_dim} must be a multiple of 8 (bit packing)")
        if not 0 < self.outlier_count < head_dim or head_dim > 255:
            raise ValueError(f"outlier_count {self.outlier_count} must be in (0, head_dim={head_dim}), head_dim <= 255")
        if self.group <= 0 or self.buffer <= 0 or self.buffer % self.group:
            raise ValueError(f"buffer {self.buffer} must be a positive multiple of group {self.group}")
        if self.value_bits not in (2, 4, 8) or head_dim % self.value_group:
            raise ValueError(f"value quantizer: bits {self.value_bits} in (2, 4, 8), group {self.value_group} "
                             f"dividing head_dim={head_dim}")
        if self.value_residual <= 0:
            raise ValueError(f"value_residual must be positive, got {self.value_residual}")


def key_bytes_per_token(head_dim: int, cfg: QJLConfig) -> float:
    return cfg.sketch_dim / 8 + cfg.outlier_sketch_dim / 8 + 4 + cfg.outlier_count / cfg.group


def key_bits_per_coordinate(head_dim: int, cfg: QJLConfig) -> float:
    """True bits per key coordinate (signs + norms + per-group outlier indices)."""
    return key_bytes_per_token(head_dim, cfg) * 8 / head_dim


def make_sketch(key: jax.Array, head_dim: int, m: int) -> jax.Array:
    """`[d, m]` Gaussian JL matrix with each d x d block orthogonalised (Q of QR times sqrt(d))."""
    g = jax.random.normal(key, (m // head_dim, head_dim, head_dim), jnp.float32)
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]   # unique QR (Haar-distributed Q)
    return (q * math.sqrt(head_dim)).transpose(1, 0, 2).reshape(head_dim, m)


# ----------------------------------------------------------------------------- pure quantizer

def outlier_channels(keys: jax.Array, group: int, count: int) -> jax.Array:
    """keys `[..., T, d]` -> uint8 `[..., T/group, count]`: channels of largest L2 norm per group."""
    *lead, t, d = keys.shape
    kg = keys.astype(jnp.float32).reshape(*lead, t // group, group, d)
    norms = jnp.sum(kg * kg, axis=-2)
    return jax.lax.top_k(norms, count)[1].astype(jnp.uint8)


def quantize_keys(keys: jax.Array, sketch: jax.Array, cfg: QJLConfig):
    """keys `[..., T, d]` (T % group == 0), sketch `[d, m]` ->
    (sign [..., T, m/8], out_sign [..., T, m_out/8], norm, out_norm [..., T] f16, out_idx [..., T/G, count])."""
    packing.check_finite("keys", keys)
    *lead, t, d = keys.shape
    x = keys.astype(jnp.float32)
    idx = outlier_channels(x, cfg.group, cfg.outlier_count)
    mask = jnp.any(idx[..., None].astype(jnp.int32) == jnp.arange(d), axis=-2)        # [..., T/G, d]
    mask = jnp.repeat(mask, cfg.group, axis=-2)                                       # [..., T, d]
    k_out = jnp.where(mask, x, 0.0)
    k_in = x - k_out
    s_in = (k_in @ sketch) >= 0
    s_out = (k_out @ sketch[:, : cfg.outlier_sketch_dim]) >= 0
    return (packing.pack(s_in.astype(jnp.uint8), 1), packing.pack(s_out.astype(jnp.uint8), 1),
            jnp.linalg.norm(x, axis=-1).astype(jnp.float16), jnp.linalg.norm(k_out, axis=-1).astype(jnp.float16),
            idx)


def effective_keys(sign, out_sign, norm, out_norm, out_idx, sketch, cfg: QJLConfig) -> jax.Array:
    """`[..., T, d]` keys whose dot product with any q equals the QJL estimator of <q, k>."""
    d, m = sketch.shape
    s = packing.unpack(sign, 1).astype(jnp.float32) * 2 - 1                          # [..., T, m]
    so = packing.unpack(out_sign, 1).astype(jnp.float32) * 2 - 1                      # [..., T, m_out]
    mask = jnp.any(out_idx[..., None].astype(jnp.int32) == jnp.arange(d), axis=-2)
    mask = jnp.repeat(mask, cfg.group, axis=-2).astype(jnp.float32)
    n, no = norm.astype(jnp.float32), out_norm.astype(jnp.float32)
    n_in = jnp.sqrt(jnp.maximum(n * n - no * no, 0.0))
    k_in = (SQRT_HALF_PI / m) * n_in[..., None] * (s @ sketch.T)
    k_out = (SQRT_HALF_PI / cfg.outlier_sketch_dim) * no[..., None] * (so @ sketch[:, : so.shape[-1]].T)
    return (1 - mask) * k_in + mask * k_out


# ----------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class QJLCache:
    k_sign: jax.Array
    k_out_sign: jax.Array
    k_norm: jax.Array
    k_out_norm: jax.Array
    k_out_idx: jax.Array
    k_resid: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    v_resid: jax.Array
    sketch: jax.Array
    k_len: jax.Array
    v_len: jax.Array
    lengths: jax.Array
    pos_offset: jax.Array
    cfg: QJLConfig = QJLConfig()

    @property
    def capacity(self) -> int:
        return self.k_sign.shape[-2]

    @property
    def positions(self) -> jax.Array:
        return slot_positions(self.lengths, self.pos_offset, self.capacity)

    def memory_bytes(self) -> int:
        """Every array except the sketch (a per-layer constant regenerated from the seed)."""
        return tree_bytes(self) - tree_bytes(self.sketch)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "QJLCache":
        return append(self, keys, values, positions)

    def resize(self, capacity: int) -> "QJLCache":
        return resize(self, capacity)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        kernel_out = attend_qjl(self, q, query_positions, observe, backend)   # decode step on GPU/TPU
        if kernel_out is not None:
            return kernel_out
        k, v = dequantize(self)
        return attend(q, k, v, self.positions, query_positions, observe=observe, backend=backend)


def attend_qjl(layer, q: jax.Array, query_positions: jax.Array, observe: Observe, backend: str = "auto"):
    """Decode step over one layer of a `kvjax.quant.qjl.QJLCache` with the sketched keys' scores
    from the Pallas QJL kernel (the fp key buffer, softmax and the 2-bit values stay in XLA), or
    None when the XLA path must run (not a decode step, no kernel, or the config outside its
    constraints)."""
    if not is_decode_step(q, observe):
        return None
    sel = decode_impl("qjl_scores", backend)
    cfg = layer.cfg
    if sel is None or not qjl_kernel_ok(cfg, sel[0]):
        return None
    impl, interpret = sel
    b, hq, _, d = q.shape
    hkv = layer.lengths.shape[1]
    g = hq // hkv
    sketch = layer.sketch[:, _planar_sketch_columns(cfg.sketch_dim)]
    scores = pallas_kernels.qjl_scores(
        q[:, :, 0], layer.k_sign, layer.k_out_sign, layer.k_norm, layer.k_out_norm,
        layer.k_out_idx.astype(jnp.int32), sketch, layer.k_len, group_size=cfg.group, impl=impl,
        interpret=interpret).reshape(b, hkv, g, -1)                          # [b, hkv, g, C]
    cap = scores.shape[-1]
    qg = q[:, :, 0].reshape(b, hkv, g, d).astype(jnp.float32)
    tail = jnp.einsum("bhgd,bhrd->bhgr", qg, layer.k_resid.astype(jnp.float32))  # fp key buffer
    t = jnp.arange(cap, dtype=jnp.int32)
    ridx = jnp.clip(t - layer.k_len[..., None], 0, layer.k_resid.shape[2] - 1)   # [b, hkv, C]
    tail = jnp.take_along_axis(tail, jnp.broadcast_to(ridx[:, :, None], (b, hkv, g, cap)), axis=-1)
    logits = jnp.where(t < layer.k_len[:, :, None, None], scores, tail) * d ** -0.5
    return attend_logits(logits[:, :, :, None], dequantize_values(layer), layer.positions,
                         query_positions, q.dtype, observe)


jax.tree_util.register_dataclass(
    QJLCache,
    data_fields=["k_sign", "k_out_sign", "k_norm", "k_out_norm", "k_out_idx", "k_resid", "v_codes", "v_scale",
                 "v_min", "v_resid", "sketch", "k_len", "v_len", "lengths", "pos_offset"],
    meta_fields=["cfg"])


def init_qjl_cache(config, batch: int, capacity: int, qjl: QJLConfig = QJLConfig(), dtype=jnp.float32) -> QJLCache:
    """Empty QJL cache for a ModelConfig (capacity rounded up to a multiple of the group)."""
    return init_qjl_cache_from(qjl, config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim, dtype)


def init_qjl_cache_from(cfg: QJLConfig, n_layers, batch, kv_heads, capacity, head_dim, dtype=jnp.float32) -> QJLCache:
    cfg.validate(head_dim)
    if min(n_layers, batch, kv_heads, capacity) <= 0:
        raise ValueError(f"cache dimensions must be positive, got {n_layers, batch, kv_heads, capacity}")
    g = math.lcm(cfg.group, cfg.value_group)
    c = -(-capacity // g) * g
    lead = (n_layers, batch, kv_heads)
    z = lambda *s, dt: jnp.zeros(lead + s, dt)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), n_layers)
    sketch = jax.vmap(lambda k: make_sketch(k, head_dim, cfg.sketch_dim))(keys)
    return QJLCache(
        k_sign=z(c, cfg.sketch_dim // 8, dt=jnp.uint8), k_out_sign=z(c, cfg.outlier_sketch_dim // 8, dt=jnp.uint8),
        k_norm=z(c, dt=jnp.float16), k_out_norm=z(c, dt=jnp.float16),
        k_out_idx=z(c // cfg.group, cfg.outlier_count, dt=jnp.uint8), k_resid=z(cfg.buffer, head_dim, dt=dtype),
        v_codes=z(c, packing.packed_size(head_dim, cfg.value_bits), dt=jnp.uint8),
        v_scale=z(c, head_dim // cfg.value_group, dt=jnp.float16), v_min=z(c, head_dim // cfg.value_group, dt=jnp.float16),
        v_resid=z(cfg.value_residual, head_dim, dt=dtype), sketch=sketch,
        k_len=z(dt=jnp.int32), v_len=z(dt=jnp.int32), lengths=z(dt=jnp.int32),
        pos_offset=jnp.full(lead, NO_POSITION, jnp.int32), cfg=cfg)


def append(layer: QJLCache, keys, values, positions) -> QJLCache:
    """keys (post-RoPE), values `[b, h, new, d]` of one layer."""
    if keys.shape != values.shape or keys.ndim != 4 or keys.shape[:2] != layer.lengths.shape:
        raise ValueError(f"keys {keys.shape} / values {values.shape} must be [batch, kv_heads, new, d] "
                         f"matching the cache {layer.lengths.shape}")
    packing.check_finite("append keys/values", keys, values)
    return _append(layer, keys, values, positions)


@jax.jit
def _append(layer: QJLCache, keys, values, positions) -> QJLCache:
    cfg = layer.cfg
    sketch = layer.sketch

    def row(ks, kos, kn, kon, kid, kr, vc, vs, vm, vr, klen, vlen, length, knew, vnew):
        blocks, n_flush, tail, _ = flush_blocks(kr, length - klen, knew, cfg.buffer)
        s, so, n, no, idx = quantize_keys(blocks, sketch, cfg)
        ks = _scatter_rows(ks, s, klen, n_flush)
        kos = _scatter_rows(kos, so, klen, n_flush)
        kn = _scatter_rows(kn, n, klen, n_flush)
        kon = _scatter_rows(kon, no, klen, n_flush)
        kid = _scatter_rows(kid, idx, klen // cfg.group, n_flush // cfg.group)
        leaving, n_out, win, _ = slide_window(vr, length - vlen, vnew, cfg.value_residual)
        codes, scale, mn = packing.quantize(leaving, cfg.value_bits, cfg.value_group, axis=-1)
        vc = _scatter_rows(vc, packing.pack(codes, cfg.value_bits), vlen, n_out)
        vs = _scatter_rows(vs, scale, vlen, n_out)
        vm = _scatter_rows(vm, mn, vlen, n_out)
        return ks, kos, kn, kon, kid, tail.astype(kr.dtype), vc, vs, vm, win.astype(vr.dtype), klen + n_flush, vlen + n_out

    out = jax.vmap(jax.vmap(row))(layer.k_sign, layer.k_out_sign, layer.k_norm, layer.k_out_norm, layer.k_out_idx,
                                  layer.k_resid, layer.v_codes, layer.v_scale, layer.v_min, layer.v_resid,
                                  layer.k_len, layer.v_len, layer.lengths, keys, values)
    ks, kos, kn, kon, kid, kr, vc, vs, vm, vr, klen, vlen = out
    return dataclasses.replace(
        layer, k_sign=ks, k_out_sign=kos, k_norm=kn, k_out_norm=kon, k_out_idx=kid, k_resid=kr, v_codes=vc,
        v_scale=vs, v_min=vm, v_resid=vr, k_len=klen.astype(jnp.int32), v_len=vlen.astype(jnp.int32),
        lengths=layer.lengths + keys.shape[-2], pos_offset=update_pos_offset(layer.pos_offset, layer.lengths, positions))


def dequantize_values(layer: QJLCache) -> jax.Array:
    """Dequantized values `[b, h, C, d]` (quantized slots, then the fp window)."""
    cfg = layer.cfg
    vq = packing.dequantize(packing.unpack(layer.v_codes, cfg.value_bits), layer.v_scale, layer.v_min,
                            cfg.value_group, axis=-1)
    return merge_resid(vq, layer.v_resid, layer.v_len)


def dequantize(layer: QJLCache) -> tuple[jax.Array, jax.Array]:
    """Effective keys (estimator form, exact for the fp buffer) and dequantized values `[b, h, C, d]`."""
    k_eff = effective_keys(layer.k_sign, layer.k_out_sign, layer.k_norm, layer.k_out_norm, layer.k_out_idx,
                           layer.sketch, layer.cfg)
    return merge_resid(k_eff, layer.k_resid, layer.k_len), dequantize_values(layer)


def resize(cache: QJLCache, capacity: int) -> QJLCache:
    """Same contents, new capacity (rounded up to the groups); shrinking below the longest row is an error."""
    cfg = cache.cfg
    g = math.lcm(cfg.group, cfg.value_group)
    c = -(-capacity // g) * g
    longest = int(jnp.max(cache.lengths))
    if c < longest:
        raise ValueError(f"cannot shrink QJL cache to {c} slots: a head holds {longest} tokens")

    def fit(x, axis, n):
        axis = axis % x.ndim
        cur = x.shape[axis]
        if n <= cur:
            return jax.lax.slice_in_dim(x, 0, n, axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n - cur)
        return jnp.pad(x, widths)

    return dataclasses.replace(
        cache, k_sign=fit(cache.k_sign, -2, c), k_out_sign=fit(cache.k_out_sign, -2, c),
        k_norm=fit(cache.k_norm, -1, c), k_out_norm=fit(cache.k_out_norm, -1, c),
        k_out_idx=fit(cache.k_out_idx, -2, c // cfg.group), v_codes=fit(cache.v_codes, -2, c),
        v_scale=fit(cache.v_scale, -2, c), v_min=fit(cache.v_min, -2, c))


def from_dense(dense, cfg: QJLConfig = QJLConfig(), capacity: Optional[int] = None) -> QJLCache:
    """Quantize a filled dense KVCache after a full-precision prefill (QJL's own prefill rule:
    whole buffer blocks are sketched, the rest stays in the fp buffer)."""
    from kvjax.quant.kivi import append_dense
    n_layers, batch, heads, cap, d = dense.keys.shape
    cache = init_qjl_cache_from(cfg, n_layers, batch, heads, cap if capacity is None else capacity, d,
                                dense.keys.dtype)
    return append_dense(cache, dense)
