"""KIVI packed cache and the shared packing/quantization helpers vs float64 numpy references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.quant import kivi, packing


# ----------------------------------------------------------------------------- numpy references

def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """LAYOUT.md planar packing written out with explicit loops over bit-fields."""
    n = codes.shape[-1]
    if bits == 3:
        return np.concatenate([ref_pack(codes & 3, 2), ref_pack(codes >> 2, 1)], axis=-1)
    if bits == 8:
        return codes.astype(np.uint8)
    f = 8 // bits
    p = n // f
    out = np.zeros(codes.shape[:-1] + (p,), np.int64)
    for i in range(f):
        out |= codes[..., i * p:(i + 1) * p].astype(np.int64) << (bits * i)
    return out.astype(np.uint8)


def ref_quant(x: np.ndarray, bits: int, group: int, axis: int):
    """Spec formula in float64 with fp16-stored scale/min -> (x_hat, scale broadcast to x)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    shp = x.shape
    xg = x.reshape(shp[:-1] + (shp[-1] // group, group))
    lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    mn = lo.astype(np.float16).astype(np.float64)
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = np.where(scale > 0, np.clip(np.round((xg - mn) / scale), 0, 2 ** bits - 1), 0)
    xhat = (code * scale + mn).reshape(shp)
    sc = np.broadcast_to(scale, xg.shape).reshape(shp)
    return np.moveaxis(xhat, -1, axis), np.moveaxis(sc, -1, axis)


def assert_matches_ref(got, x, bits, group, axis):
    ref, scale = ref_quant(x, bits, group, axis)
    got = np.asarray(got, np.float64)
    diff = np.abs(got - ref)
    # identical up to one fp16 ulp of the stored scale/min (float32 vs float64 before the fp16
    # rounding) times the code, and rare one-level rounding ties
    ulp = (2 ** bits) * scale * 2.0 ** -10 + 2.0 ** -10 * np.abs(ref) + 1e-6
    assert np.mean(diff > ulp) < 1e-3
    assert np.all(diff <= scale * 1.001 + ulp)
    # the RTN error bound of the spec: half a step (+ fp16 rounding of the min)
    err = np.abs(got - np.asarray(x, np.float64))
    assert np.all(err <= scale * 0.5 + 2e-3 * (np.abs(x) + scale) + 1e-6)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_bit_exact_and_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(3, 5, 64)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    np.testing.assert_array_equal(np.asarray(packed), ref_pack(codes, bits))
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits)), codes)


def test_pack_bad_input():
    with pytest.raises(ValueError, match="bit width"):
        packing.pack(jnp.zeros((4, 8), jnp.uint8), 5)
    with pytest.raises(ValueError, match="multiple"):
        packing.pack(jnp.zeros((4, 6), jnp.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack(jnp.zeros((4, 8), jnp.int32), 2)


@pytest.mark.parametrize("bits", [2, 4])
def test_key_value_quantizers_random(bits):
    rng = np.random.default_rng(10 + bits)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32) * rng.uniform(0.1, 5, size=(1, 1, 1, 64))
    x[0, 0, 5] = 7.0                       # a constant group row/column: scale 0 path is exercised below
    x[1, 2, :32, 3] = 1.25
    k = kivi.dequantize_keys(*kivi.quantize_keys(jnp.asarray(x), bits, 32), bits, 32)
    assert_matches_ref(k, x, bits, 32, axis=-2)       # per channel over tokens
    v = kivi.dequantize_values(*kivi.quantize_values(jnp.asarray(x), bits, 32), bits, 32)
    assert_matches_ref(v, x, bits, 32, axis=-1)       # per token over channels
    np.testing.assert_array_equal(np.asarray(k)[1, 2, :32, 3], 1.25)   # max == min -> exact
    # the two axes really differ: the per-token reference does not describe the key quantizer
    wrong, _ = ref_quant(x, bits, 32, axis=-1)
    assert np.abs(np.asarray(k) - wrong).max() > 1e-2
    codes, scale, mn = kivi.quantize_keys(jnp.asarray(x), bits, 32)
    assert codes.shape == (2, 3, 64, 64 * bits // 8) and scale.shape == (2, 3, 2, 64) and mn.dtype == jnp.float16
    codes, scale, mn = kivi.quantize_values(jnp.asarray(x), bits, 32)
    assert scale.shape == (2, 3, 64, 2)


# ----------------------------------------------------------------------------- the cache

def _fill(cfg, chunks, heads=2, d=32, capacity=100, seed=0):
    rng = np.random.default_rng(seed)
    total = sum(chunks)
    K = rng.standard_normal((2, heads, total, d)).astype(np.float32)
    V = rng.standard_normal((2, heads, total, d)).astype(np.float32)
    c = kivi.init_kivi_cache_from(cfg, 1, 2, heads, capacity, d)
    layer = jax.tree_util.tree_map(lambda a: a[0], c)
    s = 0
    for n in chunks:
        pos = np.tile(np.arange(s, s + n), (2, 1))
        layer = layer.append(jnp.asarray(K[:, :, s:s + n]), jnp.asarray(V[:, :, s:s + n]), jnp.asarray(pos))
        s += n
    return layer, K, V


@pytest.mark.parametrize("chunks", [(70,), (21, 1, 1, 30, 17)])
def test_cache_residual_rule_and_values(chunks):
    cfg = kivi.KIVIConfig(2, 4, 8, 16)
    layer, K, V = _fill(cfg, chunks)
    T, R = sum(chunks), cfg.residual
    kq, vq = (T // R) * R, max(T - R, 0)        # KIVI: keys flushed in R-blocks, values keep R
    np.testing.assert_array_equal(np.asarray(layer.k_len), kq)
    np.testing.assert_array_equal(np.asarray(layer.v_len), vq)
    np.testing.assert_array_equal(np.asarray(layer.lengths), T)
    k, v = kivi.dequantize(layer)
    k, v = np.asarray(k)[:, :, :T], np.asarray(v)[:, :, :T]
    assert_matches_ref(k[:, :, :kq], K[:, :, :kq], 2, 8, axis=-2)
    np.testing.assert_array_equal(k[:, :, kq:], K[:, :, kq:])          # fp tail exact
    assert_matches_ref(v[:, :, :vq], V[:, :, :vq], 4, 8, axis=-1)
    np.testing.assert_array_equal(v[:, :, vq:], V[:, :, vq:])          # fp window exact
    pos = np.asarray(layer.positions)
    np.testing.assert_array_equal(pos[:, :, :T], np.broadcast_to(np.arange(T), (2, 2, T)))
    assert np.all(pos[:, :, T:] == -1)


def test_left_padding_positions_masked():
    cfg = kivi.KIVIConfig(4, 4, 8, 16)
    c = jax.tree_util.tree_map(lambda a: a[0], kivi.init_kivi_cache_from(cfg, 1, 2, 1, 40, 16))
    pos = np.array([[-1, -1, -1, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    x = jnp.ones((2, 1, 6, 16))
    c = c.append(x, x, jnp.asarray(pos))
    c = c.append(x[:, :, :1], x[:, :, :1], jnp.asarray([[3], [6]]))
    p = np.asarray(c.positions)[:, 0, :8]
    np.testing.assert_array_equal(p[0], [-1, -1, -1, 0, 1, 2, 3, -1])
    np.testing.assert_array_equal(p[1], [0, 1, 2, 3, 4, 5, 6, -1])


def test_memory_bytes_spec_accounting():
    # KIVI-2, d=128, G=32: 48 B of keys + 48 B of values per token per kv-head (spec table)
    assert kivi.bytes_per_token(128, 2, 2, 32) == 96
    assert kivi.bytes_per_token(128, 4, 4, 32) == 160
    L, B, H, C = 2, 1, 3, 256
    c = kivi.init_kivi_cache_from(kivi.KIVIConfig(2, 2, 32, 128), L, B, H, C, 128)
    assert c.quantized_bytes() == 96 * L * B * H * C
    resid = 2 * L * B * H * 128 * 128 * 4            # float32 K tail + V window
    assert c.memory_bytes() == c.quantized_bytes() + resid + 4 * L * B * H * 4
    # SmolLM2: d = 64 -> 16 + 8 bytes of keys and 16 + 8 bytes of values = 48 B per token per kv-head
    c = kivi.init_kivi_cache_from(kivi.KIVIConfig(2, 2, 32, 128), L, B, H, C, 64)
    assert c.quantized_bytes() == 48 * L * B * H * C == kivi.bytes_per_token(64, 2, 2, 32) * L * B * H * C
    c4 = kivi.init_kivi_cache_from(kivi.KIVIConfig(4, 4, 32, 128), L, B, H, C, 64)
    assert c4.quantized_bytes() == (32 + 8) * 2 * L * B * H * C


def test_bad_input():
    with pytest.raises(ValueError, match="k_bits=3"):
        kivi.init_kivi_cache_from(kivi.KIVIConfig(3, 2), 1, 1, 1, 64, 64)
    with pytest.raises(ValueError, match="divide head_dim"):
        kivi.init_kivi_cache_from(kivi.KIVIConfig(2, 2, 48, 96), 1, 1, 1, 64, 64)
    with pytest.raises(ValueError, match="multiple of the group"):
        kivi.init_kivi_cache_from(kivi.KIVIConfig(2, 2, 32, 40), 1, 1, 1, 64, 64)
    layer = jax.tree_util.tree_map(lambda a: a[0], kivi.init_kivi_cache_from(kivi.KIVIConfig(2, 2, 8, 16), 1, 1, 1, 32, 16))
    bad = np.ones((1, 1, 3, 16), np.float32)
    bad[0, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layer.append(jnp.asarray(bad), jnp.ones((1, 1, 3, 16)), jnp.arange(3)[None])
    with pytest.raises(ValueError, match="NaN"):
        kivi.check_prefill_inputs(jnp.ones((1, 1, 3, 16)), jnp.asarray(bad))
    with pytest.raises(ValueError, match="do not match"):
        layer.append(jnp.ones((1, 1, 3, 8)), jnp.ones((1, 1, 3, 8)), jnp.arange(3)[None])


def test_resize_keeps_contents():
    layer, K, V = _fill(kivi.KIVIConfig(2, 2, 8, 16), (37,), capacity=48)
    big = kivi.resize(layer, 90)
    assert big.capacity == 96
    a, b = kivi.dequantize(layer), kivi.dequantize(big)
    np.testing.assert_array_equal(np.asarray(a[0])[:, :, :37], np.asarray(b[0])[:, :, :37])
    np.testing.assert_array_equal(np.asarray(a[1])[:, :, :37], np.asarray(b[1])[:, :, :37])
    with pytest.raises(ValueError, match="cannot shrink"):
        kivi.resize(layer, 20)


# ----------------------------------------------------------------------------- real SmolLM2

PROMPT = 40   # not a multiple of G or R


@pytest.fixture(scope="module")
def dense_prefill(smollm2, smollm2_tokenizer):
    """A 40-token KJV prompt prefilled into a dense cache of 48 slots: (ids, last logits, cache)."""
    from kvjax.eval.text import kjv_text
    from kvjax.generate import forward_jit
    config, params = smollm2
    ids = smollm2_tokenizer.encode(kjv_text(n_chars=400))[:PROMPT]
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 48, config.head_dim)
    # the same compiled call as the KVQuant/QJL tests' dense reference (shared jit cache)
    logits, cache, _ = forward_jit(params, jnp.asarray([ids]), jnp.arange(PROMPT)[None], cache, config,
                                   all_logits=True)
    return ids, logits[:, -1], cache


def test_real_smollm2_kv_quantization(dense_prefill):
    _, _, dense = dense_prefill
    K = np.asarray(dense.keys[::7, :, :, :32])           # a few layers, [l, 1, 3, 32, 64]
    V = np.asarray(dense.values[::7, :, :, :PROMPT])
    for bits in (2, 4):
        assert_matches_ref(kivi.dequantize_keys(*kivi.quantize_keys(jnp.asarray(K), bits, 32), bits, 32),
                           K, bits, 32, axis=-2)
        assert_matches_ref(kivi.dequantize_values(*kivi.quantize_values(jnp.asarray(V), bits, 32), bits, 32),
                           V, bits, 32, axis=-1)
    # from_dense applies KIVI's prefill rule to the whole stack (T=40, R=16: 32 keys, 24 values quantized)
    q = kivi.from_dense(dense, kivi.KIVIConfig(4, 4, 16, 16), capacity=64)
    np.testing.assert_array_equal(np.asarray(q.k_len), 32)
    np.testing.assert_array_equal(np.asarray(q.v_len), 24)
    k, v = kivi.dequantize(q)
    Kall, Vall = np.asarray(dense.keys[::7]), np.asarray(dense.values[::7])
    assert_matches_ref(np.asarray(k)[::7, :, :, :32], Kall[:, :, :, :32], 4, 16, axis=-2)
    np.testing.assert_array_equal(np.asarray(k)[::7, :, :, 32:PROMPT], Kall[:, :, :, 32:PROMPT])
    assert_matches_ref(np.asarray(v)[::7, :, :, :24], Vall[:, :, :, :24], 4, 16, axis=-1)
    np.testing.assert_array_equal(np.asarray(v)[::7, :, :, 24:PROMPT], Vall[:, :, :, 24:PROMPT])


def test_real_smollm2_generate_with_kivi_cache(smollm2, dense_prefill):
    """kvjax.generate.generate runs unchanged on the KIVI cache (cache_init), with left padding."""
    import functools
    from kvjax.generate import generate
    config, params = smollm2
    ids = dense_prefill[0]
    kw = dict(max_new_tokens=5, bucket=16, eos_ids=())     # 40 tokens -> padded to 48 (8 pad tokens)
    dense = generate(params, config, [ids], **kw)
    init = functools.partial(kivi.init_kivi_cache, bits=8, group=32, residual=32)
    k8 = generate(params, config, [ids], cache_init=init, **kw)
    # 8-bit KIVI is near-lossless: the same greedy continuation
    assert k8.tokens == dense.tokens and len(k8.tokens[0]) == 5
    # the cache really is packed: 8-bit codes + fp16 stats + two 32-token fp32 windows per head
    L, H, d = config.n_layers, config.n_kv_heads, config.head_dim
    want = L * H * (64 * kivi.bytes_per_token(d, 8, 8, 32) + 2 * 32 * d * 4 + 4 * 4)
    assert k8.stats["cache_bytes"] == want


def test_decode_append_equals_general_append():
    """The one-token append (decode fast path: select into the tail, flush under lax.cond, one
    scattered value row) leaves exactly the cache the general per-row append leaves, step by step
    across key flushes, the value window filling and sliding, ragged left padding and capacity
    overflow (writes past the capacity dropped)."""
    for bits, (b, h, d, cap, r) in [(4, (3, 2, 64, 200, 32)), (2, (2, 3, 32, 130, 64))]:
        one = jax.tree.map(lambda x: x[0], kivi.init_kivi_cache_from(kivi.KIVIConfig(bits, bits, 32, r), 1, b, h,
                                                                     cap, d, jnp.float32))
        t = 37
        pos = np.tile(np.arange(t), (b, 1))
        pos[0, :5], pos[0, 5:] = -1, np.arange(t - 5)
        k = jax.random.normal(jax.random.PRNGKey(1), (b, h, t, d))
        one = kivi._append_rows(one, k, 0.5 * k + 1, jnp.asarray(pos))
        gen, p = one, jnp.asarray(pos[:, -1] + 1)
        step_one, step_gen = jax.jit(kivi._append_one), jax.jit(kivi._append_rows)
        for i in range(cap - t + 3):
            kn = jax.random.normal(jax.random.PRNGKey(10 + i), (b, h, 1, d))
            one, gen, p = step_one(one, kn, 0.3 * kn - 1, p[:, None]), step_gen(gen, kn, 0.3 * kn - 1, p[:, None]), p + 1
        assert int(one.k_len.max()) >= cap - r and int(one.lengths.max()) > cap     # flushed and overflowed
        for a, g in zip(jax.tree.leaves(one), jax.tree.leaves(gen)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(g))


def test_engine_prefill_is_full_precision_then_quantized():
    """kvjax.generate.prefill over a KIVI cache (auto dense_first): the prompt attends in full
    precision (logits equal a dense-cache prefill's) and the cache then holds KIVI's prefill rule
    applied to the dense K/V (kivi.from_dense, written apart: stacked, one append). With
    dense_first=False every chunk attends to the quantized earlier chunks: the logits move."""
    import dataclasses
    from kvjax.generate import forward_jit, init_engine_cache, prefill
    from kvjax.layerwise import stacked
    from kvjax.quant import make_cache_init
    from models.config import get_config
    from models.llama import init_params, unstack_params
    cfg = dataclasses.replace(get_config("llama3-8b"), name="kivi-prefill-test", n_layers=2, d_model=128, n_heads=4,
                              n_kv_heads=2, head_dim=64, ffn_dim=256, vocab_size=256)
    params = unstack_params(init_params(cfg, jax.random.PRNGKey(3), scale=0.5))
    b, t, cap = 2, 96, 160
    tokens = jax.random.randint(jax.random.PRNGKey(4), (b, t), 0, cfg.vocab_size)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    pos[1, :10], pos[1, 10:] = -1, np.arange(t - 10)                  # left padding in row 1
    pos = jnp.asarray(pos)
    init = make_cache_init("kivi2", group=32, residual=32)
    dense = kvcache.init_cache(cfg.n_layers, b, cfg.n_kv_heads, cap, cfg.head_dim)
    want_logits, dense, _ = forward_jit(params, tokens, pos, dense, cfg)
    logits, q, _ = prefill(params, cfg, tokens, pos, init_engine_cache(cfg, b, cap, jnp.float32, init), chunk_size=32)
    err = float(jnp.linalg.norm(logits - want_logits[:, -1]) / jnp.linalg.norm(want_logits[:, -1]))
    assert err < 1e-5, err          # chunks of 32 vs one forward: f32 summation order only
    want = kivi.from_dense(dense, kivi.KIVIConfig(2, 2, 32, 32), capacity=cap)
    for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_len", "v_len", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(stacked(q), name)), np.asarray(getattr(want, name)), name)
    # quantized chunks: the 2-bit earlier chunks change the last position's distribution
    fq, _, _ = prefill(params, cfg, tokens, pos, init_engine_cache(cfg, b, cap, jnp.float32, init), chunk_size=32,
                       dense_first=False)
    rel = float(jnp.linalg.norm(fq - logits) / jnp.linalg.norm(logits))
    assert rel > 1e-3, rel
    with pytest.raises(ValueError, match="dense_first"):
        prefill(params, cfg, tokens, pos, init_engine_cache(cfg, b, cap, jnp.float32), dense_first=True)


def test_short_prompt_kivi_cache_is_not_larger_than_the_full_cache():
    """KIVI-2's two fp windows of R = 128 tokens per head outgrow a 20-token prompt (the KIVI cache
    would be ~5x the full one): generate uses the full cache there, with a note, and the same
    tokens; 208 slots with R = 32 keep the quantized cache (less than half the full one's bytes)."""
    import dataclasses
    from kvjax.generate import generate, no_larger_than_dense
    from kvjax.quant import make_cache_init
    from models.config import get_config
    from models.llama import init_params
    cfg = dataclasses.replace(get_config("llama3-8b"), name="kivi-short-test", n_layers=2, d_model=128, n_heads=4,
                              n_kv_heads=2, head_dim=64, ffn_dim=256, vocab_size=256)
    params = init_params(cfg, jax.random.PRNGKey(5), scale=0.5)
    kw = dict(max_new_tokens=8, bucket=1, eos_ids=())
    short = np.random.default_rng(0).integers(0, 256, 20).tolist()
    full = generate(params, cfg, [short], **kw)
    layer_kivi = kivi.init_kivi_cache(cfg, 1, 28, bits=2)        # what a KIVI-2 cache of 28 slots allocates
    assert layer_kivi.memory_bytes() > full.stats["cache_bytes"]
    k2 = generate(params, cfg, [short], kv_quant="kivi2", **kw)
    assert k2.stats["cache_bytes"] <= full.stats["cache_bytes"] and k2.tokens == full.tokens
    assert any("kivi2" in n and "full cache is used" in n for n in k2.stats["notes"])
    init = make_cache_init("kivi2", residual=32)            # 208 slots: the quantized cache is kept (shapes only)
    kept, notes = no_larger_than_dense(init, cfg, 1, 208, jnp.float32)
    assert kept is init and notes == ()
    dense_bytes = cfg.n_layers * cfg.n_kv_heads * (208 * (2 * cfg.head_dim * 4 + 4) + 4)   # K, V, positions; lengths
    assert kvcache.tree_bytes(jax.eval_shape(lambda: init(cfg, 1, 208))) < dense_bytes / 2
    assert no_larger_than_dense(init, cfg, 1, 24, jnp.float32)[0] is None
