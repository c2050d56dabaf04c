"""Eviction x quantization (kvjax.quant.evicted): a policy's kept tokens stored by KIVI.

References: the unquantized policy's kept set (same engine, dense cache), float64 numpy quantizers
of the KIVI spec (`test_quant_kivi.ref_quant`), and a float64 numpy simulation of decode steps
(KIVI's residual rules + softmax attention) written here, apart from the cache code."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.compression import Compression
from kvjax.eval import fidelity
from kvjax.observation import Observe
from kvjax.policies import make_policy
from kvjax.policies.base import Budget
from kvjax.quant import evicted, kivi, make_cache_init
from models.config import ModelConfig
from models.llama import init_params
from test_quant_kivi import assert_matches_ref, ref_quant

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  ffn_dim=64, rope_theta=10000.0)
G, R = 8, 16
KIVI4 = make_cache_init("kivi4", group=G, residual=R)
KIVI2 = make_cache_init("kivi2", group=G, residual=R)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)


@pytest.fixture(scope="module")
def context():
    return jax.random.randint(jax.random.PRNGKey(3), (2, 90), 0, CFG.vocab_size, jnp.int32)


def _dense_layer(lengths, cap=40, d=16, seed=0):
    """A gathered-style layer: live slots first (per-head `lengths`), positions increasing with gaps."""
    rng = np.random.default_rng(seed)
    b, h = lengths.shape
    keys = rng.normal(size=(b, h, cap, d)) * rng.uniform(0.5, 3.0, size=(1, 1, 1, d))
    values = rng.normal(size=(b, h, cap, d))
    pos = np.full((b, h, cap), -1, np.int32)
    for i in range(b):
        for j in range(h):
            pos[i, j, :lengths[i, j]] = np.sort(rng.choice(200, lengths[i, j], replace=False))
    live = (pos >= 0)[..., None]
    return kvcache.KVCache(keys=jnp.asarray(np.where(live, keys, 0), jnp.float32),
                           values=jnp.asarray(np.where(live, values, 0), jnp.float32),
                           positions=jnp.asarray(pos), lengths=jnp.asarray(lengths, jnp.int32))


def _ref_store(k, v, n, bits):
    """float64 KIVI prefill rule on one head's kept sequence k, v [n, d]: keys of the first n - n % R
    tokens per channel over G-token groups, values of the first n - R tokens per token."""
    kl, vl = n - n % R, max(n - R, 0)
    kh, vh = k.astype(np.float64).copy(), v.astype(np.float64).copy()
    if kl:
        kh[:kl] = ref_quant(k[:kl], bits, G, axis=0)[0]
    if vl:
        vh[:vl] = ref_quant(v[:vl], bits, G, axis=1)[0]
    return kh, vh, kl, vl


@pytest.mark.parametrize("bits", [4, 2])
def test_kept_tokens_quantized_as_the_spec_says(bits):
    """Ragged per-head counts (AdaKV-like): every head's kept tokens follow KIVI's rule, the cache's
    own dequantized K/V equal the float64 reference on the same tokens, positions/lengths kept."""
    lengths = np.array([[37, 5], [16, 33]])
    dense = _dense_layer(lengths)
    cfg = kivi.KIVIConfig(bits, bits, G, R)
    q = evicted.quantize_layer(dense, cfg, capacity=44)
    assert q.capacity == 48 and q.slot_pos.shape == (2, 2, 48)
    np.testing.assert_array_equal(np.asarray(q.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(q.positions[..., :40]), np.asarray(dense.positions))
    assert np.all(np.asarray(q.positions[..., 40:]) == -1)
    back = q.to_dense()
    for i in range(2):
        for j in range(2):
            n = lengths[i, j]
            k, v = np.asarray(dense.keys[i, j, :n]), np.asarray(dense.values[i, j, :n])
            kh, vh, kl, vl = _ref_store(k, v, n, bits)
            assert int(q.kivi.k_len[i, j]) == kl and int(q.kivi.v_len[i, j]) == vl
            gk, gv = np.asarray(back.keys[i, j, :n]), np.asarray(back.values[i, j, :n])
            if kl:
                assert_matches_ref(gk[:kl], k[:kl], bits, G, axis=0)
            if vl:
                assert_matches_ref(gv[:vl], v[:vl], bits, G, axis=1)
            np.testing.assert_array_equal(gk[kl:], k[kl:])        # fp key tail: exact
            np.testing.assert_array_equal(gv[vl:], v[vl:])        # fp value window: exact
            np.testing.assert_allclose(gk, kh, rtol=0, atol=2e-3 * (np.abs(kh).max() + 1))
    # the quantized cache's own dequantization (used by attention) is what to_dense returns
    k_all, v_all = kivi.dequantize(q.kivi)
    np.testing.assert_array_equal(np.asarray(k_all), np.asarray(back.keys))
    np.testing.assert_array_equal(np.asarray(v_all), np.asarray(back.values))


def test_memory_bytes_equal_held_arrays_and_shrink(params, context):
    """memory_bytes = the bytes of the arrays held (a hand count of the layout); smaller with a
    smaller budget and with fewer bits; smaller than the dense cache at the same budget."""
    b, t = context.shape

    def pre(budget, quant):
        comp = Compression(make_policy("snapkv", window=8), Budget(ratio=budget))
        return fidelity.prefill_context(params, CFG, context, comp, 4, kv_quant=quant)

    sizes = {}
    for budget in (0.6, 0.3):
        for name, quant in (("kivi4", KIVI4), ("kivi2", KIVI2), ("dense", None)):
            p = pre(budget, quant)
            sizes[budget, name] = p.cache.memory_bytes()
            if quant is None:
                continue
            layer = p.cache.layers[0]
            cq, d, hkv = layer.capacity, CFG.head_dim, CFG.n_kv_heads
            kb = 4 if name == "kivi4" else 2
            per_layer = (b * hkv * (2 * cq * d * kb // 8            # K and V codes
                                    + 2 * 2 * (cq // G) * d         # K scale + min (fp16, per channel per group)
                                    + 2 * 2 * cq * (d // G)         # V scale + min (fp16, per token per group)
                                    + 2 * R * d * 4                 # fp32 K tail + V window
                                    + 4 * 4                         # k_len, v_len, lengths, pos_offset
                                    + cq * 4))                      # slot positions
            assert p.cache.memory_bytes() == CFG.n_layers * per_layer
            assert cq == -(-p.plan.decode_capacity // G) * G
    assert sizes[0.3, "kivi4"] < sizes[0.6, "kivi4"] and sizes[0.3, "kivi2"] < sizes[0.6, "kivi2"]
    for budget in (0.6, 0.3):
        assert sizes[budget, "kivi2"] < sizes[budget, "kivi4"] < sizes[budget, "dense"]


@pytest.mark.parametrize("policy,when", [("snapkv", "prefill"), ("adakv", "prefill"), ("h2o", "chunk"),
                                         ("pyramidkv", "chunk")])
def test_kept_set_equals_unquantized_policy(params, context, policy, when):
    """Scores come from the full-precision observation: the kept positions of every head are those
    of the unquantized policy (uniform, per-head and per-layer budgets; prefill and chunk schedules)."""
    comp = Compression(make_policy(policy, config=CFG), Budget(ratio=0.3), when=when)
    chunk = 32 if when == "chunk" else None
    dense = fidelity.prefill_context(params, CFG, context, comp, 4, chunk)
    quant = fidelity.prefill_context(params, CFG, context, comp, 4, chunk, kv_quant=KIVI4)
    dense_layers = dense.cache.layers if hasattr(dense.cache, "layers") else None
    assert all(type(lc).__name__ == "EvictedKIVICache" for lc in quant.cache.layers)
    for i, ql in enumerate(quant.cache.layers):
        dpos = np.asarray(dense_layers[i].positions) if dense_layers is not None else np.asarray(
            dense.cache.positions[i])
        qpos = np.asarray(ql.positions)
        for bb in range(context.shape[0]):
            for h in range(CFG.n_kv_heads):
                assert sorted(dpos[bb, h][dpos[bb, h] >= 0]) == sorted(qpos[bb, h][qpos[bb, h] >= 0])
    np.testing.assert_array_equal(np.asarray(quant.logits), np.asarray(dense.logits))   # prefill ran dense


def _softmax_attend(q, k, v):
    s = k @ q / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_decode_after_compression_vs_float64_simulation(backend):
    """20 decode steps (append one token, attend one query per query head) over a compressed,
    quantized layer, then a decode-time recompression and 6 more steps, against a float64 numpy
    simulation of the same rules: kept keys quantized in G-token groups, a key R-block flushed once
    the fp tail holds R keys, a value quantized when it leaves the R-token window; recompression
    dequantizes, keeps the chosen slots and requantizes them as a new kept sequence."""
    bits = 4
    lengths = np.array([[23, 9]])
    dense = _dense_layer(lengths, cap=23, seed=1)
    cfg = kivi.KIVIConfig(bits, bits, G, R)
    layer = evicted.quantize_layer(dense, cfg, capacity=64)
    rng = np.random.default_rng(7)
    sims = []     # per head: (k_hat [n, d] as the cache holds it, fp tail start, fp k rows, v rows, v_len)
    for h in range(2):
        n = lengths[0, h]
        k, v = np.asarray(dense.keys[0, h, :n], np.float64), np.asarray(dense.values[0, h, :n], np.float64)
        kh, vh, kl, vl = _ref_store(k, v, n, bits)
        sims.append(dict(k_raw=k, v_raw=v, kh=kh, vh=vh, kl=kl, vl=vl))

    def sim_append(s, k_new, v_new):
        s["k_raw"] = np.vstack([s["k_raw"], k_new]); s["v_raw"] = np.vstack([s["v_raw"], v_new])
        s["kh"] = np.vstack([s["kh"], k_new]); s["vh"] = np.vstack([s["vh"], v_new])
        n = len(s["k_raw"])
        if n - s["kl"] == R:                           # key tail full: quantize the R-block per channel
            s["kh"][s["kl"]:n] = ref_quant(s["k_raw"][s["kl"]:n], bits, G, axis=0)[0]
            s["kl"] = n
        if n - s["vl"] > R:                            # the oldest value leaves the window
            s["vh"][s["vl"]] = ref_quant(s["v_raw"][s["vl"]:s["vl"] + 1], bits, G, axis=1)[0][0]
            s["vl"] += 1

    def step(layer, t):
        kn = rng.normal(size=(1, 2, 1, 16)).astype(np.float32)
        vn = rng.normal(size=(1, 2, 1, 16)).astype(np.float32)
        qn = rng.normal(size=(1, 4, 1, 16)).astype(np.float32)
        layer = layer.append(jnp.asarray(kn), jnp.asarray(vn), jnp.asarray([[300 + t]], jnp.int32))
        out, _ = layer.attend(jnp.asarray(qn), jnp.asarray([[300 + t]], jnp.int32), observe=Observe(),
                              backend=backend)
        for h in range(2):
            sim_append(sims[h], kn[0, h], vn[0, h])
            for g in range(2):
                ref = _softmax_attend(qn[0, 2 * h + g, 0].astype(np.float64), sims[h]["kh"], sims[h]["vh"])
                got = np.asarray(out[0, 2 * h + g, 0], np.float64)
                assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref), (t, h, g)
        return layer

    for t in range(20):
        layer = step(layer, t)
    # decode-time recompression: keep every other live slot of each head, requantized
    lens = np.asarray(layer.lengths)
    idx = np.full((1, 2, 32), -1, np.int32)
    for h in range(2):
        keep = np.arange(0, lens[0, h], 2)
        idx[0, h, :len(keep)] = keep
        s = sims[h]
        kh, vh = s["kh"][keep], s["vh"][keep]            # dequantized kept tokens, then a new KIVI store
        n = len(keep)
        s.update(k_raw=kh, v_raw=vh, **dict(zip(("kh", "vh", "kl", "vl"), _ref_store(kh, vh, n, bits))))
    dense_view = layer.to_dense()
    layer = layer.requantize(kvcache.gather(dense_view, jnp.asarray(idx), capacity=layer.capacity))
    for t in range(20, 26):
        layer = step(layer, t)


def test_generate_every_schedule_and_bad_combinations(params):
    """generate(kv_quant=) with a compression in the three schedules: the cache is an evicted KIVI
    cache, smaller than the same policy's dense cache; refused combinations name their reason."""
    from kvjax.generate import generate
    prompts = [list(range(1, 71)), list(range(5, 60))]
    for when in ("prefill", "chunk", "decode"):
        comp = Compression(make_policy("snapkv", window=8), Budget(ratio=0.3), when=when, interval=8)
        kw = dict(chunk_size=32 if when == "chunk" else None, bucket=1)
        q = generate(params, CFG, prompts, 12, compression=comp, cache_init=KIVI4, **kw)
        d = generate(params, CFG, prompts, 12, compression=comp, **kw)
        assert all(type(lc).__name__ == "EvictedKIVICache" for lc in q.cache.layers)
        assert q.stats["cache_bytes"] < d.stats["cache_bytes"]
        assert all(len(r) == 12 for r in q.tokens)
        live = np.asarray(q.cache.lengths)
        assert live.max() <= q.cache.capacity
    with pytest.raises(ValueError, match="ThinK builds its own cache layout"):
        generate(params, CFG, prompts, 4, compression=Compression(make_policy("think"), Budget(ratio=0.3)),
                 kv_quant="kivi4")
    with pytest.raises(ValueError, match="eviction x mikv is not supported"):
        generate(params, CFG, prompts, 4, compression=Compression(make_policy("snapkv"), Budget(ratio=0.3)),
                 kv_quant="mikv")
    with pytest.raises(ValueError, match="not both"):
        generate(params, CFG, prompts, 4, kv_quant="kivi4", cache_init=KIVI4)
    with pytest.raises(ValueError, match="give a compression"):
        fidelity.prefill_context(params, CFG, jnp.ones((1, 20), jnp.int32), None, 2, kv_quant=KIVI4)


def test_residuals_take_the_engine_cache_dtype(params, context):
    """A bf16 model: the evicted KIVI cache's fp residuals are bf16, like plain KIVI's through
    `make_cache_init` (generate passes its cache dtype); an explicit `dtype=` option wins; memory_bytes counts 2-byte residuals (hand count of the difference)."""
    from kvjax.generate import generate, init_engine_cache
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
    comp = Compression(make_policy("snapkv", window=8), Budget(ratio=0.5))
    out = generate(p16, CFG, [list(range(1, 71))], 4, compression=comp, cache_init=KIVI4, bucket=1)
    plain = init_engine_cache(CFG, 1, 64, jnp.bfloat16, KIVI4)
    assert plain.layers[0].k_resid.dtype == jnp.bfloat16
    for lc in out.cache.layers:
        assert lc.kivi.k_resid.dtype == lc.kivi.v_resid.dtype == jnp.bfloat16
    ctx = context[:1]
    dtypes = {}
    for key, kw in (("engine bf16", dict(kv_quant=KIVI4)),
                    ("option f32", dict(kv_quant=make_cache_init("kivi4", group=G, residual=R, dtype=jnp.float32)))):
        pre = fidelity.prefill_context(p16, CFG, ctx, comp, 4, **kw)
        layer = pre.cache.layers[0]
        dtypes[key] = (layer.kivi.k_resid.dtype, layer.kivi.v_resid.dtype, pre.cache.memory_bytes())
    assert dtypes["engine bf16"][:2] == (jnp.bfloat16, jnp.bfloat16)
    assert dtypes["option f32"][:2] == (jnp.float32, jnp.float32)
    saved = CFG.n_layers * CFG.n_kv_heads * 2 * R * CFG.head_dim * 2      # K tail + V window, 4 -> 2 bytes
    assert dtypes["option f32"][2] - dtypes["engine bf16"][2] == saved
