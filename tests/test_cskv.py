"""CSKV: low-rank older keys/values (SVD of the prompt's own pre-RoPE keys / values per head), the
newest tokens full width; attention through the CSKV cache vs a float64 numpy attention over the
rank-r reconstruction (independent complex RoPE from tests/numpy_reference.py); rank = d is exact;
bytes shrink; bad input."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation, Observe
from kvjax.policies.cskv import CSKV, CSKVCache
from models.config import ModelConfig
from models.rope import apply_rope
from tests.numpy_reference import _rope_complex

B, HKV, G, S, D, R = 2, 2, 2, 14, 8, 3
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=1, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


def case(seed=0):
    """A live-first stacked cache [1, B, Hkv, S, d] (row 1 holds S-2 tokens), its pre-RoPE keys."""
    rng = np.random.default_rng(seed)
    kp = rng.normal(size=(B, HKV, S, D)) * np.linspace(2.0, 0.2, D)     # a decaying spectrum
    v = rng.normal(size=(B, HKV, S, D))
    pos = np.broadcast_to(np.arange(S), (B, HKV, S)).copy()
    pos[1, :, S - 2:] = -1
    post = np.stack([np.stack([_rope_complex(kp[b, h][:, None], np.maximum(pos[b, h], 0), CFG.rope_theta)[:, 0]
                               for h in range(HKV)]) for b in range(B)])
    cache = kvcache.KVCache(keys=jnp.asarray(post[None], jnp.float32), values=jnp.asarray(v[None], jnp.float32),
                            positions=jnp.asarray(pos[None], jnp.int32),
                            lengths=jnp.asarray((pos >= 0).sum(-1)[None], jnp.int32))
    return cache, kp, post, v, pos


def np_attend(q, qpos, kp, post, v, pos, rk, rv):
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(HKV):
            live = np.flatnonzero(pos[b, h] >= 0)
            old, rec = live[:-R], live[-R:]
            vk = np.linalg.svd(kp[b, h, old])[2][:rk]
            vv = np.linalg.svd(v[b, h, old])[2][:rv]
            k_old = _rope_complex((kp[b, h, old] @ vk.T @ vk)[:, None], pos[b, h, old], CFG.rope_theta)[:, 0]
            keys = np.concatenate([k_old, post[b, h, rec]])
            vals = np.concatenate([v[b, h, old] @ vv.T @ vv, v[b, h, rec]])
            p = np.concatenate([pos[b, h, old], pos[b, h, rec]])
            for gq in range(G):
                for t in range(q.shape[2]):
                    logit = keys @ q[b, h * G + gq, t] / np.sqrt(D)
                    logit = np.where(p <= qpos[b, t], logit, -np.inf)
                    w = np.exp(logit - logit.max())
                    out[b, h * G + gq, t] = w @ vals / w.sum()
    return out


@pytest.mark.parametrize("kd,vd", [(0.5, 0.75), (1.0, 1.0)])
def test_cskv_attention_matches_numpy(kd, vd):
    cache, kp, post, v, pos = case(1)
    pol = CSKV(k_density=kd, v_density=vd, recent_size=R)
    c = pol.finalize(cache, Observation(cache=cache, config=CFG), None)
    one = jax.tree_util.tree_map(lambda x: x[0], c)
    rk, rv = CSKV.rank(kd, D), CSKV.rank(vd, D)
    assert one.latent_k.shape[-1] == rk and one.latent_v.shape[-1] == rv
    rng = np.random.default_rng(2)
    q = rng.normal(size=(B, HKV * G, 2, D))
    qpos = np.array([[S, S + 1], [S - 3, S - 2]])
    out, _ = jax.jit(lambda cc, qq, pp: cc.attend(qq, pp, observe=Observe(),
                                                  rope=lambda x, p: apply_rope(x, p, CFG)))(
        one, jnp.asarray(q, jnp.float32), jnp.asarray(qpos, jnp.int32))
    ref = np_attend(q, qpos, kp, post, v, pos, rk, rv)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    if kd < 1:   # the low rank changes the output and the latent part takes (rk + rv) / 2d of the bytes
        full = np_attend(q, qpos, kp, post, v, pos, D, D)
        assert np.abs(full - ref).max() > 1e-3
        old_full = B * HKV * one.latent_k.shape[-2] * 2 * D * 4
        old_lat = B * HKV * one.latent_k.shape[-2] * (rk + rv) * 4
        assert kvcache.tree_bytes((one.latent_k, one.latent_v)) == old_lat < old_full


def test_cskv_appends_full_width_and_bad_input():
    cache, *_ = case(3)
    c = jax.tree_util.tree_map(lambda x: x[0], CSKV(recent_size=R).finalize(cache, Observation(cache=cache, config=CFG), None))
    c = c.resize(c.capacity + 2)
    new = c.append(jnp.ones((B, HKV, 1, D)), jnp.ones((B, HKV, 1, D)), jnp.full((B, 1), S, jnp.int32))
    np.testing.assert_array_equal(np.asarray(new.lengths), np.asarray(c.lengths) + 1)
    assert isinstance(new, CSKVCache)
    with pytest.raises(ValueError, match="k_density"):
        CSKV(k_density=0.0)
    with pytest.raises(ValueError, match="v_density"):
        CSKV(v_density=1.5)
    with pytest.raises(ValueError, match="recent_size"):
        CSKV(recent_size=-1)


@pytest.mark.skipif(os.environ.get("KVJAX_MERGING_REAL") != "1",
                    reason="opt-in (KVJAX_MERGING_REAL=1): ~100 s of compile on 2 cores, over the suite budget")
def test_generate_cskv_on_smollm2(smollm2, smollm2_tokenizer):
    """The one real-model generate of this file: CSKV (a new cache type: SVD latents for the older
    tokens, rebuilt and rotated in every layer's attention, through prefill, compression and the
    decode loop) on SmolLM2 at 50% tokens; bytes below a 50% dense cache. KVMerger/CAM/D2O/EMS/
    KVCrush share the dense merge/selection path whose engine run is the eval of the report (one
    real-model generate per test file keeps the suite's time budget)."""
    from kvjax.eval.text import kjv_text
    from kvjax.generate import generate
    from kvjax.compression import Compression
    from kvjax.policies import make_policy
    from kvjax.policies.base import Budget
    config, params = smollm2
    prompt = smollm2_tokenizer.encode(kjv_text()[:800])[:120]
    comp = Compression(policy=make_policy("cskv", config=config), budget=Budget(ratio=0.5))
    res = generate(params, config, [prompt], max_new_tokens=4, compression=comp)
    assert len(res.tokens[0]) == 4
    assert isinstance(res.cache, CSKVCache)
    d = config.head_dim
    n_keep = comp.budget.kept(len(prompt))                  # 60 of the 120 prompt tokens
    assert res.cache.latent_k.shape[-1] == d // 4 and res.cache.latent_v.shape[-1] == 3 * d // 4   # rk + rv of 2d
    assert int((res.cache.old_positions >= 0).sum(-1).max()) == n_keep - 32
    np.testing.assert_array_equal(np.asarray(res.cache.recent.lengths), 32 + res.stats["decode_steps"])   # 3 appended
    dense_half = config.n_layers * config.n_kv_heads * (n_keep + 4) * 2 * d * 4
    assert res.cache.memory_bytes() < dense_half
