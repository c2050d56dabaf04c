"""Dispatch from kvjax's attention entry point to the Pallas decode kernels, end to end on CPU.

`attention="interpret"` (generate / forward / attend's static backend argument) runs the GPU kernels
in Pallas interpret mode; the XLA path (`attention="xla"`, itself checked against float64 numpy in
test_model_tiny) is the reference.
A tiny model generates with left-padded prompts of different lengths through a dense cache, a
KIVI-4 cache and a QJL cache (kernel scores for the sketched keys); tokens must be equal and
decode-step logits close.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax.attention import attend, contiguous_live
from kvjax.observation import Observe
from kvjax.cache import init_cache
from kvjax.generate import forward_jit, generate, init_engine_cache, left_pad, prefill
from kvjax.quant.kivi import init_kivi_cache
from kvjax.quant.qjl import QJLConfig, init_qjl_cache
from models.config import ModelConfig
from models.llama import init_params

CFG = ModelConfig(name="tiny-kernels", vocab_size=97, d_model=64, n_layers=2, n_heads=6, n_kv_heads=2,
                  head_dim=32, ffn_dim=64, rope_theta=10000.0)
PROMPTS = [list(range(5, 45)), list(range(7, 20))]
KIVI4 = functools.partial(init_kivi_cache, bits=4, group=16, residual=32)
# small buffers so the 40-token prompt is mostly sketched (k_len > 0); m = m_out = 256 (defaults)
QJL = lambda cfg, b, cap: init_qjl_cache(cfg, b, cap, QJLConfig(group=16, buffer=16, value_residual=32))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)


def _decode_logits(params, cache_init, mode):
    """Logits of 2 decode steps (attention backend `mode`) after a left-padded prefill (the engine's
    per-layer cache): [steps, batch, vocab]. The prefill runs XLA for both modes (many queries never
    take a kernel: test_kernel_is_in_the_decode_graph), so both modes decode from one cache and one
    compiled prefill; generate above runs the whole `mode` path."""
    toks, pos = left_pad(PROMPTS, 0, 16)
    cache = init_engine_cache(CFG, 2, 64, cache_init=cache_init)
    logits, cache, _ = prefill(params, CFG, jnp.asarray(toks), jnp.asarray(pos), cache, attention="xla")
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    p = jnp.asarray([len(x) for x in PROMPTS], jnp.int32)
    out = []
    for i in range(2):
        lg, cache, _ = forward_jit(params, nxt[:, None], (p + i)[:, None], cache, CFG, attention=mode)
        out.append(lg[:, -1])
        nxt = jnp.argmax(lg[:, -1], -1).astype(jnp.int32)
    return np.asarray(jnp.stack(out))


@pytest.mark.parametrize("cache_init,kernel,tol", [(None, "dense_decode", 1e-4), (KIVI4, "kivi_decode", 2e-2),
                                                   (QJL, "qjl_scores", 2e-2)])
def test_generate_kernel_path_equals_xla(params, cache_init, kernel, tol):
    got = {}
    for mode in ("xla", "interpret"):
        r = generate(params, CFG, PROMPTS, 6, bucket=16, cache_init=cache_init, eos_ids=(), attention=mode)
        got[mode] = (r.tokens, r.stats["attention"], _decode_logits(params, cache_init, mode))
    assert got["xla"][1] == "xla-reference"
    assert got["interpret"][1].startswith(f"pallas-gpu-interpret:{kernel}")
    assert got["interpret"][0] == got["xla"][0]
    ref, out = got["xla"][2], got["interpret"][2]
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol


def test_kernel_is_in_the_decode_graph():
    q = jnp.ones((1, 6, 1, 32))
    kv = jnp.ones((1, 2, 16, 32))
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 2, 16))
    lens = jnp.full((1, 2), 16, jnp.int32)
    f = lambda q, mode: attend(q, kv, kv, pos, jnp.full((1, 1), 16, jnp.int32), lengths=lens, backend=mode)[0]
    assert "pallas_call" in str(jax.make_jaxpr(lambda q: f(q, "interpret"))(q))
    assert "cond" in str(jax.make_jaxpr(lambda q: f(q, "interpret"))(q))
    assert "cond" not in str(jax.make_jaxpr(lambda q: f(q, "xla"))(q))
    # observations requested, or more than one query: always XLA
    g = lambda q: attend(q, kv, kv, pos, jnp.full((1, 1), 16, jnp.int32), lengths=lens,
                         observe=Observe(column_sums=True), backend="interpret")[0]
    assert "cond" not in str(jax.make_jaxpr(g)(q))


def test_contiguous_live():
    # row 0: left padding (2 empty slots), 5 live, 1 empty tail; row 1: empty head; row 2: a hole
    pos = jnp.asarray([[[-1, -1, 0, 1, 2, 3, 4, -1]], [[-1] * 8], [[0, 1, -1, 3, -1, -1, -1, -1]]], jnp.int32)
    lens = jnp.asarray([[7], [0], [4]], jnp.int32)
    ok, starts = contiguous_live(pos[:2], lens[:2], jnp.asarray([5, 0]))
    assert bool(ok) and starts.tolist() == [[2], [0]]
    ok, _ = contiguous_live(pos, lens, jnp.asarray([5, 0, 4]))
    assert not bool(ok)
    ok, _ = contiguous_live(pos[:1], lens[:1], jnp.asarray([3]))  # slot after the query
    assert not bool(ok)


def test_fallback_and_padded_query_match_xla():
    """A head with a hole (evicted slot) takes the XLA branch; a padded query (-1) gives zeros."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 6, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 16, 32)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 2, 16, 32)), jnp.float32)
    pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 2, 16)).copy()
    pos[:, :, 10:] = -1
    lens = jnp.full((2, 2), 10, jnp.int32)
    qpos = jnp.asarray([[12], [-1]], jnp.int32)
    outs = {}
    for hole in (False, True):
        p = pos.copy()
        if hole:
            p[0, 1, 4] = -1
        for mode in ("xla", "interpret"):
            outs[hole, mode] = np.asarray(attend(q, k, v, jnp.asarray(p), qpos, lengths=lens, backend=mode)[0])
        np.testing.assert_allclose(outs[hole, "interpret"], outs[hole, "xla"], atol=2e-5)
        assert not outs[hole, "interpret"][1].any()
        assert outs[hole, "interpret"][0].any()


def test_bad_mode_and_pallas_on_cpu(params):
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention.decode_impl(backend="fast")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        generate(params, CFG, PROMPTS, 2, bucket=16, eos_ids=(), attention="fast")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        forward_jit(params, jnp.ones((1, 4), jnp.int32), jnp.arange(4, dtype=jnp.int32)[None],
                    init_cache(2, 1, 2, 8, 32), CFG, attention="fast")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="no Pallas dense_decode kernel for the 'cpu' device.*interpret"):
            attention.decode_impl(backend="pallas")
        with pytest.raises(ValueError, match=r"no Pallas \w+ kernel for the 'cpu' device"):
            generate(params, CFG, PROMPTS, 2, bucket=16, eos_ids=(), attention="pallas")


def test_kivi_kernel_constraints_per_backend():
    ok = attention.kivi_kernel_ok
    # GPU: >= 16 bytes per packed row (tensor-core dot), power-of-two group >= 16
    assert ok(4, 4, 32, 128, 64) and ok(2, 2, 32, 128, 64)
    assert not ok(2, 2, 16, 32, 32)           # 8-byte packed rows
    assert not ok(4, 4, 8, 32, 64)            # group below 16
    assert not ok(4, 4, 32, 48, 64)           # residual not a multiple of the group
    # TPU: any group that divides head_dim and is a multiple of 8
    assert ok(2, 2, 16, 32, 32, "tpu") and ok(4, 4, 8, 32, 64, "tpu")
    assert not ok(4, 4, 12, 48, 96, "tpu") and not ok(3, 3, 32, 128, 128, "tpu")
