"""RotateKV (kvjax.quant.rotatekv): FWHT vs an explicit Sylvester Hadamard matrix, grouped-head
rotation, per-token 2-bit round trip vs float64 numpy, the cache (sinks, odd lengths, pre-RoPE keys
re-rotated at attention), memory accounting, errors, and the real SmolLM2 with the cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import attend
from kvjax.observation import Observe
from kvjax.cache import init_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit
from kvjax.quant import rotatekv as rk
from models.config import get_config
from kvjax.observation import Observe
from models.llama import forward
from models.rope import apply_rope
from closeness import assert_mostly_close


def hadamard(n):
    """Sylvester Hadamard matrix (+-1), built by the recursion H_2n = [[H, H], [H, -H]]."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def np_quant_tokens(x, bits, group):
    """Per-token asymmetric RTN (float16 scale/min) over groups of `group` channels, float64."""
    shp = x.shape
    xg = x.reshape(shp[:-1] + (shp[-1] // group, group))
    lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    mn = lo.astype(np.float16).astype(np.float64)
    codes = np.where(scale > 0, np.clip(np.round((xg - mn) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1), 0)
    return (codes * scale + mn).reshape(shp)


def np_rotatekv(k_pre, v, bits, head_group):
    """k_pre, v [H, T, d] float64 -> RotateKV round trip (grouped-head Hadamard for keys, per-head
    for values, per-token quantization with group = head_dim), with explicit matrices."""
    h, t, d = k_pre.shape
    n = head_group * d
    hk, hv = hadamard(n) / np.sqrt(n), hadamard(d) / np.sqrt(d)
    kg = k_pre.reshape(h // head_group, head_group, t, d).transpose(0, 2, 1, 3).reshape(h // head_group, t, n)
    kq = np_quant_tokens(kg @ hk, bits, d) @ hk.T
    k_hat = kq.reshape(h // head_group, t, head_group, d).transpose(0, 2, 1, 3).reshape(h, t, d)
    v_hat = np_quant_tokens(v @ hv, bits, d) @ hv.T
    return k_hat, v_hat


@pytest.fixture(scope="module")
def real_kv(smollm2_jax, smollm2_tokenizer):
    config, params = smollm2_jax
    ids = smollm2_tokenizer.encode(kjv_text(book="Psalms", n_chars=800))[:97]
    t = len(ids)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    logits, cache, obs = forward_jit(params, jnp.asarray(ids)[None], jnp.arange(t, dtype=jnp.int32)[None], cache,
                                     config, Observe(qkv=True), all_logits=True)  # one compile for all quant tests
    return np.asarray(obs["k_pre"][:, 0]), np.asarray(obs["v"][:, 0]), ids, logits


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_matches_explicit_hadamard(n):
    x = np.random.default_rng(n).standard_normal((3, 5, n))
    got = np.asarray(rk.fwht(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, x @ hadamard(n) / np.sqrt(n), atol=1e-5)
    raw = np.asarray(rk.fwht(jnp.asarray(x, jnp.float32), normalize=False))
    np.testing.assert_allclose(raw, x @ hadamard(n), atol=1e-4)
    np.testing.assert_allclose(np.asarray(rk.fwht(jnp.asarray(got))), x, atol=1e-5)   # self-inverse


def test_grouped_head_rotation_is_kron_hadamard():
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 16))
    got = np.asarray(rk.rotate_keys(jnp.asarray(x, jnp.float32), 4))
    xg = x.reshape(2, 2, 4, 5, 16).transpose(0, 1, 3, 2, 4).reshape(2, 2, 5, 64)
    want = (xg @ hadamard(64) / 8).reshape(2, 2, 5, 4, 16).transpose(0, 1, 3, 2, 4).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # orthogonal: norms of every (token, head group) vector are kept; stacked layer axes work too
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(x), rtol=1e-5)
    stacked = np.asarray(rk.rotate_keys(jnp.asarray(x[None], jnp.float32), 4))[0]
    np.testing.assert_allclose(stacked, got, atol=1e-6)


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits,head_group", [(2, 1), (2, 2), (4, 4)])
def test_round_trip_matches_numpy_random(bits, head_group):
    rng = np.random.default_rng(bits)
    k = rng.standard_normal((1, 4, 9, 32)) * np.r_[np.ones(31), 20.0]          # an outlier channel
    v = rng.standard_normal((1, 4, 9, 32))
    cfg = rk.RotateKVConfig(bits=bits, head_group=head_group)
    kh, vh = rk.quantize_dequantize(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), cfg)
    rkh, rvh = np_rotatekv(k[0], v[0], bits, head_group)
    assert_mostly_close(np.asarray(kh[0]), rkh, 1e-3, np.abs(k).max())
    assert_mostly_close(np.asarray(vh[0]), rvh, 1e-3, np.abs(v).max())


def test_round_trip_real_smollm2_and_rotation_helps(real_kv):
    k_pre, v = real_kv[:2]                                # [L, 3, T, 64]
    cfg = rk.RotateKVConfig(bits=2, head_group=1)
    errs_rot, errs_plain = [], []
    for layer in (0, 10, 20, 29):
        kh, vh = rk.quantize_dequantize(jnp.asarray(k_pre[layer:layer + 1]), jnp.asarray(v[layer:layer + 1]), cfg)
        rkh, rvh = np_rotatekv(k_pre[layer].astype(np.float64), v[layer].astype(np.float64), 2, 1)
        assert_mostly_close(np.asarray(kh[0]), rkh, 1e-2, np.abs(k_pre[layer]).max())
        assert_mostly_close(np.asarray(vh[0]), rvh, 1e-2, np.abs(v[layer]).max())
        errs_rot.append(np.linalg.norm(rkh - k_pre[layer]))
        errs_plain.append(np.linalg.norm(np_quant_tokens(k_pre[layer].astype(np.float64), 2, 64) - k_pre[layer]))
    # the Hadamard rotation spreads the key outlier channels: lower 2-bit error than plain per-token RTN
    assert sum(errs_rot) < 0.8 * sum(errs_plain), (errs_rot, errs_plain)


# ----------------------------------------------------------------------------- cache


def test_cache_odd_lengths_sinks_and_rope():
    cfg_model = get_config("smollm2")
    rng = np.random.default_rng(3)
    h, d, n0, steps, sinks = 3, 64, 37, 4, 4
    total = n0 + steps
    k = rng.standard_normal((1, h, total, d)).astype(np.float32)
    v = rng.standard_normal((1, h, total, d)).astype(np.float32)
    cfg = rk.RotateKVConfig(bits=2, head_group=1, sink_tokens=sinks)
    layer = jax.tree_util.tree_map(lambda x: x[0], rk.init_rotatekv_cache(cfg, 1, 1, h, 50, d))
    pos = jnp.arange(total, dtype=jnp.int32)[None]
    app = jax.jit(lambda c, kk, vv, pp: c.append(None, vv, pp, keys_pre_rope=kk))
    # 5 slots of left padding first: the sinks are the tokens at positions 0..3, not slots 0..3
    pad = 5
    padk = np.concatenate([np.full((1, h, pad, d), 50.0, np.float32), k[:, :, :n0]], 2)
    padv = np.concatenate([np.full((1, h, pad, d), -50.0, np.float32), v[:, :, :n0]], 2)
    padpos = jnp.concatenate([jnp.full((1, pad), -1, jnp.int32), pos[:, :n0]], 1)
    layer = app(layer, jnp.asarray(padk), jnp.asarray(padv), padpos)
    for t in range(n0, total):
        layer = app(layer, jnp.asarray(k[:, :, t:t + 1]), jnp.asarray(v[:, :, t:t + 1]), pos[:, t:t + 1])
    dk, dv = rk.dequantize(layer)
    rkh, rvh = np_rotatekv(k[0].astype(np.float64), v[0].astype(np.float64), 2, 1)
    rkh[:, :sinks], rvh[:, :sinks] = k[0, :, :sinks], v[0, :, :sinks]          # sinks stay exact
    assert_mostly_close(np.asarray(dk[0, :, pad:pad + total]), rkh, 1e-3, np.abs(k).max())
    assert_mostly_close(np.asarray(dv[0, :, pad:pad + total]), rvh, 1e-3, np.abs(v).max())
    np.testing.assert_array_equal(np.asarray(dk[0, :, pad:pad + sinks]), k[0, :, :sinks])
    positions = np.asarray(layer.positions[0, 0])
    assert (positions[:pad] == -1).all()
    np.testing.assert_array_equal(positions[pad:pad + total], np.arange(total))
    assert (positions[pad + total:] == -1).all()
    # attend re-applies RoPE at each slot's position: same as attention over the rotated keys
    q = jnp.asarray(rng.standard_normal((1, 9, 2, d)), jnp.float32)
    qpos = pos[:, total - 2:]
    rope = lambda x, p: apply_rope(x, p, cfg_model)
    out, _ = layer.attend(q, qpos, observe=Observe(), rope=rope)
    k_post = apply_rope(jnp.asarray(rkh[None], jnp.float32), pos[:, :total], cfg_model)
    want, _ = attend(q, k_post, jnp.asarray(rvh[None], jnp.float32), jnp.broadcast_to(pos[:, None, :total], (1, h, total)),
                     qpos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-3)


def test_memory_bytes():
    cfg = rk.RotateKVConfig(bits=2, head_group=1, sink_tokens=4)
    cache = rk.init_rotatekv_cache(cfg, 2, 1, 3, 1000, 64, dtype=jnp.float16)
    per_row = 1000 * rk.bytes_per_token(64, 2, 64) + 2 * 4 * 64 * 2 + 2 * 4   # codes for every slot + sinks
    assert rk.bytes_per_token(64, 2, 64) == 2 * (16 + 4)
    assert cache.memory_bytes() == 2 * 3 * per_row
    dense = init_cache(2, 1, 3, 1000, 64, jnp.float16).memory_bytes()
    assert cache.memory_bytes() < 0.2 * dense


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        rk.RotateKVConfig(bits=3).validate(64, 4)
    with pytest.raises(ValueError, match="head_group"):
        rk.RotateKVConfig(head_group=4).validate(64, 3)
    with pytest.raises(ValueError, match="power-of-two"):
        rk.RotateKVConfig(head_group=1).validate(48, 3)
    with pytest.raises(ValueError, match="divide head_dim"):
        rk.RotateKVConfig(head_group=1, group=24).validate(64, 3)
    with pytest.raises(ValueError, match="power-of-two"):
        rk.fwht(jnp.ones((3, 12)))
    layer = jax.tree_util.tree_map(lambda x: x[0], rk.init_rotatekv_cache(rk.RotateKVConfig(head_group=1), 1, 1, 3,
                                                                          8, 64))
    x = jnp.ones((1, 3, 2, 64))
    with pytest.raises(ValueError, match="pre-RoPE"):
        layer.append(x, x, jnp.arange(2)[None])
    with pytest.raises(ValueError, match="NaN"):
        layer.append(x, x, jnp.arange(2)[None], keys_pre_rope=x * jnp.nan)
    with pytest.raises(ValueError, match="rope"):
        layer.attend(jnp.ones((1, 9, 1, 64)), jnp.zeros((1, 1), jnp.int32), observe=Observe())


# ----------------------------------------------------------------------------- real model


def test_smollm2_prefill_and_decode_with_rotatekv(smollm2_jax, real_kv):
    config, params = smollm2_jax
    n, steps = 90, 7
    full, ids = real_kv[3], jnp.asarray(real_kv[2])[None]         # full-cache logits of the 97 tokens
    pos = jnp.arange(n + steps, dtype=jnp.int32)[None]
    fwd = jax.jit(forward, static_argnums=(4,))
    cfg = rk.RotateKVConfig(bits=4, head_group=1, sink_tokens=4)
    cache = rk.init_rotatekv_cache(cfg, config.n_layers, 1, config.n_kv_heads, n + steps, config.head_dim)
    logits, cache, _ = fwd(params, ids[:, :n], pos[:, :n], cache, config)
    out = [logits[0, -1]]
    for t in range(n, n + steps):
        logits, cache, _ = fwd(params, ids[:, t:t + 1], pos[:, t:t + 1], cache, config)
        out.append(logits[0, -1])
    out = jnp.stack(out)
    assert bool(jnp.all(jnp.isfinite(out)))
    lp, lq = jax.nn.log_softmax(full[0, n - 1:], -1), jax.nn.log_softmax(out, -1)
    kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
    # every token but the 4 sinks is quantized (no fp window), so 4-bit is close but not lossless here
    assert 1e-6 < kl.mean() < 0.25, kl
    assert np.mean(np.argmax(out, -1) == np.argmax(full[0, n - 1:], -1)) >= 0.75
