"""Quantized KV caches: a registry of named presets that plug into `kvjax.generate.generate`.

    from kvjax.quant import make_cache_init
    result = generate(params, config, prompts, cache_init=make_cache_init("kivi2"))
    make_cache_init("kivi2", group=64, residual=64)          # overrides of the method's config
    make_cache_init("kvquant4", calibration="calib.npz")     # needs `python -m kvjax.quant.kvquant calibrate`
    make_cache_init("kivi2", sink=1)                         # opt-in: first token fp (kvjax.quant.sink)

`QUANT_CACHES` maps each name to a `QuantSpec` (description, defaults, what it needs);
`make_cache_init(name, **overrides)` returns `cache_init(config, batch, capacity) -> cache` and
raises ValueError for an unknown name, an unknown override key or a missing requirement (KVQuant's
calibration, KVTuner's per-layer bits). `bytes_per_token_head(name, config, **overrides)` is the
compressed representation per token per kv-head (K + V; fp residual windows/buffers excluded), the
accounting of `docs/quant_quality*.md`; `bits_per_coordinate` divides it by 2 * head_dim / 8.

Every registered cache runs inside generate's jitted prefill/decode: quantization happens in the
cache's `append` (ZipCache and MiKV through their self-compressing wrappers, see
`kvjax.quant.streaming`). Memory is allocated for `capacity` tokens at init (GEAR sizes both its
prompt region and its stream region for `capacity`, since it cannot know the prompt length).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable


__all__ = ["QuantSpec", "QUANT_CACHES", "make_cache_init", "bytes_per_token_head", "bits_per_coordinate",
           "quant_names"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """name: registry key; method: module name in kvjax.quant; defaults: keyword defaults the preset
    fixes (overridable); allowed: override keys accepted; requires: keys that must be given."""

    name: str
    method: str
    description: str
    defaults: tuple = ()
    allowed: tuple = ()
    requires: tuple = ()

    def resolve(self, overrides: dict, check_required: bool = True) -> dict:
        unknown = sorted(set(overrides) - set(self.allowed))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; allowed: {sorted(self.allowed)}")
        kw = dict(self.defaults)
        kw.update(overrides)
        missing = [k for k in self.requires if kw.get(k) is None] if check_required else []
        if missing:
            raise ValueError(f"{self.name} needs {missing}: {_REQUIRE_HELP.get(self.method, '')}")
        return kw


_REQUIRE_HELP = {
    "kvquant": "per-layer thresholds and NUQ codebooks from `python -m kvjax.quant.kvquant calibrate --out "
               "calib.npz`; pass calibration='calib.npz' (or the dict from kvquant.calibrate)",
    "kvtuner": "per-layer (k_bits, v_bits) pairs: layer_bits=[(4, 2), ...] or layer_bits='search.json' from "
               "`python -m kvjax.quant.kvtuner search --out search.json`",
}

_KIVI_KEYS = ("bits", "k_bits", "v_bits", "group", "residual", "dtype", "sink")
_QJL_KEYS = ("sketch_dim", "outlier_sketch_dim", "outlier_count", "group", "buffer", "value_bits", "value_group",
             "value_residual", "seed", "dtype")
_GEAR_KEYS = ("bits", "group", "loop", "prefill_rank", "rank", "outlier_ratio", "streaming_gap", "seed", "dtype")
_ROT_KEYS = ("bits", "group", "head_group", "sink_tokens", "dtype")
_ZIP_KEYS = ("hi_bits", "lo_bits", "unimportant_ratio", "interval", "scorer", "dtype")
_MIKV_KEYS = ("keep_ratio", "hi_bits", "lo_bits", "group", "interval", "scorer", "balance", "dtype")

QUANT_CACHES: dict[str, QuantSpec] = {s.name: s for s in (
    QuantSpec("kivi2", "kivi", "KIVI 2-bit: K per channel (G32), V per token, fp residual R128",
              (("bits", 2), ("group", 32), ("residual", 128)), _KIVI_KEYS),
    QuantSpec("kivi4", "kivi", "KIVI 4-bit: K per channel (G32), V per token, fp residual R128",
              (("bits", 4), ("group", 32), ("residual", 128)), _KIVI_KEYS),
    QuantSpec("kvquant4", "kvquant", "KVQuant nuq4-1%: pre-RoPE per-channel NUQ keys, per-token values, "
              "dense-and-sparse outliers, first 5 tokens fp (needs calibration)",
              (("bits", 4), ("calibration", None)), ("bits", "calibration", "sink", "sparsity", "dtype"),
              ("calibration",)),
    QuantSpec("kvquant3", "kvquant", "KVQuant nuq3-1% (needs calibration)",
              (("bits", 3), ("calibration", None)), ("bits", "calibration", "sink", "sparsity", "dtype"),
              ("calibration",)),
    QuantSpec("qjl", "qjl", "QJL: 1-bit JL sketch of keys (m=256, outlier sketch 256), values KIVI-2",
              (), _QJL_KEYS),
    QuantSpec("gear4", "gear", "GEAR 4-bit (G64) + low-rank error (rank 4 prompt / 2 stream) + 2% outliers",
              (("bits", 4),), _GEAR_KEYS),
    QuantSpec("gear2", "gear", "GEAR 2-bit (G64) + low-rank error + 2% outliers", (("bits", 2),), _GEAR_KEYS),
    QuantSpec("rotatekv2", "rotatekv", "RotateKV 2-bit: pre-RoPE grouped-head FWHT keys, rotated values, "
              "per-token quantization, first 4 tokens fp", (("bits", 2),), _ROT_KEYS),
    QuantSpec("rotatekv4", "rotatekv", "RotateKV 4-bit", (("bits", 4),), _ROT_KEYS),
    QuantSpec("zipcache", "zipcache", "ZipCache 60% 4-bit / 40% 2-bit by normalized-attention saliency of the real "
              "probe queries (observed in the layer; scorer='keys': buffered keys as probes), re-compressed by the "
              "cache every `interval` (100) tokens", (("interval", 100),), _ZIP_KEYS),
    QuantSpec("mikv", "mikv", "MiKV: 20% fp16 by the attention of the real queries (observed in the layer) + channel "
              "balancer, the other 80% kept at per-token INT2 instead of evicted (scorer='keys': KNorm, no "
              "balancer), re-compressed by the cache every `interval` (100) tokens", (("interval", 100),), _MIKV_KEYS),
    QuantSpec("mikv4", "mikv", "MiKV with INT4 for the low-importance 80%", (("lo_bits", 4), ("interval", 100)),
              _MIKV_KEYS),
    QuantSpec("kvtuner", "kvtuner", "KVTuner per-layer KIVI bits (simulated, unpacked storage; needs layer_bits)",
              (("layer_bits", None),), ("layer_bits", "group", "residual"), ("layer_bits",)),
)}


def quant_names() -> tuple[str, ...]:
    return tuple(QUANT_CACHES)


def _spec(name: str) -> QuantSpec:
    if name not in QUANT_CACHES:
        raise ValueError(f"unknown quantized cache {name!r}; choose one of {sorted(QUANT_CACHES)}")
    return QUANT_CACHES[name]


def _load_layer_bits(layer_bits) -> tuple:
    if isinstance(layer_bits, (str, os.PathLike)):
        with open(layer_bits) as f:
            layer_bits = json.load(f)["layer_bits"]
    return tuple((int(k), int(v)) for k, v in layer_bits)


def _fields(cls, kw: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kw.items() if k in names}


def _rotatekv_config(kw: dict, kv_heads: int):
    from kvjax.quant.rotatekv import RotateKVConfig
    kw = dict(kw)
    if "head_group" not in kw:  # the paper's 4-head group, or the largest power of two dividing kv_heads
        hg = 4
        while kv_heads % hg:
            hg //= 2
        kw["head_group"] = hg
    return RotateKVConfig(**_fields(RotateKVConfig, kw))


def _build(spec: QuantSpec, kw: dict, config, batch: int, capacity: int):
    import jax.numpy as jnp
    dtype = kw.get("dtype", jnp.float32)
    L, H, d = config.n_layers, config.n_kv_heads, config.head_dim
    if spec.method == "kivi":
        from kvjax.quant import kivi
        cache = kivi.init_kivi_cache(config, batch, capacity, bits=kw["bits"], group=kw["group"],
                                     residual=kw["residual"], dtype=dtype, k_bits=kw.get("k_bits"),
                                     v_bits=kw.get("v_bits"))
        if kw.get("sink"):  # opt-in extension: first tokens fp, out of the groups (kvjax.quant.sink)
            from kvjax.quant import sink
            cache = sink.with_sink(cache, int(kw["sink"]), dtype)
        return cache
    if spec.method == "kvquant":
        from kvjax.quant import kvquant
        return kvquant.init_kvquant_cache(config, batch, capacity, kw["calibration"], bits=kw["bits"],
                                          sink=kw.get("sink"), sparsity=kw.get("sparsity"), dtype=dtype)
    if spec.method == "qjl":
        from kvjax.quant import qjl
        return qjl.init_qjl_cache(config, batch, capacity, qjl.QJLConfig(**_fields(qjl.QJLConfig, kw)), dtype)
    if spec.method == "gear":
        from kvjax.quant import gear
        cfg = gear.GEARConfig(**_fields(gear.GEARConfig, kw))
        return gear.init_gear_cache(cfg, L, batch, H, d, capacity, capacity, dtype)
    if spec.method == "rotatekv":
        from kvjax.quant import rotatekv
        return rotatekv.init_rotatekv_cache(_rotatekv_config(kw, H), L, batch, H, capacity, d, dtype)
    if spec.method == "kvtuner":
        from kvjax.quant import kvtuner
        tuner = kvtuner.KVTunerConfig(_load_layer_bits(kw["layer_bits"]), **_fields(kvtuner.KVTunerConfig, {
            k: v for k, v in kw.items() if k != "layer_bits"}))
        return kvtuner.init_sim_cache(config, batch, capacity, tuner)
    if spec.method in ("zipcache", "mikv"):
        from kvjax.quant import streaming
        return streaming.init_streaming_cache(spec.method, config, batch, capacity, **kw)
    raise AssertionError(spec.method)


def make_cache_init(name: str, **overrides) -> Callable:
    """`cache_init(config, batch, capacity, dtype=None) -> cache` for `generate(..., cache_init=...)`
(generate passes its cache dtype as `dtype`; an explicit `dtype=` override wins).

    name: a key of QUANT_CACHES; overrides: options of that method (see each QuantSpec.allowed).
    Raises ValueError at once for an unknown name/option or a missing requirement; bad values
    (bits not supported, a group not dividing head_dim) raise when the cache is built."""
    spec = _spec(name)
    kw = spec.resolve(overrides)

    def cache_init(config, batch: int, capacity: int, dtype=None):
        # dtype: of the full-precision parts (residual windows, buffers): an explicit `dtype=` option
        # wins, else the engine's cache dtype (generate's cache_dtype: bf16 for a bf16 model), else f32
        return _build(spec, kw if dtype is None or "dtype" in overrides else {**kw, "dtype": dtype},
                      config, batch, capacity)

    cache_init.__name__ = f"cache_init_{name}"
    cache_init.quant_name = name
    cache_init.overrides = dict(overrides)   # for kvjax.quant.evicted.check_combination
    cache_init.takes_engine_dtype = True
    return cache_init


def bytes_per_token_head(name: str, config, prompt_tokens: int = 1024, **overrides) -> float:
    """Compressed bytes per token per kv-head, K + V together (codes, scales/mins, outliers, sketches,
    indices; fp residual windows and buffers excluded). GEAR's low-rank factors are amortised over
    `prompt_tokens`; ZipCache/MiKV count their per-token positions (int32)."""
    spec = _spec(name)
    kw = spec.resolve(dict(overrides), check_required=spec.method != "kvquant")  # KVQuant: no calibration needed
    d = config.head_dim
    if spec.method == "kivi":
        from kvjax.quant import kivi
        return kivi.bytes_per_token(d, kw.get("k_bits") or kw["bits"], kw.get("v_bits") or kw["bits"], kw["group"])
    if spec.method == "kvquant":
        from kvjax.quant import kvquant
        cfg = kvquant.KVQuantConfig(bits=kw["bits"], sparsity=kw.get("sparsity") or 0.99)
        return kvquant.bytes_per_token(d, kw["bits"], cfg.n_side(d))
    if spec.method == "qjl":
        from kvjax.quant import kivi, qjl
        cfg = qjl.QJLConfig(**_fields(qjl.QJLConfig, kw))
        return qjl.key_bytes_per_token(d, cfg) + (d * cfg.value_bits / 8 + 2 * 2 * d / cfg.value_group)
    if spec.method == "gear":
        from kvjax.quant import gear
        cfg = gear.GEARConfig(**_fields(gear.GEARConfig, kw))
        b = gear.compressed_bytes(prompt_tokens, d, cfg.bits, cfg.group, cfg.prefill_rank, cfg.outlier_ratio)
        return (b["key"] + b["value"]) / prompt_tokens
    if spec.method == "rotatekv":
        from kvjax.quant import rotatekv
        cfg = _rotatekv_config(kw, config.n_kv_heads)
        return float(rotatekv.bytes_per_token(d, cfg.bits, cfg.group_size(d)))
    if spec.method == "kvtuner":
        from kvjax.quant import kvtuner
        tuner = kvtuner.KVTunerConfig(_load_layer_bits(kw["layer_bits"]))
        return tuner.bytes_per_token(d)
    if spec.method in ("zipcache", "mikv"):
        from kvjax.quant import streaming
        return streaming.bytes_per_token(spec.method, d, **kw)
    raise AssertionError(spec.method)


def bits_per_coordinate(name: str, config, **overrides) -> float:
    """8 * bytes_per_token_head / (2 * head_dim)."""
    return 8 * bytes_per_token_head(name, config, **overrides) / (2 * config.head_dim)
