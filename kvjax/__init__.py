"""kvjax: KV-cache compression and sparse attention for LLM inference in JAX/Pallas.

    import kvjax
    config, params = kvjax.load_model("smollm2")                   # or a .gguf / HF safetensors directory
    tok = kvjax.load_tokenizer("smollm2")
    snap = kvjax.Compression(kvjax.make_policy("snapkv"), kvjax.Budget(ratio=0.25))
    out = kvjax.generate(params, config, [tok.encode("...")], 32, tokenizer=tok, compression=snap)

Names are imported on first use (importing kvjax itself loads no JAX code).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "models.loading",
    "load_tokenizer": "models.tokenizer",
    "forward": "models.llama",
    "init_params": "models.llama",
    "generate": "kvjax.generate",
    "GenerateResult": "kvjax.generate",
    "Sampling": "kvjax.sampling",
    "Compression": "kvjax.compression",
    "Budget": "kvjax.policies",
    "make_policy": "kvjax.policies",
    "POLICIES": "kvjax.policies",
    "make_cache_init": "kvjax.quant",
    "Observe": "kvjax.observation",
    "Observer": "kvjax.observation",
    "Observation": "kvjax.observation",
    "evaluate": "kvjax.eval.harness",
    "evaluate_fidelity": "kvjax.eval.fidelity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name == "evaluate":
        return importlib.import_module("kvjax.eval.harness").run_grid
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvjax' has no attribute {name!r}")


def __dir__():
    return __all__
