"""CompressKV: the layer's semantic retrieval heads choose one token set for all its kv heads.
Scores vs a float64 numpy loop of the spec (window sum, mean over the chosen heads, zeroed window,
avg pool 5 with zero padding, window protected; GQA 2 query heads per kv head); compress keeps the
same slots in every kv head at the budget's size; the NIAH detection sample; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation
from kvjax.policies import make_policy
from kvjax.policies.base import compress
from kvjax.policies.compresskv import CompressKV, niah_sample, top_heads
from models.config import ModelConfig

B, HKV, G, S, W, D = 2, 2, 2, 20, 8, 4
HEADS = ((0, 3), (1, 2))
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


def case(seed=0):
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(S), (2, B, HKV, S)).copy()
    pos[:, 1, :, :3] = -1                                           # row 1 left-padded
    probs = rng.random((2, B, HKV * G, W, S)) ** 3
    probs = np.where(pos[:, :, :1, None, :] >= 0, probs, 0.0)
    probs /= probs.sum(-1, keepdims=True)
    cache = kvcache.KVCache(keys=jnp.asarray(rng.normal(size=(2, B, HKV, S, D)), jnp.float32),
                            values=jnp.asarray(rng.normal(size=(2, B, HKV, S, D)), jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.full((2, B, HKV), S, jnp.int32))
    return probs, pos, cache


def np_scores(probs, pos, layer):
    out = np.zeros((B, HKV, S))
    for b in range(B):
        s = np.mean([probs[layer, b, h].sum(0) for h in HEADS[layer]], axis=0)
        live = pos[layer, b, 0] >= 0
        recent = live & (pos[layer, b, 0] > pos[layer, b, 0].max() - W)
        s = np.where(recent, 0.0, s)
        padded = np.concatenate([np.zeros(2), s, np.zeros(2)])
        pooled = np.array([padded[j:j + 5].sum() / 5 for j in range(S)])
        out[b] = np.where(recent, np.inf, pooled)[None]
    return out


def test_scores_match_numpy():
    probs, pos, cache = case()
    pol = CompressKV(heads=HEADS)
    for layer in (0, 1):
        one = jax.tree_util.tree_map(lambda x: x[layer:layer + 1], cache)
        obs = Observation(cache=one, config=CFG, window_probs=jnp.asarray(probs[layer:layer + 1], jnp.float32),
                          layer=layer, n_layers=2)
        got = np.asarray(pol.score(obs))[0]
        ref = np_scores(probs, pos, layer)
        live = pos[layer] >= 0
        np.testing.assert_allclose(got[live], ref[live], rtol=1e-5, atol=1e-7)


def test_compress_keeps_one_token_set_per_layer():
    probs, pos, cache = case(1)
    pol = CompressKV(heads=HEADS)
    scores = np.stack([np_scores(probs, pos, l) for l in (0, 1)])
    scores = np.where(pos >= 0, scores, -np.inf)
    k = 12
    new, _ = jax.jit(lambda c, s: compress(pol, CFG, c, s, jnp.full((B,), k, jnp.int32), k, k))(
        cache, jnp.asarray(scores, jnp.float32))
    p = np.asarray(new.positions)
    np.testing.assert_array_equal(p[:, :, 0], p[:, :, 1])            # same slots in both kv heads
    for l in (0, 1):
        for b in range(B):
            live = pos[l, b, 0] >= 0
            order = np.argsort(-np.where(live, scores[l, b, 0], -np.inf), kind="stable")[:k]
            assert set(p[l, b, 0].tolist()) == set(pos[l, b, 0, order].tolist())
    assert new.keys.shape[-2] == k and new.memory_bytes() < cache.memory_bytes()


def test_niah_sample_and_top_heads():
    toks, span, rows = niah_sample(np.random.default_rng(0), 64, haystack=30, needle=4, depth=0.5)
    needle = toks[span]
    assert len(toks) == 38 and np.array_equal(toks[rows + 1], needle)   # the answer rows predict the needle
    assert np.array_equal(toks[-4:], needle) and span.start == 15
    assert top_heads(np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 0.0, 1.0, 2.0]]), 2) == ((1, 2), (0, 3))


def test_find_heads_on_a_tiny_model():
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(0))
    pol = make_policy("compresskv", params=params, config=CFG, first_k=2, haystack=24, needle=4, depths=(0.5,))
    assert len(pol.heads) == 2 and all(len(set(r)) == 2 and max(r) < CFG.n_heads for r in pol.heads)
    assert pol.window == 8 and pol.kernel == 5 and pol.pool == "avg"


def test_bad_input():
    with pytest.raises(ValueError, match="semantic retrieval heads"):
        CompressKV()
    with pytest.raises(ValueError, match="params"):
        make_policy("compresskv")
    with pytest.raises(ValueError, match="first_k"):
        make_policy("compresskv", params={}, config=CFG, first_k=9)
    probs, pos, cache = case()
    obs = Observation(cache=cache, config=CFG, window_probs=jnp.asarray(probs, jnp.float32), n_layers=2)
    with pytest.raises(ValueError, match="out of range"):
        CompressKV(heads=((0, 7), (1, 2))).score(obs)
    with pytest.raises(ValueError, match="3 layers"):
        CompressKV(heads=((0,), (1,), (2,))).score(obs)
