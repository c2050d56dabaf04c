"""ZipCache (kvjax.quant.zipcache) vs float64 numpy versions of the spec's formulas (§5): normalized
attention saliency from probe queries, channel-wise keys, channel-separable token-wise values,
the 4/2-bit split of a compression round, memory accounting, errors, and the real SmolLM2."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit
from kvjax.quant import zipcache as zc
from kvjax.observation import Observe
from models.llama import forward
from closeness import assert_mostly_close


def np_stats_quant(x, lo, hi, bits):
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    mn = lo.astype(np.float16).astype(np.float64)
    codes = np.where(scale > 0, np.clip(np.round((x - mn) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1), 0)
    return codes * scale + mn


def np_keys(k, bits):
    """Channel-wise: min/max per channel over the tokens k [T, d]."""
    return np_stats_quant(k, k.min(0), k.max(0), bits)


def np_values(v, bits):
    """Channel-separable token-wise: s_c = sqrt(max_t |v_tc|), per-token min/max of v / s."""
    s = np.sqrt(np.abs(v).max(0)).astype(np.float16).astype(np.float64)
    y = v / s
    return np_stats_quant(y, y.min(1, keepdims=True), y.max(1, keepdims=True), bits) * s


def np_saliency(q, k, qpos, kpos):
    """Normalized attention of queries q [Hq, P, d] over keys k [H, S, d] (causal by positions,
    -1 = empty), summed over GQA groups: [H, S] = sum_i A_ij / #{i: qpos_i >= kpos_j}."""
    hq, h = q.shape[0], k.shape[0]
    g = hq // h
    out = np.zeros(k.shape[:2])
    for head in range(hq):
        kv = head // g
        s = q[head] @ k[kv].T / np.sqrt(q.shape[-1])
        vis = (kpos[kv][None, :] >= 0) & (kpos[kv][None, :] <= qpos[:, None])
        s = np.where(vis, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        out[kv] += a.sum(0)
    nnz = ((kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[None, :, None])).sum(1)
    return np.where(nnz > 0, out / np.maximum(nnz, 1), 0.0)


@pytest.fixture(scope="module")
def real(smollm2_jax, smollm2_tokenizer):
    config, params = smollm2_jax
    ids = smollm2_tokenizer.encode(kjv_text(book="John", n_chars=800))[:97]
    t = len(ids)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    logits, cache, _ = forward_jit(params, jnp.asarray(ids)[None], jnp.arange(t, dtype=jnp.int32)[None], cache,
                                     config, Observe(qkv=True), all_logits=True)  # one compile for all quant tests
    return np.asarray(cache.keys[:, 0]), np.asarray(cache.values[:, 0]), ids, logits


# ----------------------------------------------------------------------------- pure pieces


def test_normalized_saliency_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 6, 8))
    k = rng.standard_normal((2, 10, 8))
    kpos = np.tile(np.r_[np.arange(9), -1], (2, 1))
    qpos = np.array([2, 4, 5, 6, 7, 8])
    logits = np.einsum("hpd,hsd->hps", q.reshape(2, 2, 6, 8).reshape(4, 6, 8), np.repeat(k, 2, 0)) / np.sqrt(8)
    vis = (kpos[np.repeat([0, 1], 2)][:, None, :] >= 0) & (kpos[np.repeat([0, 1], 2)][:, None, :] <= qpos[None, :, None])
    a = np.where(vis, np.exp(logits - np.where(vis, logits, -np.inf).max(-1, keepdims=True)), 0)
    a = a / a.sum(-1, keepdims=True)
    probs = a.reshape(2, 2, 6, 10).sum(1)                               # summed over the GQA group
    got = zc.normalized_saliency(jnp.asarray(probs[None]), jnp.asarray(np.tile(qpos, (1, 2, 1))),
                                 jnp.asarray(kpos[None]))
    np.testing.assert_allclose(np.asarray(got[0]), np_saliency(q, k, qpos, kpos), atol=1e-6)


def test_probe_indices():
    idx = zc.probe_indices(200, 0.05, 0.05, seed=3)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert set(range(190, 200)) <= set(idx.tolist()) and (idx[:10] < 190).all()
    np.testing.assert_array_equal(zc.probe_indices(7, 0.05, 0.05), [6])


@pytest.mark.parametrize("bits", [2, 4])
def test_quantizers_match_numpy_random_and_real(bits, real):
    rng = np.random.default_rng(bits)
    keys, values = real[:2]
    for k, v in ((rng.standard_normal((40, 32)) * np.linspace(0.1, 4, 32), rng.standard_normal((40, 32))),
                 (keys[5, 1, :57], values[5, 1, :57]), (keys[20, 0, 3:64], values[20, 0, 3:64])):
        mask = np.ones(len(k), bool)
        mask[::3] = False                                                # stats over the masked subset
        kc, ks, km = zc.quantize_keys_channelwise(jnp.asarray(k, jnp.float32), jnp.asarray(mask), bits)
        got_k = np.asarray(zc.dequantize_keys_channelwise(kc, ks, km))[mask]
        vc, vs, vm, ch = zc.quantize_values_channel_separable(jnp.asarray(v, jnp.float32), jnp.asarray(mask), bits)
        got_v = np.asarray(zc.dequantize_values_channel_separable(vc, vs, vm, ch))[mask]
        assert kc.dtype == jnp.uint8 and ks.dtype == jnp.float16 and ch.dtype == jnp.float16
        want_k, want_v = np_keys(np.asarray(k, np.float64)[mask], bits), np_values(np.asarray(v, np.float64)[mask], bits)
        # tolerance: float16 statistics may round to a neighbouring float16 (relative 1e-3)
        tol = lambda w: 1e-3 + 2e-3 * np.abs(w).max()
        assert_mostly_close(got_k, want_k, tol(want_k), np.ptp(k) / (2 ** bits - 1), frac=0.02)
        assert_mostly_close(got_v, want_v, tol(want_v), np.ptp(v) / (2 ** bits - 1) * np.sqrt(np.abs(v).max()))


# ----------------------------------------------------------------------------- compression rounds


def _layer(cache):
    return jax.tree_util.tree_map(lambda x: x[0], cache)


def _np_round(layer, q, qpos, cfg):
    """Expected (hi positions, lo positions, dequantized k/v per position) of one round, per head,
    for the tokens buffered in `layer` scored by the probe queries among q [Hq, T, d]."""
    kview, _ = zc.dense_view(layer)
    kview, posview = np.asarray(kview[0], np.float64), np.asarray(layer.positions[0])
    kb, vb = np.asarray(layer.buf_k[0], np.float64), np.asarray(layer.buf_v[0], np.float64)
    bpos = np.asarray(layer.buf_pos[0])
    idx = zc.probe_indices(q.shape[1], cfg.probe_recent, cfg.probe_random, cfg.seed)
    sal = np_saliency(q[:, idx], kview, qpos[idx], posview)[:, -kb.shape[1]:]
    out = []
    for h in range(kb.shape[0]):
        valid = np.where(bpos[h] >= 0)[0]
        order = valid[np.argsort(-sal[h, valid], kind="stable")]
        n_hi = int(np.round(cfg.hi_fraction * len(valid)))
        res = {}
        for name, sel, bits in (("hi", np.sort(order[:n_hi]), cfg.hi_bits), ("lo", np.sort(order[n_hi:]), cfg.lo_bits)):
            res[name] = (bpos[h, sel], np_keys(kb[h, sel], bits), np_values(vb[h, sel], bits))
        out.append(res)
    return out


def _check_pool(cache_layer, expected, which):
    kview, vview = zc.dense_view(cache_layer)
    pos = np.asarray(cache_layer.positions[0])
    ch = cache_layer.hi_pos.shape[-1]
    cl = cache_layer.lo_pos.shape[-1]
    rng_ = slice(0, ch) if which == "hi" else slice(ch, ch + cl)
    for h, res in enumerate(expected):
        want_pos, want_k, want_v = res[which]
        got_pos = pos[h, rng_]
        rows = [np.where(got_pos == p)[0] for p in want_pos]
        assert all(len(r) == 1 for r in rows), f"{which} pool of head {h} lacks tokens {want_pos}"
        rows = np.concatenate(rows) + rng_.start
        bits = 4 if which == "hi" else 2
        tol = lambda w: 1e-3 + 2e-3 * np.abs(w).max()
        assert_mostly_close(np.asarray(kview[0, h])[rows], want_k, tol(want_k), np.ptp(want_k) / (2 ** bits - 1), frac=0.02)
        assert_mostly_close(np.asarray(vview[0, h])[rows], want_v, tol(want_v), np.ptp(want_v), frac=0.02)


def test_two_compression_rounds_match_numpy():
    rng = np.random.default_rng(5)
    h, hq, d, n1, n2 = 2, 4, 16, 21, 7
    cfg = zc.ZipCacheConfig(probe_recent=0.2, probe_random=0.2)
    cache = zc.init_zipcache(cfg, 1, 1, h, d, capacity=40, buffer=24)
    k = rng.standard_normal((1, h, n1 + n2, d)).astype(np.float32) * 2
    v = rng.standard_normal((1, h, n1 + n2, d)).astype(np.float32)
    q = rng.standard_normal((1, hq, n1 + n2, d)).astype(np.float32) * 2
    pos = np.arange(n1 + n2, dtype=np.int32)[None]
    layer = _layer(cache).append(jnp.asarray(k[:, :, :n1]), jnp.asarray(v[:, :, :n1]), jnp.asarray(pos[:, :n1]))
    exp1 = _np_round(layer, q[0, :, :n1], pos[0, :n1], cfg)
    stacked = jax.tree_util.tree_map(lambda x: x[None], layer)
    stacked = jax.jit(zc.compress)(stacked, jnp.asarray(q[None, :, :, :n1]), jnp.asarray(pos[:, :n1]))
    layer = _layer(stacked)
    n_hi = round(0.6 * n1)
    np.testing.assert_array_equal(np.asarray(layer.hi_len), [[n_hi, n_hi]])
    np.testing.assert_array_equal(np.asarray(layer.lo_len), [[n1 - n_hi, n1 - n_hi]])
    assert int(layer.buf_len.max()) == 0
    _check_pool(layer, exp1, "hi")
    _check_pool(layer, exp1, "lo")
    # second round: new tokens, scored by their own probe queries over everything the cache holds
    layer = layer.append(jnp.asarray(k[:, :, n1:]), jnp.asarray(v[:, :, n1:]), jnp.asarray(pos[:, n1:]))
    exp2 = _np_round(layer, q[0, :, n1:], pos[0, n1:], cfg)
    layer = _layer(jax.jit(zc.compress)(jax.tree_util.tree_map(lambda x: x[None], layer), jnp.asarray(q[None, :, :, n1:]),
                               jnp.asarray(pos[:, n1:])))
    _check_pool(layer, exp1, "hi")                                          # round 1 unchanged
    _check_pool(layer, exp2, "hi")
    _check_pool(layer, exp2, "lo")
    assert int(layer.n_rounds[0, 0]) == 2


def test_memory_bytes():
    cfg = zc.ZipCacheConfig()
    d, cap, buf, L, H = 64, 1000, 100, 2, 3
    cache = zc.init_zipcache(cfg, L, 1, H, d, capacity=cap, buffer=buf, dtype=jnp.float16)
    r = cap // 100 + 2
    ch, cl = math.ceil(0.6 * cap) + r, math.ceil(0.4 * cap) + r
    per_row = (ch * (2 * d // 2 + 2 * 2 + 4) + cl * (2 * d // 4 + 2 * 2 + 4)       # codes, value step/min, position
               + r * 2 * (3 * d * 2 + 4)                                           # per-round stats + start
               + buf * (2 * d * 2 + 4) + 5 * 4)                                    # buffer, counters
    assert cache.memory_bytes() == L * H * per_row
    # the pools for the 1000 tokens take ~1/4 of an fp16 dense cache of 1000 tokens
    pools = L * H * (ch * (d + 8) + cl * (d // 2 + 8) + r * 2 * (6 * d + 4))
    assert pools < 0.3 * init_cache(L, 1, H, cap, d, jnp.float16).memory_bytes()


def test_bad_inputs():
    with pytest.raises(ValueError, match="hi_bits"):
        zc.ZipCacheConfig(hi_bits=3).validate(64)
    with pytest.raises(ValueError, match="unimportant_ratio"):
        zc.ZipCacheConfig(unimportant_ratio=1.5).validate(64)
    with pytest.raises(ValueError, match="positive"):
        zc.init_zipcache(zc.ZipCacheConfig(), 1, 1, 2, 64, capacity=0, buffer=8)
    layer = _layer(zc.init_zipcache(zc.ZipCacheConfig(), 1, 1, 2, 16, capacity=8, buffer=4))
    x = jnp.ones((1, 2, 6, 16))
    with pytest.raises(ValueError, match="NaN"):
        layer.append(x * jnp.nan, x, jnp.arange(6)[None])
    over = layer.append(x, x, jnp.arange(6)[None])
    with pytest.raises(ValueError, match="overflowed"):
        zc.check_buffer(over)
    with pytest.raises(ValueError, match="qkv"):
        zc.queries_from_obs({}, jnp.arange(6)[None], None)


# ----------------------------------------------------------------------------- real model


def test_smollm2_prefill_compress_decode(smollm2_jax, real):
    config, params = smollm2_jax
    n, steps = 90, 6
    ids, full = jnp.asarray(real[2][:n + steps])[None], real[3]      # full-cache logits of the 96 tokens
    pos = jnp.arange(n + steps, dtype=jnp.int32)[None]
    cache = zc.init_zipcache(zc.ZipCacheConfig(), config.n_layers, 1, config.n_kv_heads, config.head_dim,
                             capacity=n, buffer=n)
    fwd = jax.jit(forward, static_argnums=(4, 5))
    logits, cache, obs = fwd(params, ids[:, :n], pos[:, :n], cache, config, Observe(qkv=True))
    cache = jax.jit(zc.compress)(cache, zc.queries_from_obs(obs, pos[:, :n], config), pos[:, :n])
    assert int(cache.hi_len[0, 0, 0]) == 54 and int(cache.lo_len[0, 0, 0]) == 36
    out = [logits[0, -1]]                       # the prefill itself ran over the fp buffer
    for t in range(n, n + steps):
        logits, cache, _ = fwd(params, ids[:, t:t + 1], pos[:, t:t + 1], cache, config, Observe())
        out.append(logits[0, -1])
    zc.check_buffer(cache)
    out = jnp.stack(out)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(full[0, n - 1]), atol=1e-3)
    lp, lq = jax.nn.log_softmax(full[0, n:n + steps], -1), jax.nn.log_softmax(out[1:], -1)
    kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
    assert kl.mean() < 0.1, kl
    assert kl.mean() > 1e-6                     # the decode steps really read quantized tokens
