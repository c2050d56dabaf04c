"""KVQuant cache vs float64 numpy references of the spec formulas (NUQ, dense-and-sparse, pre-RoPE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import kvquant

D, H = 16, 2


def ref_keys(k, off, rng, lut, n_side):
    """Per-channel NUQ of pre-RoPE keys [b, h, T, d]; off, rng [h, d]; exact fp16 outliers."""
    k = np.asarray(k, np.float64)
    u = (k - off[:, None]) / rng[:, None]
    code = np.argmin(np.abs(u[..., None] - lut), axis=-1)
    out = lut[code] * rng[:, None] + off[:, None]
    for idx in np.ndindex(k.shape[:-1]):
        row = u[idx]
        hi = [c for c in np.argsort(-row)[:n_side] if row[c] > 1]
        lo = [c for c in np.argsort(row)[:n_side] if row[c] < -1]
        for c in hi + lo:
            out[idx + (c,)] = np.float16(k[idx + (c,)])
    return out


def ambiguous_rows(k, off, rng, n_side, eps=1e-4):
    """[b, h, T] bool: token-heads whose outlier choice is a numerical tie (an entry within eps of
    the threshold |u| = 1, or two candidates within eps of each other on one side)."""
    u = (np.asarray(k, np.float64) - off[:, None]) / rng[:, None]
    s = np.sort(u, -1)
    border = np.any(np.abs(np.abs(u) - 1) < eps, -1)
    tie_hi = np.abs(s[..., -n_side] - s[..., -n_side - 1]) < eps
    tie_lo = np.abs(s[..., n_side - 1] - s[..., n_side]) < eps
    return border | tie_hi | tie_lo


def ref_values(v, lut, n_side):
    """Per-token NUQ: the n_side largest/smallest entries exact, the rest normalised by their range."""
    v = np.asarray(v, np.float64)
    d = v.shape[-1]
    s = np.sort(v, -1)
    up, lo = s[..., d - 1 - n_side], s[..., n_side]
    off = ((up + lo) / 2).astype(np.float16).astype(np.float64)[..., None]
    rng = ((up - lo) / 2).astype(np.float16).astype(np.float64)[..., None]
    u = (v - off) / rng
    out = lut[np.argmin(np.abs(u[..., None] - lut), -1)] * rng + off
    order = np.argsort(v, -1)
    ext = np.concatenate([order[..., :n_side], order[..., d - n_side:]], -1)
    np.put_along_axis(out, ext, np.take_along_axis(v, ext, -1).astype(np.float16).astype(np.float64), -1)
    return out


def rope_np(x, pos, theta=10000.0):
    """Rotate-half RoPE as a complex rotation of the (i, i + d/2) pairs; x [..., T, d], pos [..., T]."""
    d = x.shape[-1]
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * pos[..., None] * theta ** (-np.arange(0, d, 2) / d))
    return np.concatenate([z.real, z.imag], -1)


def synthetic_calib(bits, seed=0):
    rng = np.random.default_rng(seed)
    lut = np.sort(rng.uniform(-1, 1, 2 ** bits))
    return {"k_offset": rng.normal(size=(1, H, D)).astype(np.float32),
            "k_range": rng.uniform(0.5, 2, size=(1, H, D)).astype(np.float32),
            f"k_lut_{bits}": lut[None].astype(np.float32),
            f"v_lut_{bits}": np.sort(rng.uniform(-1, 1, 2 ** bits))[None].astype(np.float32),
            "sparsity": np.float64(0.9), "sink": np.int64(2)}


class _Cfg:
    n_layers, n_kv_heads, head_dim = 1, H, D


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantizers_match_numpy_reference(bits):
    cal = synthetic_calib(bits, seed=bits)
    rng = np.random.default_rng(10 + bits)
    k = (rng.normal(size=(2, H, 7, D)) * 1.5 + cal["k_offset"][0][:, None]).astype(np.float32)
    v = rng.normal(size=(2, H, 7, D)).astype(np.float32)
    n_side = kvquant.KVQuantConfig(bits, 0.9).n_side(D)
    assert n_side == 1
    off, rg = cal["k_offset"][0], cal["k_range"][0]
    klut, vlut = cal[f"k_lut_{bits}"][0], cal[f"v_lut_{bits}"][0]
    got = kvquant.dequantize_keys(*kvquant.quantize_keys(jnp.asarray(k), off, rg, klut, bits, n_side), off, rg,
                                  klut, bits)
    np.testing.assert_allclose(np.asarray(got), ref_keys(k, off, rg, klut.astype(np.float64), n_side),
                               rtol=1e-5, atol=1e-5)
    c, vo, vr, val, idx = kvquant.quantize_values(jnp.asarray(v), vlut, bits, n_side)
    assert c.shape == (2, H, 7, D * bits // 8) and vo.shape == (2, H, 7) and idx.shape == (2, H, 7, 2)
    got = kvquant.dequantize_values(c, vo, vr, val, idx, vlut, bits)
    np.testing.assert_allclose(np.asarray(got), ref_values(v, vlut.astype(np.float64), n_side), rtol=1e-4, atol=1e-4)


def test_cache_pre_rope_sink_and_attention():
    """append pre-RoPE keys in odd chunks, attend with rope: equals float64 attention over the
    reference-dequantized keys rotated at their positions (sink positions exact)."""
    bits, T = 4, 11
    cal = synthetic_calib(bits)
    cache = kvquant.init_kvquant_cache(_Cfg, 1, 16, cal, bits=bits)
    layer = jax.tree_util.tree_map(lambda a: a[0], cache)
    rng = np.random.default_rng(3)
    k = (rng.normal(size=(1, H, T, D)) + cal["k_offset"][0][:, None]).astype(np.float32)
    v = rng.normal(size=(1, H, T, D)).astype(np.float32)
    pos = np.arange(T)
    for a, b in [(0, 3), (3, 4), (4, 11)]:
        layer = layer.append(None, jnp.asarray(v[:, :, a:b]), jnp.asarray(pos[None, a:b]),
                             keys_pre_rope=jnp.asarray(k[:, :, a:b]))
    n_side = layer.n_side
    kref = ref_keys(k, cal["k_offset"][0], cal["k_range"][0], cal[f"k_lut_{bits}"][0].astype(np.float64), n_side)
    vref = ref_values(v, cal[f"v_lut_{bits}"][0].astype(np.float64), n_side)
    kref[:, :, :2], vref[:, :, :2] = k[:, :, :2], v[:, :, :2]          # sink: first 2 positions exact
    kd, vd = kvquant.dequantize(layer)
    np.testing.assert_allclose(np.asarray(kd)[:, :, :T], kref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vd)[:, :, :T], vref, rtol=1e-4, atol=1e-4)
    big = kvquant.resize(layer, 30)                   # kvjax.cache.resize dispatches here (generate)
    kb, vb = kvquant.dequantize(big)
    assert big.capacity == 30
    np.testing.assert_array_equal(np.asarray(kb)[:, :, :T], np.asarray(kd)[:, :, :T])
    np.testing.assert_array_equal(np.asarray(vb)[:, :, :T], np.asarray(vd)[:, :, :T])
    with pytest.raises(ValueError, match="cannot shrink"):
        kvquant.resize(layer, 5)

    from kvjax.observation import Observe
    from models.config import ModelConfig
    from models.rope import apply_rope
    mc = ModelConfig(name="t", vocab_size=8, d_model=8, n_layers=1, n_heads=4, n_kv_heads=H, head_dim=D,
                     ffn_dim=8, rope_theta=10000.0)
    q = rng.normal(size=(1, 4, 3, D)).astype(np.float32)
    qpos = np.array([[8, 9, 10]])
    out, _ = layer.attend(jnp.asarray(q), jnp.asarray(qpos), observe=Observe(),
                          rope=lambda x, p: apply_rope(x, p, mc))
    kr = rope_np(kref, np.arange(T))
    want = np.zeros_like(q, dtype=np.float64)
    for hq in range(4):
        hk = hq // 2
        for i, p in enumerate(qpos[0]):
            s = kr[0, hk, : p + 1] @ q[0, hq, i] / np.sqrt(D)
            w = np.exp(s - s.max())
            want[0, hq, i] = (w / w.sum()) @ vref[0, hk, : p + 1]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_kmeans_1d_is_a_lloyd_fixed_point():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.1, 3000), rng.normal(0.5, 0.1, 3000), rng.normal(3, 0.1, 3000)])
    c = kvquant.kmeans_1d(x, 3, iters=50)
    np.testing.assert_allclose(c, [-2, 0.5, 3], atol=0.02)
    y = rng.standard_normal(20000)
    c = kvquant.kmeans_1d(y, 8, iters=200)
    assign = np.argmin(np.abs(y[:, None] - c), 1)
    np.testing.assert_allclose(c, [y[assign == i].mean() for i in range(8)], atol=1e-3)
    grid = np.linspace(y.min(), y.max(), 8)
    mse = lambda cc: np.mean(np.min((y[:, None] - cc) ** 2, 1))
    assert mse(c) < 0.5 * mse(grid)


def test_bad_input():
    cal = synthetic_calib(4)
    with pytest.raises(ValueError, match="bits=5"):
        kvquant.init_kvquant_cache(_Cfg, 1, 8, cal, bits=5)
    with pytest.raises(ValueError, match="no 3-bit LUT"):
        kvquant.init_kvquant_cache(_Cfg, 1, 8, cal, bits=3)

    class Wrong(_Cfg):
        head_dim = 32
    with pytest.raises(ValueError, match="do not match"):
        kvquant.init_kvquant_cache(Wrong, 1, 8, cal, bits=4)
    layer = jax.tree_util.tree_map(lambda a: a[0], kvquant.init_kvquant_cache(_Cfg, 1, 8, cal, bits=4))
    x = jnp.ones((1, H, 2, D))
    with pytest.raises(ValueError, match="keys_pre_rope"):
        layer.append(x, x, jnp.arange(2)[None])
    with pytest.raises(ValueError, match="rope"):
        layer.attend(jnp.ones((1, 4, 1, D)), jnp.zeros((1, 1), jnp.int32), observe=None)
    bad = np.ones((1, H, 2, D), np.float32)
    bad[0, 1, 1, 3] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.append(x, x, jnp.arange(2)[None], keys_pre_rope=jnp.asarray(bad))


def test_memory_accounting():
    cal = synthetic_calib(4)
    c = kvquant.init_kvquant_cache(_Cfg, 1, 32, cal, bits=4)
    per_tok = sum(a.nbytes for a in (c.k_codes, c.k_out_val, c.k_out_idx, c.v_codes, c.v_offset, c.v_range,
                                     c.v_out_val, c.v_out_idx)) / (H * 32)
    assert per_tok == kvquant.bytes_per_token(D, 4, c.n_side) == 2 * (8 + 6) + 4


def test_real_smollm2_calibrate_and_prefill(smollm2, smollm2_tokenizer, tmp_path):
    from kvjax import cache as kvcache
    from kvjax.eval.text import kjv_text
    from kvjax.generate import forward_jit
    from kvjax.observation import Observe
    config, params = smollm2
    cal_ids = smollm2_tokenizer.encode(kjv_text(start_verse=20000, n_chars=800))[:96]
    calib = kvquant.calibrate(params, config, cal_ids, kvquant.KVQuantConfig(bits=4), bits_list=(4,))
    path = tmp_path / "cal.npz"
    kvquant.save_calibration(path, calib)
    assert calib["k_offset"].shape == (config.n_layers, config.n_kv_heads, config.head_dim)
    assert calib["k_lut_4"].shape == (config.n_layers, 16) and np.all(np.diff(calib["k_lut_4"], axis=1) > 0)

    ids = smollm2_tokenizer.encode(kjv_text(n_chars=400))[:40]
    toks, pos = jnp.asarray([ids]), jnp.arange(40)[None]
    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 48, config.head_dim)
    ld, _, _ = forward_jit(params, toks, pos, dense, config, all_logits=True)
    cache = kvquant.init_kvquant_cache(config, 1, 48, str(path), bits=4)
    lq, cache, obs = forward_jit(params, toks, pos, cache, config, Observe(qkv=True), all_logits=True)
    # the cache holds the reference quantization of the real pre-RoPE keys / values it was given
    kd, vd = jax.vmap(kvquant.dequantize)(cache)
    cal = kvquant.load_calibration(path)
    for l in (9, 17):  # layer 0 keys depend on the token id alone: they repeat calibration quantiles exactly
        k_pre, v = np.asarray(obs["k_pre"][l]), np.asarray(obs["v"][l])
        kref = ref_keys(k_pre, cal["k_offset"][l], cal["k_range"][l], cal["k_lut_4"][l].astype(np.float64), 1)
        vref = ref_values(v, cal["v_lut_4"][l].astype(np.float64), 1)
        kref[:, :, :5], vref[:, :, :5] = k_pre[:, :, :5], v[:, :, :5]
        # real keys repeat exact calibration quantiles (same token ids): skip numerical ties
        amb = ambiguous_rows(k_pre, cal["k_offset"][l], cal["k_range"][l], 1)
        amb[:, :, :5] = False
        assert amb.mean() < 0.1
        np.testing.assert_allclose(np.asarray(kd[l])[:, :, :40][~amb], kref[~amb], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(vd[l])[:, :, :40], vref, rtol=1e-3, atol=1e-3)
    # and the model still predicts the text: small KL to the full cache
    pf, pq = jax.nn.log_softmax(ld[0]), jax.nn.log_softmax(lq[0])
    kl = float(jnp.mean(jnp.sum(jnp.exp(pf) * (pf - pq), -1)))
    assert np.isfinite(np.asarray(lq)).all() and kl < 0.2
