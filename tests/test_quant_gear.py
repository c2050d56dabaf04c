"""GEAR (kvjax.quant.gear) vs a float64 numpy implementation of the spec's formulas (§4):
outliers + group quantization + power-iteration low rank, the streaming cache, memory accounting,
errors, and a run of the real SmolLM2 with the GEAR cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit
from kvjax.quant import gear
from kvjax.observation import Observe
from models.llama import forward
from closeness import assert_mostly_close

# ----------------------------------------------------------------------------- numpy reference


def np_quant(x, bits, group, axis):
    """Asymmetric min-max RTN with float16 scale/min, groups along `axis` -> dequantized float64."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    shp = x.shape
    xg = x.reshape(shp[:-1] + (shp[-1] // group, group))
    lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    mn = lo.astype(np.float16).astype(np.float64)
    codes = np.where(scale > 0, np.clip(np.round((xg - mn) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1), 0)
    return np.moveaxis((codes * scale + mn).reshape(shp), -1, axis)


def np_gear(x, kind, bits, group, rank, loop, ratio, p0):
    """GEAR's X ~ D_S + L for one [n, d] piece, from the spec (and GEAR's compress_function)."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    vecs = x.T.copy() if kind == "key" else x.copy()          # rows = the vectors outliers are taken in
    k = 0 if ratio <= 0 else min(max(1, int(ratio * vecs.shape[1] / 2)), vecs.shape[1] // 2)
    filled = vecs.copy()
    masks = np.zeros_like(vecs, bool)
    for i, row in enumerate(vecs):
        order = np.argsort(row, kind="stable")
        idx = np.concatenate([order[:k], order[len(row) - k:]]) if k else np.zeros(0, int)
        filled[i, idx] = row.mean()
        masks[i, idx] = True
    if kind == "key":
        dq = np_quant(filled.T, bits, group, axis=0)
        mask = masks.T
    else:
        dq = np_quant(filled, bits, group, axis=1)
        mask = masks
    dq_s = np.where(mask, x.astype(np.float16).astype(np.float64), dq)
    e = x - dq_s
    p = np.asarray(p0, np.float64)[:, :rank]
    for i in range(loop):
        if i == loop - 1:
            p = np.linalg.qr(p)[0]
        q = e @ p
        if i == loop - 1:
            q = np.linalg.qr(q)[0]
        p = e.T @ q
    return dq_s + q @ p.T, dq_s


CFG = gear.GEARConfig(bits=2, group=32, streaming_gap=32, rank=2, prefill_rank=4, loop=3, outlier_ratio=0.02)


@pytest.fixture(scope="module")
def real_kv(smollm2_jax, smollm2_tokenizer):
    """Pre-RoPE k, v and post-RoPE cache keys of layers 0, 7, 15 of SmolLM2 on 97 KJV tokens."""
    config, params = smollm2_jax
    ids = smollm2_tokenizer.encode(kjv_text(book="Genesis", n_chars=800))[:97]
    t = len(ids)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    logits, cache, _ = forward_jit(params, jnp.asarray(ids)[None], jnp.arange(t, dtype=jnp.int32)[None], cache,
                                     config, Observe(qkv=True), all_logits=True)  # one compile for all quant tests
    layers = [0, 7, 15]
    return np.asarray(cache.keys[layers, 0]), np.asarray(cache.values[layers, 0]), logits, ids


# ----------------------------------------------------------------------------- pure decomposition


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("bits", [2, 4])
def test_compress_matches_numpy_random(kind, bits):
    x = np.random.default_rng(1).standard_normal((64, 32)) * np.linspace(0.2, 3, 32)
    p0 = np.asarray(gear.initial_p(32, 4))
    c = gear.compress(jnp.asarray(x, jnp.float32), kind, bits, 32, 4, 3, 0.05, jnp.asarray(p0))
    assert c["codes"].dtype == jnp.uint8 and c["codes"].shape == (64, 32 * bits // 8)
    assert c["scale"].dtype == jnp.float16 and c["q"].dtype == jnp.float16 and c["p"].dtype == jnp.float16
    got = np.asarray(gear.decompress(c, kind, bits, 32))
    want, dq_s = np_gear(x, kind, bits, 32, 4, 3, 0.05, p0)
    step = np.abs(x).max() * 2 / (2 ** bits - 1)
    assert_mostly_close(got, want, 1e-2 * np.abs(x - dq_s).max() + 1e-3, step)
    # the low-rank term really reduces the error of the quantized + sparse part
    assert np.linalg.norm(got - x) < 0.97 * np.linalg.norm(dq_s - x)


def test_compress_matches_numpy_real_smollm2(real_kv):
    keys, values = real_kv[:2]
    p0 = np.asarray(gear.initial_p(64, 4))
    for layer in range(3):
        for kind, data in (("key", keys), ("value", values)):
            x = data[layer, 1, :64]                         # kv-head 1, one 64-token group
            c = gear.compress(jnp.asarray(x), kind, 2, 64, 4, 3, 0.02, jnp.asarray(p0))
            got = np.asarray(gear.decompress(c, kind, 2, 64))
            want, dq_s = np_gear(x, kind, 2, 64, 4, 3, 0.02, p0)
            step = (x.max() - x.min()) / 3
            assert_mostly_close(got, want, 1e-2 * np.abs(x - dq_s).max() + 1e-3, step)
            assert np.linalg.norm(got - x) < np.linalg.norm(dq_s - x)


def test_power_iteration_is_projection_on_top_subspace():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    v, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    s = np.array([10.0, 5.0] + [0.01] * 18)
    e = (u[:, :20] * s) @ v.T
    q, p = gear.power_iteration(jnp.asarray(e, jnp.float32), gear.initial_p(20, 2), 3)
    best = (u[:, :2] * s[:2]) @ v[:, :2].T                    # Eckart-Young rank-2 optimum
    np.testing.assert_allclose(np.asarray(q @ p.T), best, atol=1e-3)
    np.testing.assert_allclose(np.asarray(q.T @ q), np.eye(2), atol=1e-5)


def test_outlier_count():
    assert gear.outlier_count(2048, 0.02) == 20
    assert gear.outlier_count(64, 0.02) == 1 and gear.outlier_count(64, 0.0) == 0


# ----------------------------------------------------------------------------- the cache


def _reference_cache(k, v, n_first, n_decode, cfg, p0):
    """float64 dense keys/values the cache must hold after a prompt of n_first and n_decode steps."""
    g, nb = cfg.group, cfg.streaming_gap
    n_pre = (n_first // g) * g
    out_k, out_v = [], []
    if n_pre:
        out_k.append(np_gear(k[:n_pre], "key", cfg.bits, g, cfg.prefill_rank, cfg.loop, cfg.outlier_ratio, p0)[0])
        out_v.append(np_gear(v[:n_pre], "value", cfg.bits, g, cfg.prefill_rank, cfg.loop, cfg.outlier_ratio, p0)[0])
    total = n_first + n_decode
    start = n_pre
    while total - start >= nb:
        out_k.append(np_gear(k[start:start + nb], "key", cfg.bits, g, cfg.rank, cfg.loop, cfg.outlier_ratio, p0)[0])
        out_v.append(np_gear(v[start:start + nb], "value", cfg.bits, g, cfg.rank, cfg.loop, cfg.outlier_ratio, p0)[0])
        start += nb
    out_k.append(k[start:total])
    out_v.append(v[start:total])
    return np.concatenate(out_k), np.concatenate(out_v)


@pytest.mark.parametrize("n_first,n_decode", [(45, 40)])
def test_streaming_cache_matches_reference(n_first, n_decode):
    rng = np.random.default_rng(n_first)
    b, h, d = 1, 2, 32
    total = n_first + n_decode
    k = rng.standard_normal((b, h, total, d)).astype(np.float32) * np.linspace(0.3, 2, d).astype(np.float32)
    v = rng.standard_normal((b, h, total, d)).astype(np.float32)
    cache = gear.init_gear_cache(CFG, 1, b, h, d, prefill_capacity=96, stream_capacity=64)
    layer = jax.tree_util.tree_map(lambda x: x[0], cache)
    pos = jnp.arange(total, dtype=jnp.int32)[None]
    step = jax.jit(lambda c, kk, vv, pp: c.append(kk, vv, pp))
    layer = step(layer, jnp.asarray(k[..., :n_first, :]), jnp.asarray(v[..., :n_first, :]), pos[:, :n_first])
    for t in range(n_first, total):
        layer = step(layer, jnp.asarray(k[..., t:t + 1, :]), jnp.asarray(v[..., t:t + 1, :]), pos[:, t:t + 1])
    assert int(layer.lengths[0, 0]) == total
    dk, dv = gear.dequantize(layer)
    slots = np.asarray(layer.positions[0, 0])
    order = np.argsort(np.where(slots >= 0, slots, 10 ** 9))[: total]
    assert np.array_equal(slots[order], np.arange(total))
    p0 = np.asarray(layer.p0)
    for head in range(h):
        rk, rv = _reference_cache(k[0, head], v[0, head], n_first, n_decode, CFG, p0)
        stepk = (k.max() - k.min()) / 3
        assert_mostly_close(np.asarray(dk[0, head])[order], rk, 2e-2, stepk)
        assert_mostly_close(np.asarray(dv[0, head])[order], rv, 2e-2, (v.max() - v.min()) / 3)


def test_memory_bytes_counts_every_piece():
    cfg = gear.GEARConfig()                       # bits 2, G 64, ranks 4/2, 2 % outliers, n_b 64
    d, cp, cs = 64, 256, 128
    cache = gear.init_gear_cache(cfg, 2, 1, 3, d, prefill_capacity=cp, stream_capacity=cs, dtype=jnp.float16)
    kp = gear.outlier_count(cp, 0.02)             # 2 per side over 256 tokens
    kb = gear.outlier_count(64, 0.02)             # 1 per side over a 64-token block
    kv = gear.outlier_count(d, 0.02)              # 1 per side over 64 channels
    pre = (2 * cp * d // 4 + 2 * 2 * (cp // 64) * d + 2 * 2 * cp * (d // 64)      # K and V codes, K/V stats
           + 2 * kp * d * 6 + cp * 2 * kv * 6                                   # key / value outliers
           + 2 * 2 * 4 * (cp + d))                                              # K and V factors, rank 4
    stream = (2 * cs * d // 4 + 2 * 2 * (cs // 64) * d + 2 * 2 * cs * (d // 64)
              + (cs // 64) * 2 * kb * d * 6 + cs * 2 * kv * 6
              + 2 * 2 * 2 * (cs + (cs // 64) * d))
    buf = 2 * 64 * d * 2
    counters = 5 * 4
    per_row = pre + stream + buf + counters
    p0 = 2 * d * 4 * 4
    assert cache.memory_bytes() == 2 * 3 * per_row + p0
    # a 2-bit GEAR prompt region is far smaller than the fp16 dense cache of the same tokens
    assert pre < 0.4 * (2 * cp * d * 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        gear.GEARConfig(bits=3).validate(64)
    with pytest.raises(ValueError, match="divide head_dim"):
        gear.GEARConfig(group=48).validate(64)
    with pytest.raises(ValueError, match="multiple of the group"):
        gear.GEARConfig(group=64, streaming_gap=96).validate(64)
    with pytest.raises(ValueError, match="NaN"):
        gear.compress(jnp.full((64, 64), jnp.nan), "key", 2, 64, 2, 3, 0.02, gear.initial_p(64, 2))
    cache = gear.init_gear_cache(CFG, 1, 1, 2, 32, prefill_capacity=32, stream_capacity=32)
    layer = jax.tree_util.tree_map(lambda x: x[0], cache)
    x = jnp.ones((1, 2, 70, 32))
    with pytest.raises(ValueError, match="prefill region"):
        layer.append(x, x, jnp.arange(70)[None])
    with pytest.raises(ValueError, match="NaN"):
        layer.append(x[:, :, :3] * jnp.inf, x[:, :, :3], jnp.arange(3)[None])


# ----------------------------------------------------------------------------- the real model


def _kl(full, approx):
    lp, lq = jax.nn.log_softmax(full, -1), jax.nn.log_softmax(approx, -1)
    return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def test_smollm2_prefill_and_decode_with_gear(smollm2_jax, real_kv):
    config, params = smollm2_jax
    full, ids = real_kv[2], jnp.asarray(real_kv[3])[None]         # full-cache logits of the 97 tokens
    n, steps = 90, 7
    pos = jnp.arange(n + steps, dtype=jnp.int32)[None]
    cache = gear.init_gear_cache(gear.GEARConfig(bits=4), config.n_layers, 1, config.n_kv_heads, config.head_dim,
                                 prefill_capacity=64, stream_capacity=64)
    fwd = jax.jit(forward, static_argnums=(4,))
    logits, cache, _ = fwd(params, ids[:, :n], pos[:, :n], cache, config)
    out = [logits[0, -1]]
    for t in range(n, n + steps):
        logits, cache, _ = fwd(params, ids[:, t:t + 1], pos[:, t:t + 1], cache, config)
        out.append(logits[0, -1])
    out = jnp.stack(out)
    assert int(cache.pre_len[0, 0, 0]) == 64 and int(cache.s_len[0, 0, 0]) == 0
    assert bool(jnp.all(jnp.isfinite(out)))
    kl = _kl(full[0, n - 1:], out)
    assert kl.mean() < 0.1, kl
    assert np.mean(np.argmax(out, -1) == np.argmax(full[0, n - 1:], -1)) >= 0.75
