"""MiniCache: cross-layer SLERP merge of adjacent deep layers. The merged cache's keys / values and
the attention through it (GQA, a decoded token appended) vs a float64 numpy reference of the
spec's formula; retention at its limit (every token retained) reproduces the full cache and the
full-cache generation; bytes shrink by the shared direction; bad input."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation, Observe
from kvjax.policies import Budget, make_policy
from kvjax.policies.minicache import MiniCache, MiniCacheLayers, MiniLayer, merged_pairs
from models.config import ModelConfig

L, B, HKV, G, S, D = 5, 2, 2, 2, 10, 8
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=32, n_layers=L, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=64, rope_theta=10000.0)


def stack(seed=0):
    """A stacked live-first cache [L, B, Hkv, S, d]; row 1 holds S-3 tokens. Layer 3 is layer 2
    plus noise, so the pair (2, 3) is similar but not equal (as adjacent deep layers are)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(L, B, HKV, S, D))
    v = rng.normal(size=(L, B, HKV, S, D))
    k[3] = k[2] + 0.4 * rng.normal(size=k[2].shape)
    v[3] = v[2] + 0.4 * rng.normal(size=v[2].shape)
    pos = np.broadcast_to(np.arange(S), (L, B, HKV, S)).copy()
    pos[:, 1, :, S - 3:] = -1
    cache = kvcache.KVCache(keys=jnp.asarray(k, jnp.float32), values=jnp.asarray(v, jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32),
                            lengths=jnp.asarray((pos >= 0).sum(-1), jnp.int32))
    return cache, k, v, pos


def np_merge(xa, xb, live, t, n_ret):
    """The spec's MiniCache for one pair (float64 loops): restored (x^_a, x^_b) [B, Hkv, S, d]."""
    ra, rb = xa.copy(), xb.copy()
    for b in range(xa.shape[0]):
        for h in range(xa.shape[1]):
            dist = np.full(xa.shape[2], -np.inf)
            for s in range(xa.shape[2]):
                ma, mb = np.linalg.norm(xa[b, h, s]), np.linalg.norm(xb[b, h, s])
                ua, ub = xa[b, h, s] / ma, xb[b, h, s] / mb
                om = math.acos(np.clip(ua @ ub, -1, 1))
                e = (math.sin((1 - t) * om) * ua + math.sin(t * om) * ub) / math.sin(om)
                ra[b, h, s], rb[b, h, s] = e * ma, e * mb
                if live[b, h, s]:
                    dist[s] = om / math.pi
            keep = np.argsort(-dist, kind="stable")[:n_ret]        # largest angular distance: originals
            ra[b, h, keep], rb[b, h, keep] = xa[b, h, keep], xb[b, h, keep]
    return ra, rb


def finalize(policy, cache):
    return jax.jit(lambda c: policy.finalize(c, Observation(cache=c, config=CFG), None))(cache)


def test_merged_cache_matches_numpy_and_attention_gqa():
    cache, k, v, pos = stack()
    pol = MiniCache(retention_ratio=0.3)                          # t = 0.6 official; 3 of 10 tokens retained
    assert merged_pairs(L, pol.start) == ((2, 3),)               # middle-to-deep half; odd layer 4 alone
    out = finalize(pol, cache)
    assert isinstance(out, MiniCacheLayers) and out.pair_of == (-1, -1, 0, 0, -1)
    live = pos[2] >= 0
    rk = np_merge(k[2], k[3], live, 0.6, 3)
    rv = np_merge(v[2], v[3], live, 0.6, 3)
    for i in (2, 3):
        got_k, got_v = out.enter(i).restore()
        for got, ref in ((got_k, rk[i - 2]), (got_v, rv[i - 2])):
            np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(got_k)[live], k[i][live], atol=1e-3)   # something really merged
    for i in (0, 1, 4):
        np.testing.assert_array_equal(np.asarray(out.layers[i].keys), k[i].astype(np.float32))
    # attention of layer 3 (GQA: 2 query heads per kv head) after one decoded token
    rng = np.random.default_rng(1)
    kn, vn = rng.normal(size=(B, HKV, 1, D)), rng.normal(size=(B, HKV, 1, D))
    q = rng.normal(size=(B, HKV * G, 1, D))
    qpos = np.array([[S], [S - 3]])
    lc = out.resize(S + 2).enter(3).append(jnp.asarray(kn, jnp.float32), jnp.asarray(vn, jnp.float32),
                                           jnp.asarray(qpos, jnp.int32))
    got, _ = lc.attend(jnp.asarray(q, jnp.float32), jnp.asarray(qpos, jnp.int32), observe=Observe())
    for b in range(B):
        for hq in range(HKV * G):
            h = hq // G
            keys = np.concatenate([rk[1][b, h][live[b, h]], kn[b, h]])
            vals = np.concatenate([rv[1][b, h][live[b, h]], vn[b, h]])
            w = np.exp(keys @ q[b, hq, 0] / np.sqrt(D))
            np.testing.assert_allclose(np.asarray(got)[b, hq, 0], w @ vals / w.sum(), rtol=1e-4, atol=1e-5)


def np_rope(x, pos, theta=10000.0):
    """x [..., S, d] rotated by positions [..., S] as complex pairs (i, i + d/2), float64."""
    d = x.shape[-1]
    z = (x[..., :d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[..., None] * theta ** (-np.arange(0, d, 2) / d))
    return np.concatenate([z.real, z.imag], -1)


def test_post_rope_merge_is_the_rotated_pre_rope_merge():
    """Both layers of a pair rotate a token by the same angle, so merging the cached (post-RoPE) keys
    equals RoPE applied to the merge of the pre-RoPE keys (float64 reference): same retention set,
    same restored keys. Which layers merge: the middle-to-deep half, (L/2, L/2+1), ... ."""
    assert merged_pairs(30, 0.5) == tuple((a, a + 1) for a in range(15, 29, 2))    # SmolLM2: layer 29 alone
    assert merged_pairs(4, 0.5) == ((2, 3),)
    cache, k, v, pos = stack(2)
    p = np.where(pos >= 0, pos, 0)
    rot = dataclasses.replace(cache, keys=jnp.asarray(np_rope(k, p), jnp.float32))
    pol = MiniCache(retention_ratio=0.3)
    a, b = finalize(pol, cache), finalize(pol, rot)
    np.testing.assert_array_equal(np.asarray(a.shared[0].keep_k), np.asarray(b.shared[0].keep_k))
    live = pos[2] >= 0
    ref = np_merge(k[2], k[3], live, 0.6, 3)
    for i in (2, 3):
        got, _ = b.enter(i).restore()
        want = np_rope(ref[i - 2], p[i])
        np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bytes_shrink_by_the_shared_direction():
    """Per merged pair: one direction (not two) + per-layer magnitudes + retained originals."""
    cache, *_ = stack()
    out = finalize(MiniCache(), cache)                           # 5% of 10 -> 1 retained token
    full = cache.memory_bytes()
    f, i = 4, 4
    tokens = B * HKV * S
    per_layer_full = tokens * (2 * D * f + i) + B * HKV * i      # keys + values + positions; lengths
    merged_pair = (2 * tokens * D * f + 2 * B * HKV * 1 * i      # shared dir_k, dir_v; retained slots
                   + 2 * (2 * tokens * f + 2 * B * HKV * 1 * D * f + tokens * i + B * HKV * i))
    assert full == L * per_layer_full
    assert out.memory_bytes() == 3 * per_layer_full + merged_pair < full


def tiny_model():
    from models.llama import init_params
    return init_params(CFG, jax.random.PRNGKey(0))


def test_full_retention_reproduces_the_full_cache_in_generate():
    """retention_ratio = 1: every token is retained, so generation through the merged layout
    (prefill, merge, resize, decode into the recent parts) equals the full cache's."""
    from kvjax.compression import Compression
    from kvjax.generate import generate
    params = tiny_model()
    prompts = [list(range(1, 30)), list(range(3, 20))]
    full = generate(params, CFG, prompts, 4)
    kept = generate(params, CFG, prompts, 4, compression=Compression(make_policy("minicache", retention_ratio=1.0),
                                                                    Budget(ratio=1.0)))
    assert kept.tokens == full.tokens
    assert isinstance(kept.cache, MiniCacheLayers)
    assert [type(lc) is MiniLayer for lc in kept.cache.layers] == [False, False, True, True, False]


@pytest.mark.parametrize("kwargs", [dict(t=1.5), dict(retention_ratio=-0.1), dict(retention_ratio=2.0),
                                    dict(start=1.0)])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MiniCache(**kwargs)


def test_budget_below_context_is_an_error():
    with pytest.raises(ValueError, match="100%"):
        MiniCache().max_keep(5, 10)
    assert MiniCache().max_keep(10, 10) == 10
