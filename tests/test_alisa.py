"""ALISA sparse window attention: the kept set (newest floor(local * budget) + the rest by the
window-summed attention, GQA mean) vs a float64 numpy loop; the cache is allocated at the budget;
a decode-time run on a tiny model; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation
from kvjax.policies import Budget, make_policy
from kvjax.policies.alisa import ALISA
from kvjax.policies.base import compress
from models.config import ModelConfig

L, B, HKV, G, S, W, D, K = 2, 2, 2, 2, 16, 8, 4, 6
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=L, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


def np_kept(probs, pos, k, local, window):
    """Kept positions per (layer, row, kv head) by the spec (float64)."""
    out = {}
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                s = np.mean([probs[l, b, h * G + g, -window:].sum(0) for g in range(G)], axis=0)
                live = np.flatnonzero(pos[l, b, h] >= 0)
                n_local = int(np.floor(local * k + 1e-6))
                newest = live[np.argsort(-pos[l, b, h, live], kind="stable")[:n_local]]
                rest = [j for j in live[np.argsort(-s[live], kind="stable")] if j not in newest][:k - n_local]
                out[l, b, h] = set(pos[l, b, h, list(newest) + rest].tolist())
    return out


@pytest.mark.parametrize("local", [0.5, 0.0])
def test_kept_set_matches_numpy(local):
    rng = np.random.default_rng(0)
    pos = np.broadcast_to(np.arange(S), (L, B, HKV, S)).copy()
    pos[:, 1, :, :4] = -1
    probs = rng.random((L, B, HKV * G, W, S)) ** 4
    probs = np.where(pos[:, :, :1, None, :] >= 0, probs, 0.0)
    probs /= probs.sum(-1, keepdims=True)
    cache = kvcache.KVCache(keys=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
                            values=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.full((L, B, HKV), S, jnp.int32))
    pol = ALISA(local=local)
    scores = pol.score(Observation(cache=cache, config=CFG, window_probs=jnp.asarray(probs, jnp.float32)))
    n_keep = jnp.full((B,), K, jnp.int32)
    new, _ = jax.jit(lambda c, s: compress(pol, CFG, c, s, n_keep, K, K))(cache, scores)
    ref = np_kept(probs, pos, K, local, W)
    got = np.asarray(new.positions)
    for (l, b, h), kept in ref.items():
        assert set(got[l, b, h].tolist()) == kept
    assert new.keys.shape[-2] == K and new.memory_bytes() < cache.memory_bytes()


def test_decode_time_run_on_a_tiny_model():
    from kvjax.compression import Compression
    from kvjax.generate import generate
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(0))
    out = generate(params, CFG, [list(range(1, 20))], 12,
                   compression=Compression(make_policy("alisa"), Budget(tokens=16), when="decode", interval=4))
    assert len(out.tokens[0]) == 12 and out.cache.capacity == 16 + 4


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(local=1.5), dict(local=-0.1)])
def test_bad_input(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ALISA(**kwargs)
