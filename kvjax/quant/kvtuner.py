"""KVTuner: per-layer (key bits, value bits) for KIVI-style KV quantization, found by calibration.

Li et al., "KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache Quantization for
Efficient and Nearly Lossless LLM Inference", ICML 2025, arXiv 2502.04420 (code: cmd2001/KVTuner).
Spec: quantization_and_sparse_attention.md §5 (KVTuner).

* `KVTunerConfig.layer_bits` holds one (k_bits, v_bits) pair per layer from the pruned candidate set
  {KV8, K8V4, KV4, K4V2, KV2}; the quantizer is KVTuner's "kivi" mode (K per channel, V per token,
  group 32, residual 32) -- the rules of `kvjax.quant.kivi`.
* Search (`search`): the paper runs a multi-objective Optuna search over layer groups. Here the search
  is sensitivity-based and exact for an additive objective: for every layer l and candidate c, the
  mean KL(full || quantized) on calibration text when only layer l uses c (all others KV8) is
  measured; then the per-layer choice minimising the summed KL under the target average bit width
  ((k_bits + v_bits)/2 averaged over layers) is found by dynamic programming (multiple-choice knapsack).
  This replaces Optuna's black-box search and ignores interactions between layers (an approximation).
* Evaluation uses `SimKIVICache`: full-precision storage with per-layer bit widths as *data*, so one
  compiled forward serves every configuration; its numerics are exactly those of `KIVICache`
  (same groups, same flush/window rules, fp16 statistics), which a test checks against the packed cache.
  A packed mixed-precision cache cannot be stacked over layers (code widths differ per layer), so
  deploying a per-layer config needs per-layer caches outside `lax.scan`: not implemented.
  `bytes_per_token` reports what a packed deployment would store.

`python -m kvjax.quant.kvtuner search --target 3.0 --out PATH.json` runs the search on SmolLM2 + KJV.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.quant import kivi, packing

CANDIDATES: tuple[tuple[int, int], ...] = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))


@dataclasses.dataclass(frozen=True)
class KVTunerConfig:
    layer_bits: tuple[tuple[int, int], ...]
    group: int = 32
    residual: int = 32

    def __post_init__(self):
        for kb, vb in self.layer_bits:
            if kb not in kivi.KIVI_BITS or vb not in kivi.KIVI_BITS:
                raise ValueError(f"bit pair ({kb}, {vb}) is not supported: bits must be in {kivi.KIVI_BITS}")
        if self.residual % self.group:
            raise ValueError(f"residual {self.residual} must be a multiple of group {self.group}")

    @property
    def average_bits(self) -> float:
        return float(np.mean([(kb + vb) / 2 for kb, vb in self.layer_bits]))

    def bytes_per_token(self, head_dim: int) -> float:
        """Mean over layers of the packed KIVI bytes per token per kv-head."""
        return float(np.mean([kivi.bytes_per_token(head_dim, kb, vb, self.group) for kb, vb in self.layer_bits]))


# ----------------------------------------------------------------------------- simulated cache

def fake_quant(x: jax.Array, bits: jax.Array, group: int, axis: int, keep=None) -> jax.Array:
    """KIVI's quantize->dequantize with a traced bit width (same formula as kvjax.quant.packing).

    keep: optional bool, broadcastable to x: entries kept exact and left out of their group's
    min/max (e.g. attention sinks)."""
    axis = axis % x.ndim
    n = x.shape[axis]
    shape_g = x.shape[:axis] + (n // group, group) + x.shape[axis + 1:]
    xg = x.astype(jnp.float32).reshape(shape_g)
    if keep is None:
        lo = jnp.min(xg, axis=axis + 1, keepdims=True)
        hi = jnp.max(xg, axis=axis + 1, keepdims=True)
    else:
        keep = jnp.broadcast_to(keep, x.shape).reshape(shape_g)
        lo = jnp.min(jnp.where(keep, jnp.inf, xg), axis=axis + 1, keepdims=True)
        hi = jnp.max(jnp.where(keep, -jnp.inf, xg), axis=axis + 1, keepdims=True)
        lo = jnp.where(jnp.isfinite(lo), lo, 0.0)   # a group that is all kept
        hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
    levels = (2.0 ** jnp.asarray(bits, jnp.float32)) - 1.0
    mn = lo.astype(jnp.float16).astype(jnp.float32)
    scale = ((hi - lo) / levels).astype(jnp.float16).astype(jnp.float32)
    safe = jnp.where(scale > 0, scale, 1.0)
    code = jnp.where(scale > 0, jnp.clip(jnp.round((xg - mn) / safe), 0, levels), 0.0)
    out = code * scale + mn
    if keep is not None:
        out = jnp.where(keep, xg, out)
    return out.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class SimKIVICache:
    """Dense fp storage + per-layer `k_bits, v_bits` ([layers] int32 data); attends over what a packed
    KIVI cache with those widths would hold (keys in whole R-blocks per channel, values beyond the
    R-token window per token)."""

    dense: kvcache.KVCache
    k_bits: jax.Array
    v_bits: jax.Array
    group: int = 32
    residual: int = 32

    @property
    def lengths(self):
        return self.dense.lengths

    @property
    def positions(self):
        return self.dense.positions

    @property
    def capacity(self):
        return self.dense.capacity

    def memory_bytes(self) -> int:
        return self.dense.memory_bytes()

    def resize(self, capacity: int) -> "SimKIVICache":
        return dataclasses.replace(self, dense=kvcache.resize(self.dense, kivi.quantized_capacity(capacity, self.group)))

    def append(self, keys, values, positions, keys_pre_rope=None):
        packing.check_finite("append keys/values", keys, values)
        return dataclasses.replace(self, dense=kvcache.append(self.dense, keys, values, positions))

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        k, v = simulated_kv(self)
        return attend(q, k, v, self.dense.positions, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(SimKIVICache, data_fields=["dense", "k_bits", "v_bits"],
                                 meta_fields=["group", "residual"])


def simulated_kv(layer: SimKIVICache):
    """Keys/values `[b, h, C, d]` as one layer of a packed KIVI cache would return them."""
    g, r = layer.group, layer.residual
    k, v = layer.dense.keys.astype(jnp.float32), layer.dense.values.astype(jnp.float32)
    t = jnp.arange(layer.capacity)
    n = layer.dense.lengths[..., None]
    kq = fake_quant(k, layer.k_bits, g, axis=-2)
    vq = fake_quant(v, layer.v_bits, g, axis=-1)
    k = jnp.where((t < (n // r) * r)[..., None], kq, k)
    v = jnp.where((t < n - r)[..., None], vq, v)
    return k, v


def init_sim_cache(config, batch: int, capacity: int, tuner: KVTunerConfig) -> SimKIVICache:
    if len(tuner.layer_bits) != config.n_layers:
        raise ValueError(f"{len(tuner.layer_bits)} bit pairs for a model of {config.n_layers} layers")
    if tuner.group <= 0 or config.head_dim % tuner.group:
        raise ValueError(f"KVTuner group size {tuner.group} must be positive and divide head_dim={config.head_dim}")
    cap = kivi.quantized_capacity(capacity, tuner.group)
    dense = kvcache.init_cache(config.n_layers, batch, config.n_kv_heads, cap, config.head_dim)
    kb = jnp.asarray([p[0] for p in tuner.layer_bits], jnp.int32)
    vb = jnp.asarray([p[1] for p in tuner.layer_bits], jnp.int32)
    return SimKIVICache(dense, kb, vb, tuner.group, tuner.residual)


# ----------------------------------------------------------------------------- search

def choose(sensitivity: np.ndarray, target_bits: float, candidates: Sequence[tuple[int, int]] = CANDIDATES):
    """Per-layer candidate indices minimising sum_l sensitivity[l, c_l] with mean (kb+vb)/2 <= target.

    sensitivity: [layers, len(candidates)]. Exact (dynamic programming over integer bit sums)."""
    sens = np.asarray(sensitivity, np.float64)
    L, C = sens.shape
    cost = [kb + vb for kb, vb in candidates]                  # 2 x mean bits of the pair
    budget = int(np.floor(target_bits * 2 * L + 1e-9))
    if budget < min(cost) * L:
        raise ValueError(f"target {target_bits} bits is below the smallest candidate "
                         f"({min(cost) / 2} bits per layer)")
    inf = np.inf
    best = np.full(budget + 1, inf)
    best[0] = 0.0
    pick = np.zeros((L, budget + 1), np.int64)
    for l in range(L):
        nxt = np.full(budget + 1, inf)
        for c in range(C):
            w = cost[c]
            if w > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[w:] = best[: budget + 1 - w] + sens[l, c]
            better = cand < nxt
            nxt[better], pick[l, better] = cand[better], c
        best = nxt
    b = int(np.argmin(best))
    out = []
    for l in range(L - 1, -1, -1):
        c = int(pick[l, b])
        out.append(c)
        b -= cost[c]
    return out[::-1]


def make_kl_fn(params, config, tokens: np.ndarray, tuner_group: int = 32, residual: int = 32):
    """-> f(k_bits [L], v_bits [L]) = mean KL(full || simulated KIVI) over `tokens` (one compile)."""
    from models.llama import forward
    t = len(tokens)
    toks = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    ref, _, _ = jax.jit(forward, static_argnames=("config", "all_logits"))(params, toks, pos, dense, config,
                                                                         all_logits=True)
    ref_lp = jax.nn.log_softmax(ref[0], -1)
    base = init_sim_cache(config, 1, t, KVTunerConfig(((8, 8),) * config.n_layers, tuner_group, residual))

    @jax.jit
    def kl(kb, vb):
        cache = dataclasses.replace(base, k_bits=kb, v_bits=vb)
        logits, _, _ = forward(params, toks, pos, cache, config, all_logits=True)
        lp = jax.nn.log_softmax(logits[0], -1)
        return jnp.mean(jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), -1))
    return kl


def search(params, config, tokens, target_bits: float, candidates=CANDIDATES, group: int = 32, residual: int = 32,
           progress: bool = False):
    """Sensitivity-based KVTuner search -> (KVTunerConfig, sensitivity [L, C] numpy)."""
    L = config.n_layers
    kl = make_kl_fn(params, config, tokens, group, residual)
    sens = np.zeros((L, len(candidates)))
    for l in range(L):
        for c, (kb, vb) in enumerate(candidates):
            if (kb, vb) == (8, 8):
                continue
            k = np.full(L, 8, np.int32)
            v = np.full(L, 8, np.int32)
            k[l], v[l] = kb, vb
            sens[l, c] = float(kl(jnp.asarray(k), jnp.asarray(v)))
        if progress:
            print(f"layer {l}: " + ", ".join(f"K{kb}V{vb} {s:.4f}" for (kb, vb), s in zip(candidates, sens[l])),
                  flush=True)
    picks = choose(sens, target_bits, candidates)
    return KVTunerConfig(tuple(candidates[c] for c in picks), group, residual), sens


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kvjax.quant.kvtuner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--target", type=float, default=3.0, help="target mean bits per KV element")
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--start-verse", type=int, default=20000)
    s.add_argument("--out", default=None, help="write the per-layer config as JSON")
    a = ap.parse_args(argv)
    from kvjax.eval.text import kjv_text
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    config, params = load_model("smollm2", progress=False)
    ids = load_tokenizer("smollm2").encode(kjv_text(start_verse=a.start_verse, n_chars=8 * a.tokens))[: a.tokens]
    tuner, sens = search(params, config, ids, a.target, progress=True)
    kl = make_kl_fn(params, config, ids)
    kb = jnp.asarray([p[0] for p in tuner.layer_bits]); vb = jnp.asarray([p[1] for p in tuner.layer_bits])
    res = {"target_bits": a.target, "average_bits": tuner.average_bits, "layer_bits": tuner.layer_bits,
           "calibration_kl": float(kl(kb, vb)), "bytes_per_token_per_kv_head": tuner.bytes_per_token(config.head_dim),
           "sensitivity": sens.tolist(), "candidates": CANDIDATES}
    print(json.dumps({k: v for k, v in res.items() if k != "sensitivity"}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
