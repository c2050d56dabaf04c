"""Elastic Cache: importance (attention received, mean over all query heads of the layer), sinks and
the last token protected, evicted tokens averaged into their nearest anchor by position. `compress`
vs a float64 numpy loop of the official rule (liuzuyan/ElasticCache `kv_cache.py`) on a GQA cache
with a left-padded row; a 100% budget reproduces the full cache; bytes at the budget; the engine's
prefill on a tiny model; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.compression import Compression
from kvjax.observation import Observation
from kvjax.policies import Budget, make_policy
from kvjax.policies.base import compress
from kvjax.policies.elastic_cache import ElasticCache
from models.config import ModelConfig

L, B, HKV, G, S, D, K = 2, 2, 3, 2, 16, 8, 9
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=32, n_layers=L, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=64, rope_theta=10000.0)


def case(seed=0):
    """cache [L, B, Hkv, S, d] (row 1 left-padded by 3), column sums [L, B, Hq, S]."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(L, B, HKV, S, D))
    values = rng.normal(size=(L, B, HKV, S, D))
    pos = np.broadcast_to(np.arange(S), (L, B, HKV, S)).copy()
    pos[:, 1, :, :3] = -1
    pos[:, 1, :, 3:] -= 3
    cols = rng.random((L, B, HKV * G, S)) * (pos[:, :, :1] >= 0)
    cache = kvcache.KVCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32),
                            lengths=jnp.asarray((pos >= 0).sum(-1), jnp.int32))
    return cache, keys, values, pos, cols


def np_elastic(keys, values, pos, cols, k, sink=4, last=1):
    """The official rule per layer and batch row, float64 loops: kept (keys, values, positions) of
    every kv head [B, Hkv, k, d] in chronological order."""
    b_, h_, s_ = pos.shape
    ok, ov, op = (np.zeros((b_, h_, k, keys.shape[-1])), np.zeros((b_, h_, k, values.shape[-1])),
                  np.full((b_, h_, k), -1))
    for b in range(b_):
        live = [s for s in range(s_) if pos[b, 0, s] >= 0]
        n = len(live)
        imp = cols[b].mean(0)                                             # mean over all query heads
        protected = [s for s in live if pos[b, 0, s] < sink or pos[b, 0, s] >= n - last]
        rest = [s for s in live if s not in protected]
        order = sorted(rest, key=lambda s: (-imp[s], s))                  # top importance, older on ties
        anchors = sorted(order[:k - len(protected)])
        evicted = sorted(order[k - len(protected):])
        members = {a: [a] for a in anchors}
        for e in evicted:
            if anchors:
                a = min(anchors, key=lambda a: (abs(pos[b, 0, a] - pos[b, 0, e]), pos[b, 0, a]))
                members[a].append(e)
        kept = sorted(protected + anchors)
        for h in range(h_):
            for r, s in enumerate(kept):
                group = members.get(s, [s])
                ok[b, h, r] = keys[b, h, group].mean(0)
                ov[b, h, r] = values[b, h, group].mean(0)
                op[b, h, r] = pos[b, h, s]
    return ok, ov, op


def run(policy, cache, cols, k):
    state = policy.accumulate(Observation(cache=cache, config=CFG, column_sums=jnp.asarray(cols, jnp.float32)))
    scores = policy.score(Observation(cache=cache, config=CFG, accumulated=state))
    n_keep = jnp.full((B,), k, jnp.int32)
    fn = jax.jit(lambda c, sc: compress(policy, CFG, c, sc, n_keep, k, k))
    return fn(cache, scores)[0]


def test_compress_matches_numpy_gqa():
    cache, keys, values, pos, cols = case()
    got = run(ElasticCache(), cache, cols, K)
    for layer in range(L):
        rk, rv, rp = np_elastic(keys[layer], values[layer], pos[layer], cols[layer], K)
        np.testing.assert_array_equal(np.asarray(got.positions[layer]), rp)
        np.testing.assert_allclose(np.asarray(got.keys[layer]), rk, rtol=1e-5, atol=1e-6 * np.abs(rk).max())
        np.testing.assert_allclose(np.asarray(got.values[layer]), rv, rtol=1e-5, atol=1e-6 * np.abs(rv).max())
    # something merged: some kept keys are not any original key
    assert not np.allclose(np.asarray(got.keys[0, 0, 0]), keys[0, 0, 0, np.asarray(got.positions[0, 0, 0])])
    # memory: allocated at the budget, K slots per head
    per_head = K * (2 * D * 4 + 4) + 4
    assert got.memory_bytes() == L * B * HKV * per_head < cache.memory_bytes()
    # merge off: the same anchors, their own keys / values (eviction only)
    plain = run(ElasticCache(merge_evicted=False), cache, cols, K)
    np.testing.assert_array_equal(np.asarray(plain.positions), np.asarray(got.positions))
    p = np.asarray(plain.positions)
    for layer in range(L):
        for b in range(B):
            slots = p[layer, b, 0] + (3 if b == 1 else 0)                 # row 1 is left-padded by 3
            np.testing.assert_array_equal(np.asarray(plain.keys[layer, b]), keys[layer, b][:, slots].astype(np.float32))


def test_full_budget_is_the_full_cache():
    """Nothing evicted -> nothing merged: the cache is the input cache (live slots first)."""
    cache, keys, values, pos, cols = case(1)
    got = run(ElasticCache(), cache, cols, S)
    live = pos[0, 0, 0] >= 0
    np.testing.assert_array_equal(np.asarray(got.keys[:, 0]), keys[:, 0].astype(np.float32))
    n = int(live.sum())
    np.testing.assert_array_equal(np.asarray(got.values[:, 1, :, :S - 3]), values[:, 1, :, 3:].astype(np.float32))
    assert n == S


def test_engine_prefill_tiny_model_keeps_the_budget():
    """The engine's prefill (attention accumulated inside the forward, then compress + merge) on a
    tiny model: every head holds the budget, sinks and the last prompt token included."""
    from kvjax.eval.fidelity import prefill_context
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(0))
    pre = prefill_context(params, CFG, jnp.arange(1, 33, dtype=jnp.int32)[None],
                          Compression(make_policy("elastic_cache"), Budget(ratio=0.5)))
    pos = np.asarray(pre.cache.positions)                      # [L, B, Hkv, slots]
    assert ((pos >= 0).sum(-1) == 16).all()                    # 16 of 32 tokens per head
    assert ((pos >= 0) & (pos < 4)).sum(-1).min() == 4 and (pos == 31).any(-1).all()
    cap = pos.shape[-1]                                        # the budget + decode room, not the context
    assert cap <= 17 and pre.cache.memory_bytes() == L * HKV * (cap * (2 * D * 4 + 4) + 4)


@pytest.mark.parametrize("kwargs", [dict(sink=-1), dict(protect_last=-2)])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=">= 0"):
        ElasticCache(**kwargs)
    with pytest.raises(ValueError, match="True or False"):
        ElasticCache(merge_evicted="false")                          # a CLI typo is not silently truthy
