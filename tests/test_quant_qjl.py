"""QJL key sketch + estimator vs a float64 numpy reference of the spec formula."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import qjl
from test_quant_kivi import assert_matches_ref

CFG = qjl.QJLConfig(sketch_dim=64, outlier_sketch_dim=32, outlier_count=4, group=8, buffer=16,
                    value_bits=2, value_group=8, value_residual=16)
D = 32


def ref_scores(q, keys, S, cfg):
    """Spec estimator with q~ = S^T q, q~_out = S[outl,:]^T q[outl]; keys [T, d] (T % group == 0),
    q [d] -> [T] float64 estimates of <q, k>, with the norms stored in fp16."""
    keys, S, q = np.asarray(keys, np.float64), np.asarray(S, np.float64), np.asarray(q, np.float64)
    t, d = keys.shape
    m, mo = S.shape[1], cfg.outlier_sketch_dim
    out = np.zeros(t)
    for g0 in range(0, t, cfg.group):
        kg = keys[g0:g0 + cfg.group]
        outl = np.argsort(-np.sum(kg * kg, 0), kind="stable")[: cfg.outlier_count]
        qt = S.T @ q
        qt_out = S[outl].T @ q[outl]
        for i, k in enumerate(kg):
            k_out = np.zeros(d)
            k_out[outl] = k[outl]
            k_in = k - k_out
            s_in = np.where(k_in @ S >= 0, 1.0, -1.0)
            s_out = np.where(k_out @ S[:, :mo] >= 0, 1.0, -1.0)
            n = float(np.float16(np.linalg.norm(k)))
            no = float(np.float16(np.linalg.norm(k_out)))
            n_in = math.sqrt(max(n * n - no * no, 0.0))
            out[g0 + i] = (math.sqrt(math.pi / 2) / m * n_in * np.sum(s_in * (qt - qt_out))
                           + math.sqrt(math.pi / 2) / mo * no * np.sum(s_out * qt_out[:mo]))
    return out


def test_sketch_is_orthogonalised_gaussian():
    S = np.asarray(qjl.make_sketch(jax.random.PRNGKey(0), D, 96), np.float64)
    for b in range(3):
        blk = S[:, b * D:(b + 1) * D]
        np.testing.assert_allclose(blk.T @ blk, D * np.eye(D), atol=1e-3)


def test_estimator_matches_numpy_reference_and_outliers():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((24, D)).astype(np.float32)
    keys[:, 5] *= 8                                    # an outlier channel
    q = rng.standard_normal(D).astype(np.float32)
    S = qjl.make_sketch(jax.random.PRNGKey(1), D, CFG.sketch_dim)
    packed = qjl.quantize_keys(jnp.asarray(keys), S, CFG)
    sign, out_sign, norm, out_norm, idx = packed
    assert sign.shape == (24, 8) and out_sign.shape == (24, 4) and idx.shape == (3, 4) and sign.dtype == jnp.uint8
    for g in range(3):
        kg = keys[g * 8:(g + 1) * 8].astype(np.float64)
        want = set(np.argsort(-np.sum(kg * kg, 0))[:4])
        assert set(np.asarray(idx[g]).tolist()) == want and 5 in want
    got = np.asarray(qjl.effective_keys(*packed, S, CFG), np.float64) @ q
    np.testing.assert_allclose(got, ref_scores(q, keys, S, CFG), rtol=1e-4, atol=1e-4)


def test_estimator_is_unbiased():
    """Mean of the estimate over many independent sketches -> <q, k> (within 5 standard errors)."""
    rng = np.random.default_rng(1)
    keys = jnp.asarray(rng.standard_normal((8, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal(D), jnp.float32)
    cfg = qjl.QJLConfig(sketch_dim=32, outlier_sketch_dim=32, outlier_count=2, group=8, buffer=8, value_group=8)

    def one(key):
        S = qjl.make_sketch(key, D, cfg.sketch_dim)
        return qjl.effective_keys(*qjl.quantize_keys(keys, S, cfg), S, cfg) @ q

    est = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(2), 2000)), np.float64)
    true = np.asarray(keys, np.float64) @ np.asarray(q, np.float64)
    se = est.std(0) / np.sqrt(est.shape[0])
    assert np.all(np.abs(est.mean(0) - true) < 5 * se + 1e-3)
    assert np.all(est.std(0) > 0)


@pytest.mark.parametrize("chunks", [(39, 1), (40,)])
def test_cache_buffer_rule_and_contents(chunks):
    rng = np.random.default_rng(2)
    T = sum(chunks)
    K = rng.standard_normal((1, 2, T, D)).astype(np.float32)
    V = rng.standard_normal((1, 2, T, D)).astype(np.float32)
    layer = jax.tree_util.tree_map(lambda a: a[0], qjl.init_qjl_cache_from(CFG, 1, 1, 2, 48, D))
    s = 0
    for n in chunks:
        layer = layer.append(jnp.asarray(K[:, :, s:s + n]), jnp.asarray(V[:, :, s:s + n]),
                             jnp.arange(s, s + n)[None])
        s += n
    kq, vq = (T // 16) * 16, T - 16
    np.testing.assert_array_equal(np.asarray(layer.k_len), kq)
    np.testing.assert_array_equal(np.asarray(layer.v_len), vq)
    k, v = qjl.dequantize(layer)
    k, v = np.asarray(k, np.float64), np.asarray(v)
    S = layer.sketch
    q = rng.standard_normal(D)
    for h in range(2):
        np.testing.assert_allclose(k[0, h, :kq] @ q, ref_scores(q, K[0, h, :kq], S, CFG), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(k[:, :, kq:T], K[:, :, kq:])                 # fp buffer exact
    assert_matches_ref(v[:, :, :vq], V[:, :, :vq], 2, 8, axis=-1)              # KIVI values per token
    np.testing.assert_array_equal(v[:, :, vq:T], V[:, :, vq:])
    big = qjl.resize(layer, 70)                                                # kvjax.cache.resize dispatches here
    assert big.capacity == 72
    kb, vb = qjl.dequantize(big)
    np.testing.assert_array_equal(np.asarray(kb, np.float64)[:, :, :T], k[:, :, :T])
    np.testing.assert_array_equal(np.asarray(vb)[:, :, :T], v[:, :, :T])
    with pytest.raises(ValueError, match="cannot shrink"):
        qjl.resize(layer, 16)


def test_accounting_and_bad_input():
    # d=128 defaults: 32 + 32 B of signs + 4 B norms + 8/32 B of indices = 68.25 B -> 4.27 bit/coord
    assert qjl.key_bytes_per_token(128, qjl.QJLConfig()) == 68.25
    assert qjl.key_bits_per_coordinate(128, qjl.QJLConfig()) == pytest.approx(4.265625)
    assert qjl.key_bits_per_coordinate(64, qjl.QJLConfig()) == pytest.approx(8.53125)
    c = qjl.init_qjl_cache_from(CFG, 2, 1, 3, 32, D)
    key_arrays = (c.k_sign, c.k_out_sign, c.k_norm, c.k_out_norm, c.k_out_idx)
    assert sum(a.nbytes for a in key_arrays) == qjl.key_bytes_per_token(D, CFG) * 2 * 3 * 32
    assert c.memory_bytes() == sum(x.nbytes for x in jax.tree_util.tree_leaves(c)) - c.sketch.nbytes
    with pytest.raises(ValueError, match="multiple of head_dim"):
        qjl.init_qjl_cache_from(qjl.QJLConfig(sketch_dim=48), 1, 1, 1, 32, D)
    with pytest.raises(ValueError, match="outlier_count"):
        qjl.init_qjl_cache_from(qjl.QJLConfig(outlier_count=40), 1, 1, 1, 32, D)
    with pytest.raises(ValueError, match="multiple of group"):
        qjl.init_qjl_cache_from(qjl.QJLConfig(buffer=20), 1, 1, 1, 32, D)
    layer = jax.tree_util.tree_map(lambda a: a[0], c)
    bad = np.zeros((1, 3, 2, D), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layer.append(jnp.asarray(bad), jnp.zeros((1, 3, 2, D)), jnp.arange(2)[None])


def test_real_smollm2_prefill_with_qjl_cache(smollm2, smollm2_tokenizer):
    from kvjax import cache as kvcache
    from kvjax.eval.text import kjv_text
    from kvjax.generate import forward_jit
    from kvjax.observation import Observe
    config, params = smollm2
    ids = smollm2_tokenizer.encode(kjv_text(n_chars=400))[:40]
    toks, pos = jnp.asarray([ids]), jnp.arange(40)[None]
    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 48, config.head_dim)
    ld, _, _ = forward_jit(params, toks, pos, dense, config, all_logits=True)
    cfg = qjl.QJLConfig(buffer=32, value_residual=32)
    cache = qjl.init_qjl_cache(config, 1, 48, cfg)
    lq, cache, obs = forward_jit(params, toks, pos, cache, config, Observe(qkv=True), all_logits=True)
    np.testing.assert_array_equal(np.asarray(cache.k_len), 32)
    # the cache's keys reproduce the spec estimator on the real post-RoPE keys it was given
    from models.rope import apply_rope
    layer = jax.tree_util.tree_map(lambda a: a[12], cache)
    k_rot = np.asarray(apply_rope(obs["k_pre"][12], pos, config))[0, 1, :32]
    q = np.random.default_rng(0).standard_normal(config.head_dim)
    k_eff, _ = qjl.dequantize(layer)
    np.testing.assert_allclose(np.asarray(k_eff, np.float64)[0, 1, :32] @ q,
                               ref_scores(q, k_rot, layer.sketch, cfg), rtol=1e-3, atol=1e-3)
    assert np.isfinite(np.asarray(lq)).all()
    # the keys of tokens 0..31 were sketched (one buffer flush): the last position's next-token
    # distribution stays close to the full cache's (loose bound: QJL is noisy at d = 64)
    pf, pq = jax.nn.log_softmax(ld[0, -1]), jax.nn.log_softmax(lq[0, -1])
    assert float(jnp.sum(jnp.exp(pf) * (pf - pq))) < 1.0
