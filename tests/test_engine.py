"""The engine's memory contract, checked on the compiled programs (CPU compiler).

- A decode loop updates the per-layer cache in place: no cache-sized copy, concatenate or
  dynamic-update-slice inside the loop, and temporaries far below the cache bytes.
- A policy's observation is reduced inside the layer: a SnapKV prefill chunk needs no buffer with
  both a layers axis and a window x slots axis (the old forward returned window probabilities of
  every layer, `[L, B, Hq, w, S]`, larger than the cache itself in this test).
- The attention backend is an argument (several in one process), and bad values fail in one line.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.generate import decode_loop, forward_step, generate, init_engine_cache
from kvjax.hlo import while_body_ops
from kvjax.policies import Budget, make_policy
from kvjax.sampling import Sampling
from models.config import get_config
from models.llama import init_params

CFG = dataclasses.replace(get_config("llama3-8b"), name="engine-test", n_layers=4, d_model=256, n_heads=4,
                          n_kv_heads=2, head_dim=32, ffn_dim=512, vocab_size=512)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.3)


def test_decode_loop_updates_the_cache_in_place(params):
    b, s = 2, 2048
    cache = init_engine_cache(CFG, b, s, jnp.float32)
    args = (params, cache, jnp.zeros((b,), jnp.int32), jnp.full((b,), 7, jnp.int32), jax.random.PRNGKey(0))
    compiled = decode_loop.lower(*args, config=CFG, sampling=Sampling(), max_new_tokens=8, eos_ids=(),
                                 compression=None, attention="xla").compile()
    layer = f"f32[{b},{CFG.n_kv_heads},{s},{CFG.head_dim}]"
    body = while_body_ops(compiled.as_text())
    assert body, "no while loop found in the compiled decode loop"
    cache_sized = [l.strip() for l in body
                   if re.search(r"= " + re.escape(layer) + r"(\{[^}]*\})? (copy|concatenate|dynamic-update-slice)\(", l)]
    assert cache_sized == [], f"cache-sized buffers rebuilt per step: {cache_sized[:3]}"
    mem = compiled.memory_analysis()
    cache_bytes = cache.memory_bytes()
    scores = b * CFG.n_heads * s * 4 * 2                     # one layer's logits + probabilities (f32)
    assert mem.temp_size_in_bytes < 0.1 * cache_bytes + scores, (mem.temp_size_in_bytes, cache_bytes)
    assert mem.alias_size_in_bytes >= cache_bytes            # the donated cache is the output cache


def test_snapkv_observation_is_reduced_inside_the_layer(params):
    s, w, chunk = 2048, 64, 64
    cache = init_engine_cache(CFG, 1, s, jnp.float32)
    comp = Compression(make_policy("snapkv", window=w), Budget(ratio=0.1))
    tok = jnp.zeros((1, chunk), jnp.int32)
    pos = jnp.arange(s - chunk, s, dtype=jnp.int32)[None]
    compiled = forward_step.lower(params, tok, pos, cache, CFG, observer=comp.observer()).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    one_window = CFG.n_heads * w * s * 4                      # [B, Hq, w, S] f32 of one layer
    stacked = CFG.n_layers * one_window                       # what the old forward returned
    assert stacked > cache.memory_bytes()                     # the case the issue measured (68.8 GB at 32K)
    # one layer's window probabilities + that layer's chunk logits/probabilities (CPU XLA attention)
    assert temp <= 3.5 * one_window < stacked, (temp, one_window, stacked)
    out = compiled(params, tok, pos, init_engine_cache(CFG, 1, s, jnp.float32))[2]
    assert set(out) == {"scores"} and out["scores"].shape == (CFG.n_layers, 1, CFG.n_kv_heads, s)


def test_backend_is_an_argument_and_bad_values_fail_in_one_line(params):
    prompts = [list(range(1, 70)), list(range(5, 40))]
    comp = Compression(make_policy("snapkv", window=8), Budget(ratio=0.5))
    got = {a: generate(params, CFG, prompts, 6, eos_ids=(), attention=a, chunk_size=32, bucket=16,
                       compression=comp) for a in ("xla", "interpret")}
    assert got["xla"].tokens == got["interpret"].tokens
    assert got["xla"].stats["attention"] == "xla-reference"
    assert "flash prefill" in got["interpret"].stats["attention"]
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        generate(params, CFG, prompts, 2, attention="fast")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="no Pallas .* kernel for the 'cpu' device"):
            generate(params, CFG, prompts, 2, attention="pallas")


def test_generate_logits_do_not_depend_on_the_cache_layout(params):
    """Same tokens from the engine (per-layer cache, unrolled layers) and from a stacked cache
    driven by lax.scan (models.llama.forward's other loop)."""
    from kvjax.cache import init_cache
    from models.llama import forward
    toks = jnp.asarray([list(range(3, 40))], jnp.int32)
    pos = jnp.arange(toks.shape[1], dtype=jnp.int32)[None]
    a, _, _ = forward(params, toks, pos, init_engine_cache(CFG, 1, 48), CFG)
    b, _, _ = forward(params, toks, pos, init_cache(CFG.n_layers, 1, CFG.n_kv_heads, 48, CFG.head_dim), CFG)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5     # f32 summation order only (1.4e-6 seen)


def test_every_registered_cache_implements_the_protocol():
    from kvjax.cache import LayerCache
    from kvjax.quant import make_cache_init, quant_names
    cfg = dataclasses.replace(CFG, head_dim=64)
    layers = [init_engine_cache(cfg, 1, 128).layers[0]]
    for name in quant_names():
        try:
            layers.append(init_engine_cache(cfg, 1, 128, cache_init=make_cache_init(name)).layers[0])
        except (ValueError, TypeError) as err:      # caches that need calibration data
            assert "calibrat" in str(err) or "layer_bits" in str(err), (name, err)
    for layer in layers:
        assert isinstance(layer, LayerCache), type(layer).__name__


def test_kivi_decode_loop_writes_codes_in_place(params):
    """A KIVI decode loop writes one token per step into the packed codes: no codes-sized copy,
    concatenate or dynamic-update-slice of a layer's k/v codes inside the loop (the key flush runs
    under a lax.cond, the leaving value row is scattered in place)."""
    from kvjax.quant import make_cache_init
    b, s = 2, 1024
    cache = init_engine_cache(CFG, b, s, jnp.float32, make_cache_init("kivi4"))
    args = (params, cache, jnp.zeros((b,), jnp.int32), jnp.full((b,), 7, jnp.int32), jax.random.PRNGKey(0))
    compiled = decode_loop.lower(*args, config=CFG, sampling=Sampling(), max_new_tokens=8, eos_ids=(),
                                 compression=None, attention="xla").compile()
    codes = f"u8[{b},{CFG.n_kv_heads},{s},{CFG.head_dim // 2}]"
    body = while_body_ops(compiled.as_text())
    assert any(codes in l for l in body), "the codes buffer does not appear in the loop body"
    rebuilt = [l.strip() for l in body
               if re.search(r"= " + re.escape(codes) + r"(\{[^}]*\})? (copy|concatenate|dynamic-update-slice)\(", l)]
    assert rebuilt == [], f"codes-sized buffers rebuilt per step: {rebuilt[:3]}"


def test_quantized_prefill_keeps_peak_at_the_quantized_cache(params):
    """generate over a KIVI-4 cache prefills through a full-precision cache beside the quantized one
    (KIVI's rule; the peak counts both); quantized_prefill=True appends each chunk quantized, so the
    peak is the quantized cache alone."""
    from kvjax.quant import make_cache_init
    prompts = [list(range(3, 99)), list(range(5, 85))]
    # R = 32: the default 128-token windows would outgrow this 100-slot context (generate then runs
    # the full cache, kvjax.generate.no_larger_than_dense)
    run = lambda **kw: generate(params, CFG, prompts, 4, chunk_size=32, cache_dtype=jnp.float32,
                                cache_init=make_cache_init("kivi4", residual=32), eos_ids=(), **kw)
    dense_first, quantized = run(), run(quantized_prefill=True)
    # same capacity here (prefill = decode slots): the peak is exactly the quantized cache
    assert quantized.stats["cache_capacity"] == dense_first.stats["cache_capacity"]
    assert quantized.stats["peak_cache_bytes"] == quantized.stats["cache_bytes"]
    assert dense_first.stats["peak_cache_bytes"] > 1.5 * dense_first.stats["cache_bytes"]
    assert all(len(t) == 4 for t in quantized.tokens)
    with pytest.raises(ValueError, match="quantized_prefill applies"):
        generate(params, CFG, prompts, 4, quantized_prefill=True)
