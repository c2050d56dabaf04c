"""Effectively-Compress-KV-Heads: groups of kv heads merged through the SVD subspace of their
calibration keys / values. Bases vs a float64 numpy SVD; attention through the merged cache (GQA,
a decoded token merged on append) vs a float64 numpy reference with an independent RoPE;
group = 1, rank = d is exact; bytes shrink by the group; calibration and range errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation, Observe
from kvjax.policies import Budget, make_policy
from kvjax.policies.attention_gate import _Frozen
from kvjax.policies.kv_head_merge import HeadMergeCache, KVHeadMerge, calibration_bases
from models.config import ModelConfig
from models.rope import apply_rope
from tests.numpy_reference import _rope_complex

L, B, HKV, G, S, D, T = 2, 2, 4, 2, 9, 8, 40
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=32, n_layers=L, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=64, rope_theta=10000.0)


def np_bases(x, group, rank):
    """[L, 1, Hkv, T, d] -> [L, Hkv/g, g*d, rank]: top right singular vectors of the concatenated heads."""
    out = np.zeros((x.shape[0], x.shape[2] // group, group * x.shape[-1], rank))
    for l in range(x.shape[0]):
        for j in range(x.shape[2] // group):
            m = np.concatenate([x[l, 0, j * group + i] for i in range(group)], axis=-1)   # [T, g*d]
            out[l, j] = np.linalg.svd(m, full_matrices=False)[2][:rank].T
    return out


def rope_np(x, pos):
    return _rope_complex(x[:, None], np.maximum(pos, 0), CFG.rope_theta)[:, 0]


def case(seed=0):
    """Correlated heads (so merging keeps most of the signal): calibration [L, 1, Hkv, T, d] and a
    live-first cache of pre-RoPE keys / values [L, B, Hkv, S, d] (row 1 holds S-2 tokens)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(HKV, D, D)) / np.sqrt(D)
    def draw(*lead):
        z = rng.normal(size=lead + (1, D))
        return np.einsum("...xd,hde->...he", z, mix) + 0.3 * rng.normal(size=lead + (HKV, D))
    ck, cv = draw(L, 1, T).transpose(0, 1, 3, 2, 4), draw(L, 1, T).transpose(0, 1, 3, 2, 4)
    kp, v = draw(L, B, S).transpose(0, 1, 3, 2, 4), draw(L, B, S).transpose(0, 1, 3, 2, 4)
    pos = np.broadcast_to(np.arange(S), (L, B, HKV, S)).copy()
    pos[:, 1, :, S - 2:] = -1
    post = np.zeros_like(kp)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                post[l, b, h] = rope_np(kp[l, b, h], pos[l, b, h])
    cache = kvcache.KVCache(keys=jnp.asarray(post, jnp.float32), values=jnp.asarray(v, jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.asarray((pos >= 0).sum(-1), jnp.int32))
    return ck, cv, kp, v, pos, cache


def merged(ck, cv, cache, group, rank):
    bk, bv = calibration_bases(jnp.asarray(ck, jnp.float32), jnp.asarray(cv, jnp.float32), group, rank, rank)
    pol = KVHeadMerge(group=group, rank=rank, bases=_Frozen({"k": bk, "v": bv}))
    return jax.jit(lambda c: pol.finalize(c, Observation(cache=c, config=CFG), None))(cache), bk, bv


def np_attention(q, qpos, keys, vals, kpos):
    out = np.zeros(q.shape)
    for b in range(B):
        for hq in range(HKV * G):
            h = hq // G
            live = kpos[b, h] >= 0
            w = np.exp(keys[b, h][live] @ q[b, hq, 0] / np.sqrt(D))
            out[b, hq, 0] = w @ vals[b, h][live] / w.sum()
    return out


@pytest.mark.parametrize("group,rank", [(2, D), (4, 6)])
def test_merged_attention_matches_numpy(group, rank):
    ck, cv, kp, v, pos, cache = case()
    out, bk, bv = merged(ck, cv, cache, group, rank)
    nbk, nbv = np_bases(ck, group, rank), np_bases(cv, group, rank)
    for got, ref in ((bk, nbk), (bv, nbv)):                 # same subspaces (signs of singular vectors free)
        proj = lambda u: np.einsum("...cr,...er->...ce", u, u)
        np.testing.assert_allclose(proj(np.asarray(got, np.float64)), proj(ref), atol=2e-4)
    assert out.latent_k.shape == (L, B, HKV // group, S, rank)
    # one decoded token (merged on append), then attention of layer 1 (GQA: 2 query heads / kv head)
    rng = np.random.default_rng(1)
    kn, vn = rng.normal(size=(B, HKV, 1, D)), rng.normal(size=(B, HKV, 1, D))
    q = rng.normal(size=(B, HKV * G, 1, D))
    qpos = np.array([[S], [S - 2]])
    rope = lambda x, p: apply_rope(x, p, CFG)
    lc = jax.tree_util.tree_map(lambda x: x[1], out.resize(S + 1))
    kn_post = np.stack([[rope_np(kn[b, h], qpos[b]) for h in range(HKV)] for b in range(B)])

    @jax.jit
    def step(lc, kn_post, vn, qpos, kn, q):
        lc = lc.append(kn_post, vn, qpos, keys_pre_rope=kn)
        return lc.attend(q, qpos, observe=Observe(), rope=rope)[0]

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = step(lc, f32(kn_post), f32(vn), jnp.asarray(qpos, jnp.int32), f32(kn), f32(q))
    # reference: every token of a group projected onto U U^T, split back into heads, RoPE at its position
    allk = np.concatenate([kp[1], kn], axis=2)
    allv = np.concatenate([v[1], vn], axis=2)
    allpos = np.concatenate([pos[1], np.broadcast_to(qpos[:, None, :], (B, HKV, 1))], axis=2)
    rk, rv = np.zeros_like(allk), np.zeros_like(allv)
    for j in range(HKV // group):
        hs = slice(j * group, (j + 1) * group)
        for src, dst, u in ((allk, rk, nbk[1, j]), (allv, rv, nbv[1, j])):
            cat = np.concatenate([src[:, h] for h in range(j * group, (j + 1) * group)], axis=-1)   # [B, S+1, g*d]
            rec = cat @ u @ u.T
            dst[:, hs] = rec.reshape(B, S + 1, group, D).transpose(0, 2, 1, 3)
    for b in range(B):
        for h in range(HKV):
            rk[b, h] = rope_np(rk[b, h], allpos[b, h])
    ref = np_attention(q, qpos, rk, rv, allpos)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    plain = np_attention(q, qpos, np.concatenate([np.asarray(cache.keys)[1], kn_post], 2),
                         np.concatenate([v[1], vn], 2), allpos)
    assert not np.allclose(ref, plain, atol=1e-3)              # the merge really changes the heads


def test_group_one_full_rank_is_exact_and_bytes_shrink_with_the_group():
    ck, cv, kp, v, pos, cache = case(2)
    exact, _, _ = merged(ck, cv, cache, 1, D)
    q = jnp.asarray(np.random.default_rng(3).normal(size=(B, HKV * G, 1, D)), jnp.float32)
    qpos = jnp.asarray([[S - 1], [S - 3]], jnp.int32)
    rope = lambda x, p: apply_rope(x, p, CFG)
    one = lambda c: jax.tree_util.tree_map(lambda x: x[0], c)
    got, _ = one(exact).attend(q, qpos, observe=Observe(), rope=rope)
    ref, _ = one(cache).attend(q, qpos, observe=Observe(), backend="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    half, _, _ = merged(ck, cv, cache, 2, D)
    f, i = 4, 4
    full = L * B * HKV * (S * (2 * D * f + i) + i)
    assert cache.memory_bytes() == full
    assert half.memory_bytes() == L * B * 2 * (S * (2 * D * f + i) + i)         # half the heads' tokens
    assert half.basis_bytes() == L * 2 * 2 * (2 * D) * D * f                     # weights, reported apart
    assert half.memory_bytes() < full


def test_generate_through_make_policy():
    """make_policy calibrates on random ids; group 1 at full rank generates as the full cache."""
    from kvjax.compression import Compression
    from kvjax.generate import generate
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(0))
    prompts = [list(range(1, 20)), list(range(3, 14))]
    full = generate(params, CFG, prompts, 4)
    pol = make_policy("kv_head_merge", params=params, config=CFG, calibration="random", calib_tokens=64, group=1)
    out = generate(params, CFG, prompts, 4, compression=Compression(pol, Budget(ratio=1.0)))
    assert isinstance(out.cache, HeadMergeCache) and out.tokens == full.tokens


def test_bad_input():
    params = {"unused": 0}
    with pytest.raises(ValueError, match="calibration"):
        make_policy("kv_head_merge", params=params, config=CFG)
    with pytest.raises(ValueError, match="calibration"):
        make_policy("kv_head_merge", params=params, config=CFG, calibration="wiki")
    with pytest.raises(ValueError, match="does not divide"):
        KVHeadMerge.from_calibration(params, CFG, [1, 2, 3], group=3)
    with pytest.raises(ValueError, match="rank"):
        KVHeadMerge.from_calibration(params, CFG, [1, 2, 3], group=2, rank=2 * D + 1)
    with pytest.raises(ValueError, match="group"):
        KVHeadMerge(group=0)
    with pytest.raises(ValueError, match="calibration"):
        KVHeadMerge().finalize(None, None, None)
