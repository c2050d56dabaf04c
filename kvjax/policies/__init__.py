"""Compression policies: one module per method, selectable by name.

    from kvjax.policies import make_policy
    policy = make_policy("snapkv", window=32)
    policy = make_policy("razor", params=params, config=config)   # finds its retrieval heads
    policy = make_policy("duo_attention", pattern_file="pattern.json")

Locret is not a scoring policy (it runs its own chunked prefill with trained heads): see
`kvjax.policies.locret` and `python -m kvjax generate --policy locret --heads DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from kvjax.policies.adakv import AdaKV
from kvjax.policies.alisa import ALISA
from kvjax.policies.attention_gate import AttentionGate
from kvjax.policies.cam import CAM
from kvjax.policies.compresskv import CompressKV
from kvjax.policies.cskv import CSKV
from kvjax.policies.d2o import D2O
from kvjax.policies.elastic_cache import ElasticCache
from kvjax.policies.dapq import DapQ
from kvjax.policies.kvcrush import KVCrush
from kvjax.policies.kvmerger import KVMerger
from kvjax.policies.base import Budget, Observation, ScoringPolicy
from kvjax.policies.duo_attention import DuoAttention
from kvjax.policies.ems import EMS
from kvjax.policies.expected_attention import ExpectedAttention
from kvjax.policies.h2o import H2O
from kvjax.policies.keyformer import Keyformer
from kvjax.policies.knorm import KNorm
from kvjax.policies.lococo import LoCoCo
from kvjax.policies.kv_head_merge import KVHeadMerge, calibration_tokens
from kvjax.policies.minicache import MiniCache
from kvjax.policies.prefixkv import PrefixKV
from kvjax.policies.pyramidkv import PyramidKV
from kvjax.policies.razor import RazorAttention
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.think import ThinK
from kvjax.policies.tova import TOVA
from kvjax.policies.treekv import TreeKV
from kvjax.policies.triattention import TriAttention
from kvjax.policies.windowkv import WindowKV

POLICIES: dict[str, type] = {
    "snapkv": SnapKV,
    "streaming_llm": StreamingLLM,
    "knorm": KNorm,
    "h2o": H2O,
    "tova": TOVA,
    "expected_attention": ExpectedAttention,
    "think": ThinK,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "keyformer": Keyformer,
    "razor": RazorAttention,
    "duo_attention": DuoAttention,
    "windowkv": WindowKV,    # issue 17: window-granular SnapKV-style eviction
    "dapq": DapQ,            # issue 17: SnapKV scored by pseudo-queries at future positions
    "triattention": TriAttention,   # issue 17: calibrated mean-query trig scores (stats=calibrate_triattention(...))
    "treekv": TreeKV,        # issue 17: cyclic pairwise eviction by average attention (tree-like density)
    # merging (issue 18): evict, then fold evicted tokens into the kept ones (ScoringPolicy.merge)
    "cam": CAM,
    "d2o": D2O,
    "kvmerger": KVMerger,
    "elastic_cache": ElasticCache,   # importance-driven merge into the nearest kept anchor
    # learned (issue 16): trained in-context eviction gates, `attention_gate:gates=DIR`
    "attention_gate": AttentionGate,
    # learned (issue 16): convolutional fusion of each chunk into a fixed cache, `lococo:weights=DIR`
    "lococo": LoCoCo,
    "kvcrush": KVCrush,
    "ems": EMS,
    # low-rank channels (issue 18): older tokens as SVD latents, the newest full width
    "cskv": CSKV,
    # cross-layer merging (issue 18): adjacent deep layers share one direction cache
    "minicache": MiniCache,
    # head merging (issue 18): groups of kv heads -> one head by the SVD of calibration keys/values
    "kv_head_merge": KVHeadMerge,
    # head-type eviction (issue 18): the layer's semantic retrieval heads choose every head's tokens
    "compresskv": CompressKV,
    # sparse window attention (issue 18): newest tokens + heaviest by the last steps' attention
    "alisa": ALISA,
    # layer-adaptive budgets (issue 18): one attention share kept by every layer, found globally
    "prefixkv": PrefixKV,
}

# Policies that cannot be built from hyperparameters alone: DuoAttention needs its trained per-head
# pattern (`pattern=` or `pattern_file=`); RazorAttention finds its pattern from the model.
NEEDS_PATTERN = ("duo_attention",)
NEEDS_MODEL = ("razor", "kv_head_merge", "compresskv")


def load_pattern(path, config=None) -> tuple[tuple[int, ...], ...]:
    """A per-(layer, kv-head) 0/1 pattern from a JSON file ([[0, 1, ...], ...] or {"pattern": ...}).

    With `config` (a ModelConfig), a file that names its model (`train.duo` writes "model",
    "n_layers", "kv_heads") must name this one, and any pattern must be [n_layers][n_kv_heads]."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"head pattern file {p} not found")
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        if config is not None and data.get("model", config.name) != config.name:
            raise ValueError(f"{p} was trained for model {data['model']!r}, not {config.name!r}")
        data = data.get("pattern")
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        raise ValueError(f"{p}: expected a JSON list of per-layer lists of 0/1 (or {{'pattern': ...}})")
    if config is not None and (len(data) != config.n_layers or any(len(r) != config.n_kv_heads for r in data)):
        raise ValueError(f"{p}: pattern is [{len(data)}][{len(data[0])}], model {config.name} has "
                         f"{config.n_layers} layers x {config.n_kv_heads} kv heads")
    return tuple(tuple(int(v) for v in row) for row in data)


def make_policy(name: str, *, params=None, config=None, **kwargs) -> ScoringPolicy:
    """Instantiate a policy by registry name with hyperparameter overrides.

    config (a ModelConfig), when given, fills the fields that size caches tightly (`kv_heads` of
    AdaKV, `n_layers` of PyramidKV); params + config let RazorAttention find its retrieval heads."""
    key = name.lower().replace("-", "_")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    cls = POLICIES[key]
    if "pattern_file" in kwargs:
        kwargs["pattern"] = load_pattern(kwargs.pop("pattern_file"), config)
    elif isinstance(kwargs.get("pattern"), list):
        kwargs["pattern"] = tuple(tuple(int(v) for v in row) for row in kwargs["pattern"])
    if config is not None:
        fields = {f.name for f in dataclasses.fields(cls)}
        from kvjax.ring import policy_config      # a model's sliding-window layers are not compressed
        for field, value in (("kv_heads", config.n_kv_heads), ("n_layers", policy_config(config).n_layers)):
            if field in fields and field not in kwargs:
                kwargs[field] = value
    if key == "attention_gate":
        if "gates" not in kwargs or params is None or config is None:
            raise ValueError("attention_gate needs its trained gates (gates=DIR from `python -m train.attention_gate`) "
                             "and the model (params= and config=)")
        return AttentionGate.from_dir(kwargs.pop("gates"), params, config, **kwargs)
    if key == "lococo":
        if "weights" not in kwargs or config is None:
            raise ValueError("lococo needs its trained compressor (weights=DIR from `python -m train.lococo`) "
                             "and the model's config (config=)")
        return LoCoCo.from_dir(kwargs.pop("weights"), config, **kwargs)
    if key == "kv_head_merge" and "bases" not in kwargs:
        if params is None or config is None or "calibration" not in kwargs:
            raise ValueError("kv_head_merge needs calibration data and the model: calibration='random'|'kjv'|[ids] "
                             "with params= and config= (e.g. --policy kv_head_merge:calibration=kjv)")
        toks = calibration_tokens(kwargs.pop("calibration"), config, kwargs.pop("calib_tokens", 512),
                                  kwargs.pop("seed", 0))
        return KVHeadMerge.from_calibration(params, config, toks, **kwargs)
    if key == "compresskv":
        if isinstance(kwargs.get("heads"), list):
            kwargs["heads"] = tuple(tuple(int(h) for h in row) for row in kwargs["heads"])
        if "heads" not in kwargs:
            if params is None or config is None:
                raise ValueError(f"{name} finds its semantic retrieval heads from the model: pass params= and config=")
            return CompressKV.from_model(params, config, **kwargs)
    if key in NEEDS_PATTERN and "pattern" not in kwargs:
        raise ValueError(f"{name} needs a per-(layer, kv-head) pattern: pattern=... or pattern_file=PATH.json")
    if key in NEEDS_MODEL and "pattern" not in kwargs:
        if params is None or config is None:
            raise ValueError(f"{name} finds its retrieval heads from the model: pass params= and config=")
        return RazorAttention.from_model(params, config, **kwargs)
    return cls(**kwargs)


__all__ = ["Budget", "Observation", "ScoringPolicy", "POLICIES", "make_policy", "load_pattern",
           "NEEDS_PATTERN", "NEEDS_MODEL"]
