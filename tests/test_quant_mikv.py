"""MiKV (kvjax.quant.mikv) vs float64 numpy: the channel balancer, per-token low-bit round trip,
the importance split of a compression round driven by an eviction scorer (KNorm, SnapKV),
memory accounting, errors, and the real SmolLM2 with SnapKV-driven mixed precision."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit
from kvjax.policies.h2o import H2O
from kvjax.policies.knorm import KNorm
from kvjax.policies.snapkv import SnapKV
from kvjax.quant import mikv
from kvjax.quant.zipcache import dense_view
from kvjax.observation import Observe
from models.llama import forward
from closeness import assert_mostly_close


def np_pair_norm(x):
    h = x.shape[-1] // 2
    r = np.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
    return np.concatenate([r, r], -1)


def np_balancer(q, k, mask):
    """b_c = sqrt(max|q_c| / max|k_c|) per kv-head, |.| of RoPE pairs. q [Hq, T, d], k [H, S, d]."""
    hq, h = q.shape[0], k.shape[0]
    g = hq // h
    out = np.ones((h, k.shape[-1]))
    for kv in range(h):
        qm = np_pair_norm(q[kv * g:(kv + 1) * g]).reshape(-1, q.shape[-1]).max(0)
        km = np_pair_norm(k[kv][mask[kv]]).max(0)
        out[kv] = np.sqrt(qm / km)
    return out


def np_token_quant(x, bits):
    """Per-token asymmetric RTN over the whole head vector, float16 scale/min."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    mn = lo.astype(np.float16).astype(np.float64)
    codes = np.where(scale > 0, np.clip(np.round((x - mn) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1), 0)
    return codes * scale + mn


@pytest.fixture(scope="module")
def real(smollm2_jax, smollm2_tokenizer):
    config, params = smollm2_jax
    ids = smollm2_tokenizer.encode(kjv_text(book="Matthew", n_chars=800))[:97]
    t = len(ids)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    logits, cache, obs = forward_jit(params, jnp.asarray(ids)[None], jnp.arange(t, dtype=jnp.int32)[None], cache,
                                     config, Observe(qkv=True), all_logits=True)  # one compile for all quant tests
    return np.asarray(cache.keys[:, 0]), np.asarray(obs["q_pre"][:, 0]), ids, logits


# ----------------------------------------------------------------------------- pure pieces


def test_channel_balancer_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 5, 8)) * np.linspace(0.5, 3, 8)
    k = rng.standard_normal((1, 2, 7, 8)) * np.r_[np.ones(7), 30.0]
    mask = np.ones((1, 2, 7), bool)
    mask[0, 1, 3] = False
    got = np.asarray(mikv.channel_balancer(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], np_balancer(q[0], k[0], mask[0]), rtol=1e-5)
    assert got[0, 0, 7] < 0.5                            # the outlier key channel is shrunk


def test_balancer_commutes_with_rope_and_keeps_scores(smollm2):
    from models.rope import apply_rope
    config = smollm2[0]
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((1, 1, 5, 64)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, 1, 5, 64)), jnp.float32)
    b = mikv.channel_balancer(q, k, jnp.ones((1, 1, 5), bool))[:, :, None, :]
    pos = jnp.arange(5)[None] * 37
    np.testing.assert_allclose(np.asarray(apply_rope(k * b, pos, config)), np.asarray(apply_rope(k, pos, config) * b),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.sum((k * b) * (q / b), -1)), np.asarray(jnp.sum(k * q, -1)), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_token_round_trip_matches_numpy_and_balancer_helps(bits, real):
    keys, q_pre = real[:2]
    err_bal, err_plain = 0.0, 0.0
    for layer in (2, 12, 25):
        k, q = keys[layer], q_pre[layer]
        b = np_balancer(q, k, np.ones(k.shape[:2], bool))
        got = np.asarray(mikv.quantize_dequantize_tokens(jnp.asarray(k), bits, 64, jnp.asarray(b, jnp.float32)))
        b16 = b.astype(np.float32)[:, None, :]
        want = np_token_quant(k * b16, bits) / b16
        assert_mostly_close(got, want, 1e-3 + 2e-3 * np.abs(want).max(), np.ptp(k * b16) / b16.min(), frac=0.02)
        # error measured where it matters: on the attention logits q.k (per head, all pairs)
        g = q.shape[0] // k.shape[0]
        for h in range(k.shape[0]):
            qq = q[h * g:(h + 1) * g].reshape(-1, 64)
            err_bal += np.linalg.norm(qq @ (want[h] - k[h]).T)
            err_plain += np.linalg.norm(qq @ (np_token_quant(k[h].astype(np.float64), bits) - k[h]).T)
    assert err_bal < err_plain, (err_bal, err_plain)


# ----------------------------------------------------------------------------- compression round


def _layer(cache):
    return jax.tree_util.tree_map(lambda x: x[0], cache)


@pytest.mark.parametrize("hi_bits", [16, 8])
def test_round_with_knorm_scorer_matches_numpy(hi_bits):
    rng = np.random.default_rng(hi_bits)
    h, hq, d, n = 2, 4, 16, 23
    cfg = mikv.MiKVConfig(keep_ratio=0.3, hi_bits=hi_bits, lo_bits=2)
    cache = mikv.init_mikv_cache(cfg, 1, 1, h, d, capacity=30, buffer=26)
    k = (rng.standard_normal((1, h, n, d)) * rng.uniform(0.2, 3, (1, h, n, 1))).astype(np.float32)
    v = rng.standard_normal((1, h, n, d)).astype(np.float32)
    q = rng.standard_normal((1, 1, hq, n, d)).astype(np.float32)
    layer = _layer(cache).append(jnp.asarray(k), jnp.asarray(v), jnp.arange(n, dtype=jnp.int32)[None])
    stacked = jax.tree_util.tree_map(lambda x: x[None], layer)
    out = _layer(mikv.compress(stacked, {"q_pre": jnp.asarray(q)}, KNorm(), None))
    b = np_balancer(q[0, 0], k[0], np.ones((h, n), bool)).astype(np.float16).astype(np.float64)
    kv, vv = dense_view(out)
    pos = np.asarray(out.positions[0])
    ch = out.hi_pos.shape[-1]
    n_hi = round(0.3 * n)
    for head in range(h):
        kept = np.sort(np.argsort(np.linalg.norm(k[0, head], axis=-1), kind="stable")[:n_hi])  # KNorm keeps small norms
        hi_rows = [int(np.where(pos[head, :ch] == t)[0][0]) for t in kept]
        lo_tok = np.setdiff1d(np.arange(n), kept)
        lo_rows = [ch + int(np.where(pos[head, ch:] == t)[0][0]) for t in lo_tok]
        kb = k[0, head].astype(np.float64) * b[head]
        if hi_bits == 16:
            want_hi_k = kb[kept].astype(np.float16).astype(np.float64) / b[head]
            want_hi_v = v[0, head, kept].astype(np.float16)
        else:
            want_hi_k = np_token_quant(kb[kept], 8) / b[head]
            want_hi_v = np_token_quant(v[0, head, kept].astype(np.float64), 8)
        tol = lambda w: 1e-3 + 2e-3 * np.abs(w).max()
        assert_mostly_close(np.asarray(kv[0, head])[hi_rows], want_hi_k, tol(want_hi_k), 0.05, frac=0.02)
        assert_mostly_close(np.asarray(vv[0, head])[hi_rows], want_hi_v, tol(want_hi_v), 0.05, frac=0.02)
        want_lo_k = np_token_quant(kb[lo_tok], 2) / b[head]
        want_lo_v = np_token_quant(v[0, head, lo_tok].astype(np.float64), 2)
        assert_mostly_close(np.asarray(kv[0, head])[lo_rows], want_lo_k, tol(want_lo_k), np.ptp(kb) / b[head].min(), frac=0.02)
        assert_mostly_close(np.asarray(vv[0, head])[lo_rows], want_lo_v, tol(want_lo_v), np.ptp(v), frac=0.02)
    assert int(out.hi_len[0, 0]) == n_hi and int(out.lo_len[0, 0]) == n - n_hi and int(out.buf_len.max()) == 0


def test_memory_bytes():
    cfg = mikv.MiKVConfig()                       # 20 % fp16, 80 % 2-bit per token
    d, cap, buf, L, H = 64, 1000, 100, 2, 3
    cache = mikv.init_mikv_cache(cfg, L, 1, H, d, capacity=cap, buffer=buf, dtype=jnp.float16)
    slack = max(8, cap // 50)
    ch, cl = math.ceil(0.2 * cap) + slack, math.ceil(0.8 * cap) + slack
    per_row = (ch * (2 * d * 2 + 4) + cl * (2 * d // 4 + 2 * 2 * 2 + 4)     # fp16 K/V | codes + scale/min; positions
               + d * 2 + buf * (2 * d * 2 + 4) + 5 * 4)                      # balancer, buffer, counters
    assert cache.memory_bytes() == L * H * per_row


def test_bad_inputs():
    with pytest.raises(ValueError, match="hi_bits"):
        mikv.MiKVConfig(hi_bits=3).validate(64)
    with pytest.raises(ValueError, match="lo_bits"):
        mikv.MiKVConfig(lo_bits=1).validate(64)
    with pytest.raises(ValueError, match="divide head_dim"):
        mikv.MiKVConfig(group=48).validate(64)
    with pytest.raises(ValueError, match="keep_ratio"):
        mikv.MiKVConfig(keep_ratio=1.2).validate(64)
    cache = mikv.init_mikv_cache(mikv.MiKVConfig(), 1, 1, 2, 16, capacity=8, buffer=8)
    with pytest.raises(ValueError, match="accumulated"):
        mikv.compress(cache, {"q_pre": jnp.zeros((1, 1, 4, 8, 16))}, H2O(), None)
    with pytest.raises(ValueError, match="observer"):     # window attention only exists inside the layers
        mikv.compress(cache, {"q_pre": jnp.zeros((1, 1, 4, 8, 16))}, SnapKV(window=4), None)
    with pytest.raises(ValueError, match="slots"):
        mikv.compress(cache, {"scores": jnp.zeros((1, 1, 2, 9))}, SnapKV(window=4), None)
    with pytest.raises(ValueError, match="queries"):
        mikv.compress(cache, {}, KNorm(), None)


# ----------------------------------------------------------------------------- real model


def test_smollm2_snapkv_mixed_precision(smollm2_jax, real):
    config, params = smollm2_jax
    n, steps = 90, 6
    ids, full = jnp.asarray(real[2][:n + steps])[None], real[3]      # full-cache logits of the 96 tokens
    pos = jnp.arange(n + steps, dtype=jnp.int32)[None]
    policy = SnapKV(window=16)
    fwd = jax.jit(forward, static_argnums=(4, 5), static_argnames=("observer",))
    cfg = mikv.MiKVConfig(keep_ratio=0.2, lo_bits=4)        # 2-bit per-token keys are far off on SmolLM2 (d = 64)
    cache = mikv.init_mikv_cache(cfg, config.n_layers, 1, config.n_kv_heads, config.head_dim, capacity=n, buffer=n)
    # SnapKV's window attention is reduced to scores inside each layer (over the MixedCache's slots)
    logits, cache, obs = fwd(params, ids[:, :n], pos[:, :n], cache, config, mikv.observe_for(policy),
                             observer=mikv.observer_for(policy))
    assert obs["scores"].shape == (config.n_layers, 1, config.n_kv_heads, cache.capacity)
    cache = jax.jit(mikv.compress, static_argnums=(2, 3))(cache, obs, policy, config)
    assert int(cache.hi_len[0, 0, 0]) == 18 and int(cache.lo_len[0, 0, 0]) == 72
    # the scorer's protected window (the newest 16 tokens) is among the high-precision tokens
    hi_pos = np.asarray(cache.hi_pos[:, 0])
    assert all(set(range(n - 16, n)) <= set(hi_pos[layer, head].tolist())
               for layer in range(config.n_layers) for head in range(config.n_kv_heads))
    out = []
    for t in range(n, n + steps):
        logits, cache, _ = fwd(params, ids[:, t:t + 1], pos[:, t:t + 1], cache, config, Observe())
        out.append(logits[0, -1])
    out = jnp.stack(out)
    assert bool(jnp.all(jnp.isfinite(out)))
    lp, lq = jax.nn.log_softmax(full[0, n:n + steps], -1), jax.nn.log_softmax(out, -1)
    kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
    assert 1e-6 < kl.mean() < 0.1, kl
