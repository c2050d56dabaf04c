"""ZipCache and MiKV inside `generate` (kvjax.quant.streaming): the buffered prompt is split into the
high / low precision pools by the real queries' statistics, observed inside the layers, as the
float64 formulas of the spec compute them from the prompt's post-RoPE queries and keys."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import init_engine_cache, prefill
from kvjax.observation import Observe
from kvjax.quant import make_cache_init
from kvjax.quant.streaming import MIKV_WINDOW
from models.config import get_config
from models.llama import forward, init_params, unstack_params
from models.rope import apply_rope
from test_quant_mikv import np_balancer
from test_quant_zipcache import _check_pool, _np_round

T = 50


@pytest.fixture(scope="module")
def tiny():
    """(config, per-layer params, prompt tokens [1, T], post-RoPE q [L, Hq, T, d] and k [L, H, T, d])."""
    cfg = dataclasses.replace(get_config("llama3-8b"), name="stream-test", n_layers=1, d_model=128, n_heads=4,
                              n_kv_heads=2, head_dim=64, ffn_dim=256, vocab_size=256)
    params = unstack_params(init_params(cfg, jax.random.PRNGKey(7), scale=0.5))
    tokens = jax.random.randint(jax.random.PRNGKey(8), (1, T), 0, cfg.vocab_size)
    pos = jnp.arange(T)[None]
    cache = init_engine_cache(cfg, 1, T, jnp.float32)
    _, _, outs = forward(params, tokens, pos, cache, cfg, Observe(qkv=True))
    rot = lambda x: np.asarray(jax.vmap(lambda a: apply_rope(a, pos, cfg))(x)[:, 0], np.float64)
    return cfg, params, tokens, rot(outs["q_pre"]), rot(outs["k_pre"])


def _prefilled(tiny, name):
    """The engine's prefill into the streaming cache: (layers before the compression round, after)."""
    cfg, params, tokens, _, _ = tiny
    cache = init_engine_cache(cfg, 1, T + 8, jnp.float32, make_cache_init(name, interval=8))
    _, cache, _ = prefill(params, cfg, tokens, jnp.arange(T)[None], cache)
    return cache.layers, cache.resize(T + 8).layers


def test_zipcache_in_generate_uses_probe_queries(tiny):
    """Every layer's 4-bit / 2-bit split of the prompt (and the stored values) is the one the probe
    queries (last 5 % + random 5 % of the prompt's) give in float64 (test_quant_zipcache's round)."""
    cfg, q = tiny[0], tiny[3]
    before, after = _prefilled(tiny, "zipcache")
    for layer in range(cfg.n_layers):
        want = _np_round(before[layer].inner, q[layer], np.arange(T), before[layer].inner.method)
        _check_pool(after[layer].inner, want, "hi")
        _check_pool(after[layer].inner, want, "lo")


def test_mikv_in_generate_uses_window_attention_and_balancer(tiny):
    """MiKV's fp16 share of the prompt: the top 20 % by the attention the last 16 prompt queries pay
    (summed over the GQA group; float64); the channel balancer is the prompt queries' / keys' one."""
    cfg, _, _, q, k = tiny
    before, after = _prefilled(tiny, "mikv")
    g, d = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
    for layer in range(cfg.n_layers):
        lay = after[layer].inner
        np.testing.assert_allclose(np.asarray(lay.rounds["balance"][0], np.float64),
                                   np_balancer(q[layer], k[layer], np.ones((cfg.n_kv_heads, T), bool)), rtol=2e-3)
        hi = np.asarray(lay.hi_pos[0])
        for h in range(cfg.n_kv_heads):
            score = np.zeros(T)
            for head in range(h * g, (h + 1) * g):
                s = np.where(causal, q[layer, head] @ k[layer, h].T / np.sqrt(d), -np.inf)[-MIKV_WINDOW:]
                a = np.exp(s - s.max(-1, keepdims=True))
                score += (a / a.sum(-1, keepdims=True)).sum(0)
            n_hi = int(np.round(0.2 * T))
            assert set(hi[h][hi[h] >= 0]) == set(np.argsort(-score, kind="stable")[:n_hi])
