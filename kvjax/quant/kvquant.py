"""KVQuant: non-uniform, pre-RoPE, dense-and-sparse KV-cache quantization.

Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization", NeurIPS 2024, arXiv 2401.18079 (code: SqueezeAILab/KVQuant).
Spec: shared/methods/quantization_and_sparse_attention.md §2.

What is implemented (per layer, per kv-head):
  * **Keys: per channel, pre-RoPE, static thresholds.** Calibration gives for every channel c the
    lower/upper percentiles (1 - t, t), t = 1 - (1 - s)/2 with s = 0.99 ("nuq-1%"), hence
    offset_c = (upper + lower)/2, range_c = (upper - lower)/2. A key is normalised
    u_c = (k_c - offset_c)/range_c and each u_c is rounded to the nearest entry of the layer's
    2^b-entry non-uniform LUT (code = argmin |u - lut|). RoPE is applied **after** dequantisation,
    at `attend` (the `rope` argument), with each slot's position.
  * **Values: per token, dynamic thresholds.** For each token-head the n_side largest and n_side
    smallest entries are the outliers; the remaining entries give lower/upper (min/max), stored
    as fp16 offset/range per token-head; the normalised values are rounded to the layer's value LUT.
  * **Dense-and-sparse.** A fixed number of outliers per token-head (n_side above + n_side below,
    n_side = max(1, ceil((1 - s)/2 * d)); KVQuant's streaming kernel likewise fixes the count per
    token, `cap_outliers`) is kept exactly as (fp16 value, uint8 channel) pairs and overwrites the
    dense reconstruction. For keys an entry is an outlier only if it is outside [lower_c, upper_c]
    (the n_side largest excesses are kept; more are clamped to the LUT end); for values the n_side
    extreme entries per side always are (their thresholds are defined by them).
    At d = 64 (SmolLM2) this is 2/64 = 3.1 % of the entries at most (1 % of 64 is < 1 per side).
  * **NUQ datatype.** One LUT per layer for keys and one for values, fit by 1-D k-means (Lloyd,
    max_iter = 50, quantile initialisation) on the normalised non-outlier calibration values.
    The paper weights k-means with Fisher information; here the weights are uniform (no gradients
    of the frozen model are taken) -- an approximation, documented.
  * **Attention sink.** Tokens at positions < `sink` (default 5, the README's `--first_few_fp16`)
    are kept in full precision (pre-RoPE keys and values in the cache dtype).
  Not implemented: Q-Norm (used by the paper for 2-bit), the fused RoPE/LUT kernel (the XLA path
  dequantises, rotates and calls `kvjax.attention.attend`).

Layout (leading `layers` axis in the stacked cache; C = capacity, n = 2 * n_side):
    k_codes [b, h, C, d*bits/8] uint8 (packed along d, `kvjax.quant.packing`; 3-bit = 2+1 planes)
    k_out_val [b, h, C, n] float16, k_out_idx [b, h, C, n] uint8 (channel; d when unused)
    v_codes [b, h, C, d*bits/8] uint8, v_offset, v_range [b, h, C] float16, v_out_val, v_out_idx
    sink_k, sink_v [b, h, sink, d] cache dtype (pre-RoPE keys of positions 0..sink-1)
    k_offset, k_range [h, d] float32, k_lut, v_lut [2^bits] float32 (calibration, per layer)
    lengths, pos_offset [b, h] int32 (slot t holds position t + pos_offset, as in kvjax.quant.kivi)

Calibration: `calibrate(params, config, token_ids)` runs the model on real text and returns the
per-layer thresholds and LUTs (numpy); `python -m kvjax.quant.kvquant calibrate --out PATH`
does it for SmolLM2 on KJV text and saves an npz (`load_calibration` reads it).

Bad input: bits not in {2, 3, 4} (8 is not a NUQ setting), head_dim > 255 (uint8 outlier indices),
calibration shapes not matching the model, `append` without pre-RoPE keys or `attend` without
`rope` -> ValueError. NaN/inf: as in kvjax.quant.kivi (checked eagerly, not inside jit).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quant import packing
from kvjax.cache import tree_bytes
from kvjax.quant.kivi import NO_POSITION, slot_positions, update_pos_offset

KVQUANT_BITS = (2, 3, 4)


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
    """bits: NUQ width; sparsity: s of "nuq-(1-s)" (0.99 -> 1 % outliers); sink: first positions
    kept in full precision (README example: 5); kmeans_iters: Lloyd iterations (sklearn max_iter=50)."""

    bits: int = 4
    sparsity: float = 0.99
    sink: int = 5
    kmeans_iters: int = 50

    def validate(self, head_dim: int) -> None:
        if self.bits not in KVQUANT_BITS:
            raise ValueError(f"KVQuant bits={self.bits} is not supported: choose one of {KVQUANT_BITS}")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if head_dim > 255:
            raise ValueError(f"head_dim={head_dim} does not fit uint8 outlier indices")
        packing.packed_size(head_dim, self.bits)

    def n_side(self, head_dim: int) -> int:
        """Outliers kept per side (above / below) per token-head."""
        return max(1, math.ceil((1.0 - self.sparsity) / 2.0 * head_dim))


# ----------------------------------------------------------------------------- quantizers (pure)

def _nearest(u: jax.Array, lut: jax.Array) -> jax.Array:
    """Index of the nearest LUT entry for every element of u (ties -> lower index)."""
    return jnp.argmin(jnp.abs(u[..., None] - lut), axis=-1).astype(jnp.uint8)


def _top_side(score: jax.Array, n: int):
    """n largest scores along the last axis -> (score, index)."""
    return jax.lax.top_k(score, n)


def quantize_keys(k_pre: jax.Array, offset: jax.Array, rng: jax.Array, lut: jax.Array, bits: int, n_side: int):
    """Pre-RoPE keys `[b, h, T, d]` with per-channel `offset, rng [h, d]` and `lut [2^bits]`
    -> (codes uint8 [b, h, T, d*bits/8], out_val float16 [b, h, T, 2n], out_idx uint8 [b, h, T, 2n])."""
    packing.check_finite("keys", k_pre)
    d = k_pre.shape[-1]
    x = k_pre.astype(jnp.float32)
    u = (x - offset[:, None, :]) / rng[:, None, :]
    codes = _nearest(u, lut)
    hi_s, hi_i = _top_side(u - 1.0, n_side)           # excess above upper
    lo_s, lo_i = _top_side(-u - 1.0, n_side)          # excess below lower
    idx = jnp.concatenate([hi_i, lo_i], -1)
    used = jnp.concatenate([hi_s, lo_s], -1) > 0
    val = jnp.take_along_axis(x, idx, -1)
    return (packing.pack(codes, bits), jnp.where(used, val, 0).astype(jnp.float16),
            jnp.where(used, idx, d).astype(jnp.uint8))


def quantize_values(v: jax.Array, lut: jax.Array, bits: int, n_side: int):
    """Values `[b, h, T, d]` -> (codes, offset, range float16 [b, h, T], out_val, out_idx).

    The n_side largest and smallest entries of each token are outliers; the rest define
    lower/upper (their min/max)."""
    packing.check_finite("values", v)
    x = v.astype(jnp.float32)
    d = x.shape[-1]
    hi_v, hi_i = _top_side(x, n_side)
    lo_v, lo_i = _top_side(-x, n_side)
    upper = jnp.sort(x, axis=-1)[..., d - 1 - n_side]
    lower = jnp.sort(x, axis=-1)[..., n_side]
    off = ((upper + lower) / 2).astype(jnp.float16)
    rng = ((upper - lower) / 2).astype(jnp.float16)
    o32, r32 = off.astype(jnp.float32)[..., None], rng.astype(jnp.float32)[..., None]
    u = jnp.where(r32 > 0, (x - o32) / jnp.where(r32 > 0, r32, 1.0), 0.0)
    codes = _nearest(u, lut)
    idx = jnp.concatenate([hi_i, lo_i], -1)
    val = jnp.concatenate([hi_v, -lo_v], -1)
    return packing.pack(codes, bits), off, rng, val.astype(jnp.float16), idx.astype(jnp.uint8)


def _apply_outliers(dense: jax.Array, val: jax.Array, idx: jax.Array) -> jax.Array:
    """Overwrite dense[..., idx] with val (idx == d means unused)."""
    d = dense.shape[-1]
    onehot = idx[..., None].astype(jnp.int32) == jnp.arange(d)            # [..., n, d]
    hit = jnp.any(onehot, axis=-2)
    rep = jnp.sum(jnp.where(onehot, val[..., None].astype(jnp.float32), 0.0), axis=-2)
    return jnp.where(hit, rep, dense)


def dequantize_keys(codes, out_val, out_idx, offset, rng, lut, bits: int) -> jax.Array:
    """-> pre-RoPE keys `[b, h, T, d]` float32."""
    c = packing.unpack(codes, bits).astype(jnp.int32)
    dense = lut[c] * rng[:, None, :] + offset[:, None, :]
    return _apply_outliers(dense, out_val, out_idx)


def dequantize_values(codes, off, rng, out_val, out_idx, lut, bits: int) -> jax.Array:
    c = packing.unpack(codes, bits).astype(jnp.int32)
    dense = lut[c] * rng.astype(jnp.float32)[..., None] + off.astype(jnp.float32)[..., None]
    return _apply_outliers(dense, out_val, out_idx)


# ----------------------------------------------------------------------------- calibration

def kmeans_1d(x: np.ndarray, k: int, iters: int = 50, max_samples: int = 200_000, seed: int = 0) -> np.ndarray:
    """Sorted `[k]` centroids of 1-D k-means (Lloyd, quantile initialisation, uniform weights)."""
    x = np.asarray(x, np.float64).ravel()
    if x.size < k:
        raise ValueError(f"k-means needs at least {k} values, got {x.size}")
    if x.size > max_samples:
        x = np.random.default_rng(seed).choice(x, max_samples, replace=False)
    c = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        edges = (c[1:] + c[:-1]) / 2
        a = np.searchsorted(edges, x)
        sums = np.bincount(a, weights=x, minlength=k)
        cnt = np.bincount(a, minlength=k)
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        new = np.sort(new)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    return np.sort(c)


def calibrate_arrays(k_pre: np.ndarray, v: np.ndarray, cfg: KVQuantConfig, bits_list=(2, 3, 4)) -> dict:
    """Calibration from activations `k_pre, v [layers, tokens, kv_heads, d]` (sink tokens excluded
    by the caller). returns {"k_offset","k_range" [L, h, d], "k_lut_<b>","v_lut_<b>" [L, 2^b], ...}."""
    k_pre, v = np.asarray(k_pre, np.float64), np.asarray(v, np.float64)
    L, T, H, d = k_pre.shape
    t = 1.0 - (1.0 - cfg.sparsity) / 2.0
    upper = np.quantile(k_pre, t, axis=1)                                    # [L, H, d]
    lower = np.quantile(k_pre, 1.0 - t, axis=1)
    off, rng = (upper + lower) / 2, np.maximum((upper - lower) / 2, 1e-6)
    out = {"k_offset": off.astype(np.float32), "k_range": rng.astype(np.float32),
           "sparsity": np.float64(cfg.sparsity), "tokens": np.int64(T)}
    n_side = cfg.n_side(d)
    for l in range(L):
        uk = (k_pre[l] - off[l][None]) / rng[l][None]
        uk = uk[np.abs(uk) <= 1]
        s = np.sort(v[l], axis=-1)
        up, lo = s[..., d - 1 - n_side], s[..., n_side]
        vo, vr = (up + lo) / 2, (up - lo) / 2
        uv = (s[..., n_side:d - n_side] - vo[..., None]) / np.where(vr > 0, vr, 1)[..., None]
        for b in bits_list:
            out.setdefault(f"k_lut_{b}", []).append(kmeans_1d(uk, 2 ** b, cfg.kmeans_iters))
            out.setdefault(f"v_lut_{b}", []).append(kmeans_1d(uv, 2 ** b, cfg.kmeans_iters))
    for key in list(out):
        if key.startswith(("k_lut_", "v_lut_")):
            out[key] = np.stack(out[key]).astype(np.float32)
    return out


def collect_activations(params, config, token_ids) -> tuple[np.ndarray, np.ndarray]:
    """Pre-RoPE keys and values of one forward over `token_ids` -> `[layers, tokens, kv_heads, d]`."""
    from kvjax import cache as kvcache
    from kvjax.generate import forward_jit
    from kvjax.observation import Observe
    t = len(token_ids)
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    _, _, obs = forward_jit(params, jnp.asarray([token_ids], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
                            cache, config, Observe(qkv=True))
    tr = lambda a: np.asarray(a, np.float32)[:, 0].transpose(0, 2, 1, 3)
    return tr(obs["k_pre"]), tr(obs["v"])


def calibrate(params, config, token_ids, cfg: KVQuantConfig = KVQuantConfig(), bits_list=(2, 3, 4)) -> dict:
    """Per-layer KVQuant calibration on real text: run the model, drop the sink positions, fit."""
    if len(token_ids) <= cfg.sink + 16:
        raise ValueError(f"calibration needs more than {cfg.sink + 16} tokens, got {len(token_ids)}")
    k, v = collect_activations(params, config, token_ids)
    out = calibrate_arrays(k[:, cfg.sink:], v[:, cfg.sink:], cfg, bits_list)
    out["sink"] = np.int64(cfg.sink)
    return out


def save_calibration(path, calib: dict) -> None:
    np.savez(path, **calib)


def load_calibration(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class KVQuantCache:
    """KVQuant cache (layout in the module docstring); stacked over layers on axis 0."""

    k_codes: jax.Array
    k_out_val: jax.Array
    k_out_idx: jax.Array
    v_codes: jax.Array
    v_offset: jax.Array
    v_range: jax.Array
    v_out_val: jax.Array
    v_out_idx: jax.Array
    sink_k: jax.Array
    sink_v: jax.Array
    k_offset: jax.Array
    k_range: jax.Array
    k_lut: jax.Array
    v_lut: jax.Array
    lengths: jax.Array
    pos_offset: jax.Array
    bits: int = 4
    n_side: int = 1

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[-2]

    @property
    def sink(self) -> int:
        return self.sink_k.shape[-2]

    @property
    def positions(self) -> jax.Array:
        return slot_positions(self.lengths, self.pos_offset, self.capacity)

    def memory_bytes(self) -> int:
        return tree_bytes(self)

    def append(self, keys, values, positions, keys_pre_rope=None) -> "KVQuantCache":
        """keys_pre_rope `[b, h, new, d]` is required (keys are quantized before RoPE)."""
        if keys_pre_rope is None:
            raise ValueError("KVQuant quantizes pre-RoPE keys: append needs keys_pre_rope")
        return append(self, keys_pre_rope, values, positions)

    def resize(self, capacity: int) -> "KVQuantCache":
        return resize(self, capacity)

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        """Dequantize pre-RoPE keys, rotate them by their slot positions with `rope`, attend."""
        if rope is None:
            raise ValueError("KVQuant stores pre-RoPE keys: attend needs the `rope` function")
        from kvjax.attention import attend
        pos = self.positions
        k_pre, v = dequantize(self)
        k = rope(k_pre, jnp.maximum(pos, 0))
        return attend(q, k, v, pos, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(
    KVQuantCache,
    data_fields=["k_codes", "k_out_val", "k_out_idx", "v_codes", "v_offset", "v_range", "v_out_val", "v_out_idx",
                 "sink_k", "sink_v", "k_offset", "k_range", "k_lut", "v_lut", "lengths", "pos_offset"],
    meta_fields=["bits", "n_side"])


def init_kvquant_cache(config, batch: int, capacity: int, calibration, bits: int = 4, sink: Optional[int] = None,
                       sparsity: Optional[float] = None, dtype=jnp.float32) -> KVQuantCache:
    """Empty KVQuant cache for a ModelConfig. calibration: dict from `calibrate` or an npz path.
    sink / sparsity default to the calibration's values."""
    calib = load_calibration(calibration) if isinstance(calibration, (str, bytes)) or hasattr(calibration, "__fspath__") \
        else calibration
    sink = int(calib.get("sink", 5)) if sink is None else sink
    sparsity = float(calib.get("sparsity", 0.99)) if sparsity is None else sparsity
    cfg = KVQuantConfig(bits, sparsity, sink)
    d, L, H = config.head_dim, config.n_layers, config.n_kv_heads
    cfg.validate(d)
    if f"k_lut_{bits}" not in calib:
        raise ValueError(f"the calibration has no {bits}-bit LUT (keys: {sorted(calib)})")
    want = (L, H, d)
    if tuple(calib["k_offset"].shape) != want or tuple(calib[f"k_lut_{bits}"].shape) != (L, 2 ** bits):
        raise ValueError(f"calibration shapes {calib['k_offset'].shape}, {calib[f'k_lut_{bits}'].shape} do not match "
                         f"the model ([layers, kv_heads, head_dim] = {want})")
    if min(batch, capacity) <= 0:
        raise ValueError(f"batch and capacity must be positive, got {batch}, {capacity}")
    n = cfg.n_side(d)
    lead = (L, batch, H)
    z = lambda *s, dt: jnp.zeros(lead + s, dt)
    return KVQuantCache(
        k_codes=z(capacity, packing.packed_size(d, bits), dt=jnp.uint8),
        k_out_val=z(capacity, 2 * n, dt=jnp.float16), k_out_idx=jnp.full(lead + (capacity, 2 * n), d, jnp.uint8),
        v_codes=z(capacity, packing.packed_size(d, bits), dt=jnp.uint8),
        v_offset=z(capacity, dt=jnp.float16), v_range=z(capacity, dt=jnp.float16),
        v_out_val=z(capacity, 2 * n, dt=jnp.float16), v_out_idx=jnp.full(lead + (capacity, 2 * n), d, jnp.uint8),
        sink_k=z(sink, d, dt=dtype), sink_v=z(sink, d, dt=dtype),
        k_offset=jnp.asarray(calib["k_offset"], jnp.float32), k_range=jnp.asarray(calib["k_range"], jnp.float32),
        k_lut=jnp.asarray(calib[f"k_lut_{bits}"], jnp.float32), v_lut=jnp.asarray(calib[f"v_lut_{bits}"], jnp.float32),
        lengths=jnp.zeros(lead, jnp.int32), pos_offset=jnp.full(lead, NO_POSITION, jnp.int32),
        bits=bits, n_side=n)


def append(layer: KVQuantCache, k_pre: jax.Array, values: jax.Array, positions: jax.Array) -> KVQuantCache:
    """Quantize and write new tokens (one layer's slice). k_pre, values `[b, h, new, d]`."""
    if k_pre.shape != values.shape or k_pre.ndim != 4 or k_pre.shape[:2] != layer.lengths.shape:
        raise ValueError(f"keys {k_pre.shape} / values {values.shape} must be [batch, kv_heads, new, d] "
                         f"matching the cache {layer.lengths.shape}")
    packing.check_finite("append keys/values", k_pre, values)
    return _append(layer, k_pre, values, positions)


@jax.jit
def _append(layer: KVQuantCache, k_pre, values, positions):
    b, h, n, d = k_pre.shape
    kc, kv, ki = quantize_keys(k_pre, layer.k_offset, layer.k_range, layer.k_lut, layer.bits, layer.n_side)
    vc, vo, vr, vv, vi = quantize_values(values, layer.v_lut, layer.bits, layer.n_side)
    slot = layer.lengths[..., None] + jnp.arange(n, dtype=jnp.int32)            # [b, h, n]

    def write(buf, upd, idx):
        return jax.vmap(jax.vmap(lambda bb, s, u: bb.at[s].set(u.astype(bb.dtype), mode="drop")))(buf, idx, upd)

    pos = jnp.broadcast_to(positions[:, None, :], slot.shape).astype(jnp.int32)
    sink_slot = jnp.where((pos >= 0) & (pos < layer.sink), pos, layer.sink)     # out of range -> dropped
    return dataclasses.replace(
        layer,
        k_codes=write(layer.k_codes, kc, slot), k_out_val=write(layer.k_out_val, kv, slot),
        k_out_idx=write(layer.k_out_idx, ki, slot),
        v_codes=write(layer.v_codes, vc, slot), v_offset=write(layer.v_offset, vo, slot),
        v_range=write(layer.v_range, vr, slot), v_out_val=write(layer.v_out_val, vv, slot),
        v_out_idx=write(layer.v_out_idx, vi, slot),
        sink_k=write(layer.sink_k, k_pre, sink_slot), sink_v=write(layer.sink_v, values, sink_slot),
        lengths=layer.lengths + n, pos_offset=update_pos_offset(layer.pos_offset, layer.lengths, positions))


def dequantize(layer: KVQuantCache) -> tuple[jax.Array, jax.Array]:
    """Pre-RoPE keys and values `[b, h, C, d]` float32 of one layer (sink positions exact)."""
    k = dequantize_keys(layer.k_codes, layer.k_out_val, layer.k_out_idx, layer.k_offset, layer.k_range,
                        layer.k_lut, layer.bits)
    v = dequantize_values(layer.v_codes, layer.v_offset, layer.v_range, layer.v_out_val, layer.v_out_idx,
                          layer.v_lut, layer.bits)
    if layer.sink:
        pos = layer.positions
        in_sink = ((pos >= 0) & (pos < layer.sink))[..., None]
        sidx = jnp.clip(pos, 0, layer.sink - 1)[..., None]
        k = jnp.where(in_sink, jnp.take_along_axis(layer.sink_k.astype(jnp.float32), sidx, axis=-2), k)
        v = jnp.where(in_sink, jnp.take_along_axis(layer.sink_v.astype(jnp.float32), sidx, axis=-2), v)
    return k, v


def resize(cache: KVQuantCache, capacity: int) -> KVQuantCache:
    """Same contents, new capacity (kvjax.cache.resize dispatches here); shrinking below the
    longest row is an error."""
    longest = int(jnp.max(cache.lengths))
    if capacity < longest:
        raise ValueError(f"cannot shrink KVQuant cache to {capacity} slots: a head holds {longest} tokens")
    d = cache.sink_k.shape[-1]

    def fit(x, axis, fill=0):
        axis = axis % x.ndim
        cur = x.shape[axis]
        if capacity <= cur:
            return jax.lax.slice_in_dim(x, 0, capacity, axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, capacity - cur)
        return jnp.pad(x, widths, constant_values=fill)

    return dataclasses.replace(
        cache, k_codes=fit(cache.k_codes, -2), k_out_val=fit(cache.k_out_val, -2),
        k_out_idx=fit(cache.k_out_idx, -2, d), v_codes=fit(cache.v_codes, -2), v_offset=fit(cache.v_offset, -1),
        v_range=fit(cache.v_range, -1), v_out_val=fit(cache.v_out_val, -2), v_out_idx=fit(cache.v_out_idx, -2, d))


def from_dense(dense, calibration, config, bits: int = 4, capacity: Optional[int] = None, **kw) -> KVQuantCache:
    """Quantize a filled dense KVCache (post-RoPE keys) after a full-precision prefill: keys are
    un-rotated with RoPE at -position (exact inverse) before pre-RoPE quantization."""
    from models.rope import apply_rope
    cap = dense.capacity if capacity is None else capacity
    cache = init_kvquant_cache(config, dense.keys.shape[1], cap, calibration, bits, dtype=dense.keys.dtype, **kw)
    t = int(jnp.max(dense.lengths))
    pos = dense.positions[:, :, 0, :t]
    keys, values = dense.keys[..., :t, :], dense.values[..., :t, :]
    k_pre = jax.vmap(lambda k, p: apply_rope(k, -jnp.maximum(p, 0), config))(keys, pos)
    packing.check_finite("dense keys/values", keys, values)
    return _append_layers(cache, keys, k_pre, values, pos)


@jax.jit
def _append_layers(cache, keys, k_pre, values, pos):
    return jax.vmap(lambda c, k, kp, v, p: c.append(k, v, p, keys_pre_rope=kp))(cache, keys, k_pre, values, pos)


def bytes_per_token(head_dim: int, bits: int, n_side: int) -> float:
    """Codes + outliers (fp16 value + uint8 index) of K and V, + V's fp16 offset/range, per token-head."""
    return 2 * (head_dim * bits / 8 + 2 * n_side * 3) + 4


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvjax.quant.kvquant")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="calibrate per-layer KVQuant thresholds and NUQ codebooks on KJV text")
    c.add_argument("--out", required=True, help="output .npz path")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    c.add_argument("--start-verse", type=int, default=20000, help="KJV verse to start at (away from Genesis)")
    c.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    c.add_argument("--sparsity", type=float, default=0.99)
    c.add_argument("--sink", type=int, default=5)
    a = ap.parse_args(argv)
    from kvjax.eval.text import kjv_text
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    config, params = load_model(a.model, progress=False)
    tok = load_tokenizer(a.model)
    ids = tok.encode(kjv_text(start_verse=a.start_verse, n_chars=8 * a.tokens))[: a.tokens]
    if len(ids) < a.tokens:
        raise SystemExit(f"only {len(ids)} calibration tokens available")
    cfg = KVQuantConfig(bits=max(a.bits), sparsity=a.sparsity, sink=a.sink)
    calib = calibrate(params, config, ids, cfg, tuple(a.bits))
    save_calibration(a.out, calib)
    print(f"saved KVQuant calibration ({len(ids)} tokens, {config.n_layers} layers, bits {a.bits}) to {a.out}")


if __name__ == "__main__":
    main()
