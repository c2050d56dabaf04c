"""NSA decode (kvjax/nsa_decode.py): prefill + one-token steps reproduce the full-sequence NSA
forward (`models.nsa.nsa_forward`, checked against float64 numpy in test_nsa.py) at every
position; the Pallas decode kernels (interpret mode) agree with the reference path; errors."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.nsa_decode import nsa_decode_step, nsa_generate, nsa_prefill
from models.config import ModelConfig
from models.llama import init_params
from models.nsa import NSAConfig, init_nsa_params, nsa_forward_jit

CFG = ModelConfig(name="tiny-nsa-dec", vocab_size=61, d_model=32, n_layers=2, n_heads=6, n_kv_heads=2,
                  head_dim=16, ffn_dim=48)
# layer 0 dense, layer 1 NSA with small blocks (l=4, d=2, l'=16, n=2, w=7): by 45 tokens the
# selection drops blocks, the window is shorter than the context and 21 compressed blocks exist
NSA = NSAConfig(kernel_size=4, kernel_stride=2, block_size=16, top_n=2, init_blocks=1, local_blocks=1, window=7,
                layers=(1,))


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    nsa = init_nsa_params(CFG, NSA, jax.random.PRNGKey(1), noise=0.2)
    nsa[1]["gate_b"] = nsa[1]["gate_b"] + 2.0 * jax.random.normal(jax.random.PRNGKey(3), nsa[1]["gate_b"].shape)
    return params, nsa


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_decode_steps_equal_full_forward_and_kernels(model):
    params, nsa = model
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 45), 0, CFG.vocab_size, jnp.int32)
    full, kvs = nsa_forward_jit(params, nsa, toks, CFG, NSA, return_kv=True)   # one compile for both tests
    cache, logits = nsa_prefill(params, nsa, toks[:, :11], CFG, NSA, 48)
    assert _rel(logits, full[:, :11]) < 1e-5
    for t in range(11, 45):
        if t == 40:   # the Pallas GPU decode kernels (interpret mode) on a copy of the cache
            copy = jax.tree_util.tree_map(jnp.copy, cache)
            got, _ = nsa_decode_step(params, nsa, copy, toks[:, t], CFG, NSA, "interpret")
            assert _rel(got, full[:, t]) < 1e-5
        logits, cache = nsa_decode_step(params, nsa, cache, toks[:, t], CFG, NSA, "xla")
        assert _rel(logits, full[:, t]) < 1e-5, t
    assert int(cache.length) == 45
    # the compressed keys written step by step equal the full forward's
    ck_full = kvs[1][2]
    np.testing.assert_allclose(np.asarray(cache.ck[1][:, :, :ck_full.shape[2]]), np.asarray(ck_full),
                               atol=2e-5 * float(jnp.abs(ck_full).max()))


def test_generate_and_errors(model):
    params, nsa = model
    prompt = jax.random.randint(jax.random.PRNGKey(5), (2, 11), 0, CFG.vocab_size, jnp.int32).tolist()
    out = nsa_generate(params, nsa, prompt, CFG, NSA, max_new_tokens=4, backend="xla", capacity=48)
    # greedy tokens = argmax of the full forward over prompt + generated tokens (causal: the
    # filler after them changes nothing; 45 tokens reuse the compiled forward)
    seq = jnp.asarray([p + o[:-1] + [0] * (45 - 14) for p, o in zip(prompt, out)], jnp.int32)
    want = jnp.argmax(nsa_forward_jit(params, nsa, seq, CFG, NSA, return_kv=True)[0][:, 10:14], axis=-1).tolist()
    assert out == want
    with pytest.raises(ValueError, match="one length"):
        nsa_generate(params, nsa, [[1, 2], [3]], CFG, NSA)
    with pytest.raises(ValueError, match="capacity"):
        nsa_prefill(params, nsa, jnp.zeros((1, 9), jnp.int32), CFG, NSA, 4)
    with pytest.raises(ValueError, match="cover layers"):
        nsa_generate(params, {0: nsa[1]}, [[1, 2]], CFG, NSA)


@pytest.mark.skipif(not os.environ.get("KVJAX_NSA_REAL"), reason="86 s on the shared 2-core CPU (30 unrolled "
                    "NSA decode layers to compile): opt in with KVJAX_NSA_REAL=1")
def test_smollm2_nsa_generate_gated_to_window_equals_dense(smollm2, smollm2_tokenizer):
    """The real model converted to NSA (every layer; gates forced to the window branch, window
    512 >= context) generates the dense engine's greedy tokens through prefill + NSA decode."""
    import dataclasses
    from kvjax.generate import generate
    config, params = smollm2
    params = jax.tree_util.tree_map(jnp.asarray, params)
    ids = smollm2_tokenizer.encode("In the beginning God created the heaven and the earth. And the earth was")
    cfg = dataclasses.replace(NSAConfig(), gate_override=(0.0, 0.0, 1.0))
    nsa = init_nsa_params(config, cfg)
    got = nsa_generate(params, nsa, [ids], config, cfg, max_new_tokens=4, backend="xla")
    want = generate(params, config, [ids], 4, eos_ids=(), attention="xla").tokens
    assert got == want


# ----------------------------------------------------------------------------------------------
# NSA inside the engine (kvjax.nsa_cache): the jitted prefill + while_loop decode of kvjax.generate.

def _engine_cache(params, nsa, batch, capacity):
    from kvjax.generate import init_engine_cache
    from kvjax.nsa_cache import nsa_cache_init
    return init_engine_cache(CFG, batch, capacity, jnp.float32, nsa_cache_init(NSA, nsa))


def test_engine_teacher_forced_equals_full_forward(model):
    """Left-padded prompts of 11 and 6 tokens, prefilled in chunks of 8 (compressed blocks
    recomputed per chunk), then 33 teacher-forced steps of `decode_loop`: every step's
    log-probabilities equal the full-sequence NSA forward's at that row's position."""
    from kvjax.generate import decode_loop, left_pad, prefill
    from kvjax.sampling import Sampling
    params, nsa = model
    seq = jax.random.randint(jax.random.PRNGKey(2), (2, 45), 0, CFG.vocab_size, jnp.int32)   # test 1's: one compile
    full = jax.nn.log_softmax(nsa_forward_jit(params, nsa, seq, CFG, NSA, return_kv=True)[0], axis=-1)
    lens, m = (11, 6), 34
    tokens, positions = left_pad([seq[b, :n].tolist() for b, n in enumerate(lens)], 0, bucket=8)   # 16 slots
    cache = _engine_cache(params, nsa, 2, tokens.shape[1] + m)
    last, cache, _ = prefill(params, CFG, jnp.asarray(tokens), jnp.asarray(positions), cache, chunk_size=8,
                             attention="xla")
    want_last = jnp.stack([full[b, n - 1] for b, n in enumerate(lens)])
    assert _rel(jax.nn.log_softmax(last, -1), want_last) < 1e-5
    first = jnp.asarray([seq[b, n] for b, n in enumerate(lens)], jnp.int32)
    forced = jnp.stack([seq[b, n + 1:n + m] for b, n in enumerate(lens)])
    _, steps, cache, _, logp = decode_loop(params, cache, first, jnp.asarray(lens, jnp.int32), jax.random.PRNGKey(0),
                                           forced=forced, config=CFG, sampling=Sampling(), max_new_tokens=m,
                                           eos_ids=(), attention="xla")
    assert int(steps) == m
    want = jnp.stack([full[b, n:n + m - 1] for b, n in enumerate(lens)])
    assert _rel(logp, want) < 1e-5
    # the layer holds token p at slot p, its compressed keys equal the full forward's (row 0: 44 tokens)
    layer = cache.layers[1]
    assert layer.lengths[:, 0].tolist() == [n + m - 1 for n in lens]
    ck_full = nsa_forward_jit(params, nsa, seq, CFG, NSA, return_kv=True)[1][1][2]
    n0 = NSA.n_compressed(lens[0] + m - 1)
    np.testing.assert_allclose(np.asarray(layer.ck[0, :, :n0]), np.asarray(ck_full[0, :, :n0]),
                               atol=2e-5 * float(jnp.abs(ck_full).max()))


def test_engine_generate_memory_and_errors(model, tmp_path):
    """`kvjax.generate` with the NSA cache: greedy tokens = argmax of the full forward over prompt +
    generated tokens; cache_bytes counts K/V, compressed K/V, positions and lengths (the layout's
    formula) and not the NSA weights; combinations NSA does not support raise; an export loads
    (`load_engine`, the CLI's --nsa) into the same cache_init."""
    from kvjax.compression import Budget, Compression
    from kvjax.generate import generate
    from kvjax.nsa_cache import nsa_cache_init
    from kvjax.policies import make_policy
    params, nsa = model
    prompts = [jax.random.randint(jax.random.PRNGKey(5), (9,), 0, CFG.vocab_size).tolist(),
               jax.random.randint(jax.random.PRNGKey(6), (12,), 0, CFG.vocab_size).tolist()]
    # 16 padded slots in chunks of 8, 34 new tokens: the previous test's compiled prefill step
    res = generate(params, CFG, prompts, 34, eos_ids=(), bucket=8, chunk_size=8, cache_init=nsa_cache_init(NSA, nsa),
                   attention="xla")
    seq = jnp.asarray([(p + o)[:-1] + [0] * (12 - len(p)) for p, o in zip(prompts, res.tokens)], jnp.int32)
    full = nsa_forward_jit(params, nsa, seq, CFG, NSA, return_kv=True)[0]
    want = [jnp.argmax(full[b, len(p) - 1:len(p) + 33], -1).tolist() for b, p in enumerate(prompts)]
    assert res.tokens == want
    cap, b, h, d = res.stats["cache_capacity"], 2, CFG.n_kv_heads, CFG.head_dim
    dense = b * h * cap * (2 * d * 4 + 4) + b * h * 4                   # f32 K/V + int32 positions, lengths
    nsa_layer = 2 * b * h * (cap + NSA.n_compressed(cap)) * d * 4 + b * h * 4
    assert res.stats["cache_bytes"] == dense + nsa_layer
    assert res.stats["attention"].startswith("nsa decode")
    with pytest.raises(ValueError, match="NSA attention runs alone: compression"):
        generate(params, CFG, prompts, 2, cache_init=nsa_cache_init(NSA, nsa),
                 compression=Compression(make_policy("knorm"), Budget(tokens=4)))
    with pytest.raises(ValueError, match="cover layers"):
        generate(params, CFG, prompts, 2, cache_init=nsa_cache_init(NSA, {0: nsa[1]}))
    # an export (models.nsa_weights) through the CLI's loader: the same weights in the cache
    from kvjax.cli import build_parser, check_generate_args
    from kvjax.nsa_cache import load_engine
    from models.nsa_weights import save_nsa
    save_nsa(tmp_path / "nsa", nsa, NSA, CFG)
    same, init = load_engine(tmp_path / "nsa", CFG, params)
    assert same is params
    cache = init(CFG, 1, 40)
    np.testing.assert_array_equal(np.asarray(cache.weights[1]["cmp_wk"]), np.asarray(nsa[1]["cmp_wk"]))
    assert cache.weights[0] is None and cache.layers[1].ck.shape == (1, 2, NSA.n_compressed(40), 16)
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--nsa", str(tmp_path / "nsa"), "--kv-quant",
                                      "kivi4"])
    with pytest.raises(ValueError, match="--nsa runs NSA attention alone: --kv-quant"):
        check_generate_args(args)
    with pytest.raises(FileNotFoundError, match="not an NSA export"):
        check_generate_args(build_parser().parse_args(["generate", "--prompt", "hi", "--nsa", str(tmp_path)]))
