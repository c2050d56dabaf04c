"""NSA attention (models/nsa.py) against a float64 numpy implementation of the spec's equations
(§6 of quantization_and_sparse_attention.md), written here per query token with loops; the
converted model against the dense model; configuration and input errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.llama import forward, init_params
from models.nsa import (NSAConfig, NSALlama, init_nsa_params, nsa_attention, nsa_forward,
                        selected_attention)

CFG = ModelConfig(name="tiny-nsa", vocab_size=61, d_model=32, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
                  ffn_dim=48, rope_theta=10000.0)
# small blocks so that every branch matters at ~40 tokens: l=4, d=2, l'=8, n=3 (1 init + 1 local)
NSA = NSAConfig(kernel_size=4, kernel_stride=2, block_size=8, top_n=3, init_blocks=1, local_blocks=1, window=7)


# ----------------------------------------------------------------------------------------------
# float64 numpy reference, one query token at a time.

def np_rope(x, pos, theta):
    """x [..., n, D] rotated as complex pairs (i, i + D/2) by pos [n]."""
    d = x.shape[-1]
    z = x[..., :d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * np.asarray(pos, np.float64)[:, None] * theta ** (-np.arange(0, d, 2) / d))
    return np.concatenate([z.real, z.imag], -1)


def np_softmax_attend(q, ks, vs, scale):
    if len(ks) == 0:
        return np.zeros(vs.shape[-1]), np.zeros(0)
    s = ks @ q * scale
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ vs, p


def np_nsa(q_rot, k_pre, v, h, lp, c: NSAConfig, theta):
    """q_rot [hq, T, D]; k_pre, v [hkv, T, D]; h [T, dm] -> (out [hq, T, D], selected block sets)."""
    lp = {k: np.asarray(a, np.float64) for k, a in lp.items()}
    hq, T, D = q_rot.shape
    hkv = k_pre.shape[0]
    g = hq // hkv
    l, d, bs = c.kernel_size, c.kernel_stride, c.block_size
    scale = D ** -0.5
    k_rot = np.stack([np_rope(k_pre[i], np.arange(T), theta) for i in range(hkv)])
    n_cmp = (T - l) // d + 1 if T >= l else 0
    ck = np.zeros((hkv, n_cmp, D))
    cv = np.zeros((hkv, n_cmp, D))
    for hh in range(hkv):
        for i in range(n_cmp):
            kb = (k_pre[hh, i * d:i * d + l] + lp["cmp_pe"][hh]).reshape(-1)
            vb = v[hh, i * d:i * d + l].reshape(-1)
            ck[hh, i] = kb @ lp["cmp_wk"][hh]
            cv[hh, i] = vb @ lp["cmp_wv"][hh]
        ck[hh] = np_rope(ck[hh], np.arange(n_cmp) * d, theta)
    z = h @ lp["gate_w"] + lp["gate_b"]
    gate = 1 / (1 + np.exp(-z.reshape(T, hq, 3)))
    # overlap weights from the definition: compressed block i overlaps selection block j by
    # |[i*d, i*d+l) ∩ [j*bs, (j+1)*bs)| / d strides
    n_blocks = -(-T // bs)
    out = np.zeros((hq, T, D))
    chosen = {}
    for t in range(T):
        nvis = sum(1 for i in range(n_cmp) if t >= i * d + l - 1)
        for hh in range(hkv):
            imp = np.zeros(n_blocks)
            o_cmp = {}
            for gg in range(g):
                head = hh * g + gg
                o_cmp[head], p = np_softmax_attend(q_rot[head, t], ck[hh, :nvis], cv[hh, :nvis], scale)
                for i in range(nvis):
                    for j in range(n_blocks):
                        ov = max(0, min(i * d + l, (j + 1) * bs) - max(i * d, j * bs)) / d
                        imp[j] += ov * p[i]
            cur = t // bs
            score = {j: (np.inf if j < c.init_blocks or cur - c.local_blocks < j else imp[j]) for j in range(cur + 1)}
            top = sorted(score, key=lambda j: -score[j])[:c.top_n]
            chosen[(hh, t)] = set(top)
            sel = [s for s in range(t + 1) if s // bs in chosen[(hh, t)]]
            win = list(range(max(0, t - c.window + 1), t + 1))
            for gg in range(g):
                head = hh * g + gg
                o_slc, _ = np_softmax_attend(q_rot[head, t], k_rot[hh, sel], v[hh, sel], scale)
                o_win, _ = np_softmax_attend(q_rot[head, t], k_rot[hh, win], v[hh, win], scale)
                out[head, t] = (gate[t, head, 0] * o_cmp[head] + gate[t, head, 1] * o_slc
                                + gate[t, head, 2] * o_win)
    return out, chosen


def _inputs(T, seed=0, b=2):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, CFG.n_heads, T, CFG.head_dim))
    k = r.normal(size=(b, CFG.n_kv_heads, T, CFG.head_dim))
    v = r.normal(size=(b, CFG.n_kv_heads, T, CFG.head_dim))
    h = r.normal(size=(b, T, CFG.d_model))
    return q, k, v, h


@pytest.mark.parametrize("T", [37])
def test_nsa_attention_matches_float64_reference(T):
    q_pre, k_pre, v, h = _inputs(T)
    lp = init_nsa_params(CFG, NSA, jax.random.PRNGKey(1), noise=0.2)[0]
    lp["gate_b"] = lp["gate_b"] + jax.random.normal(jax.random.PRNGKey(2), lp["gate_b"].shape)
    from models.rope import apply_rope
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    q_rot, k_rot = apply_rope(f32(q_pre), pos, CFG), apply_rope(f32(k_pre), pos, CFG)
    out, aux = nsa_attention(q_rot, k_rot, f32(k_pre), f32(v), f32(h), lp, NSA, CFG, return_aux=True)
    for b in range(2):
        qr = np.stack([np_rope(q_pre[b, i], np.arange(T), CFG.rope_theta) for i in range(CFG.n_heads)])
        want, chosen = np_nsa(qr, k_pre[b], v[b], h[b], lp, NSA, CFG.rope_theta)
        got = np.asarray(out[b])
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, err
        idx = np.asarray(aux["indices"][b])
        for (hh, t), s in chosen.items():
            assert set(idx[hh, t][idx[hh, t] >= 0].tolist()) == s, (hh, t)
    if T > NSA.block_size * NSA.top_n:     # selection really drops blocks at this length
        assert (np.asarray(aux["counts"]) == NSA.top_n).any()
        assert np.abs(np.asarray(aux["slc"] - aux["win"])).max() > 1e-2


def test_selection_skips_blocks_and_forces_init_and_local():
    q_pre, k_pre, v, h = _inputs(61, seed=3, b=1)
    cfg = dataclasses.replace(NSA, top_n=4, local_blocks=2)
    lp = init_nsa_params(CFG, cfg, jax.random.PRNGKey(1), noise=0.2)[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    _, aux = nsa_attention(f32(q_pre), f32(k_pre), f32(k_pre), f32(v), f32(h), lp, cfg, CFG, return_aux=True)
    idx = np.asarray(aux["indices"])[0]
    for t in (40, 60):
        for hh in range(CFG.n_kv_heads):
            s = set(idx[hh, t].tolist())
            cur = t // cfg.block_size
            assert {0, cur, cur - 1} <= s and len(s) == 4 and max(s) <= cur


def test_converted_model_reproduces_dense_when_gated_to_window_or_selection():
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 23), 0, CFG.vocab_size, jnp.int32)
    from kvjax.cache import init_cache
    pos = jnp.broadcast_to(jnp.arange(23, dtype=jnp.int32), (2, 23))
    dense = forward(params, toks, pos, init_cache(2, 2, 2, 23, 16), CFG)[0]
    win = dataclasses.replace(NSA, window=64, gate_override=(0.0, 0.0, 1.0))
    slc = dataclasses.replace(NSA, top_n=3, block_size=8, gate_override=(0.0, 1.0, 0.0))   # 3 * 8 >= 23
    for cfg in (win, slc):
        got = nsa_forward(params, init_nsa_params(CFG, cfg), toks, CFG, cfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=2e-5, rtol=0)
    # the default init: slc + win gates 0.5 + 0.5, compression at sigmoid(-4) -> close to dense
    cfg = dataclasses.replace(NSA, window=64, top_n=3)
    got = nsa_forward(params, init_nsa_params(CFG, cfg), toks, CFG, cfg)
    rel = np.linalg.norm(np.asarray(got - dense)) / np.linalg.norm(np.asarray(dense))
    assert 0 < rel < 0.05, rel


def test_nnx_module_matches_functional_and_dense_layers():
    from flax import nnx
    from models.nnx_llama import from_params
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    cfg = dataclasses.replace(NSA, layers=(1,))
    model = NSALlama(from_params(CFG, params), cfg, rngs=nnx.Rngs(3), noise=0.1)
    toks = jax.random.randint(jax.random.PRNGKey(6), (1, 29), 0, CFG.vocab_size, jnp.int32)
    got = model(toks)
    want = nsa_forward(params, model.nsa_params(), toks, CFG, cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # only layer 1 is NSA; the NSA weights are Params of the module (what nnx.split hands an optimizer)
    assert set(model.nsa_params()) == {1}
    state = nnx.state(model, nnx.Param)
    assert state["nsa"][0]["cmp_wk"].get_value().shape == (CFG.n_kv_heads, 4 * 16, 16)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="multiples of kernel_stride"):
        NSAConfig(kernel_size=30, kernel_stride=16)
    with pytest.raises(ValueError, match="multiples of kernel_stride"):
        NSAConfig(block_size=40)
    with pytest.raises(ValueError, match="inside top_n"):
        NSAConfig(top_n=2, init_blocks=1, local_blocks=2)
    with pytest.raises(ValueError, match="positive"):
        NSAConfig(window=0)
    with pytest.raises(ValueError, match="out of range"):
        init_nsa_params(CFG, NSAConfig(layers=(5,)))
    params = init_params(CFG, jax.random.PRNGKey(0))
    nsa = init_nsa_params(CFG, NSA)
    with pytest.raises(ValueError, match="non-empty"):
        nsa_forward(params, nsa, jnp.zeros((1, 0), jnp.int32), CFG, NSA)
    other = dataclasses.replace(CFG, name="other", n_kv_heads=3, n_heads=6)
    with pytest.raises(ValueError, match="needs"):
        nsa_forward(init_params(other, jax.random.PRNGKey(0)), nsa, jnp.zeros((1, 5), jnp.int32), other, NSA)
    # a context shorter than one compression block: the compressed branch is empty, output finite
    got = nsa_forward(params, nsa, jnp.zeros((1, 2), jnp.int32), CFG, NSA)
    assert np.isfinite(np.asarray(got)).all()


def test_selected_attention_reference_masks_causally():
    """The kernels' oracle on its own: one selected block = plain causal attention inside it."""
    r = np.random.default_rng(4)
    q = jnp.asarray(r.normal(size=(1, 2, 20, 16)), jnp.float32)
    k = jnp.asarray(r.normal(size=(1, 1, 20, 16)), jnp.float32)
    v = jnp.asarray(r.normal(size=(1, 1, 20, 16)), jnp.float32)
    idx = jnp.full((1, 1, 20, 2), -1, jnp.int32).at[..., 0].set(jnp.arange(20) // 8)
    out = np.asarray(selected_attention(q, k, v, idx, 8, 0.25))
    for t in (0, 9, 19):
        lo = t // 8 * 8
        s = np.asarray(q[0, 1, t]) @ np.asarray(k[0, 0, lo:t + 1]).T * 0.25
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, 1, t], p / p.sum() @ np.asarray(v[0, 0, lo:t + 1]), rtol=1e-5, atol=1e-6)
