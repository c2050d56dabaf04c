"""kvjax.quant registry: every named cache runs through kvjax.generate.generate on a tiny model,
stays close to the dense cache's logits, and bad names/options are clear ValueErrors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.generate import forward_jit, generate
from kvjax.quant import QUANT_CACHES, bits_per_coordinate, bytes_per_token_head, make_cache_init
from models.config import ModelConfig
from models.llama import init_params

# head_dim 64 so that every method's default groups fit (GEAR G=64, QJL m=256, KIVI G=32)
CFG = ModelConfig(name="tiny64", vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=64, ffn_dim=96, rope_theta=10000.0)
PROMPT_LEN = 100


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3, stacked=True)
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (PROMPT_LEN,), 0, CFG.vocab_size))
    return params, ids


@pytest.fixture(scope="module")
def overrides(tiny):
    """Per-name options the tiny model needs: a KVQuant calibration on its own activations, a
    KVTuner per-layer config, and small buffers/intervals so the test exercises flushes."""
    from kvjax.quant import kvquant
    params, _ = tiny
    calib_ids = np.asarray(jax.random.randint(jax.random.PRNGKey(7), (256,), 0, CFG.vocab_size))
    calib = kvquant.calibrate(params, CFG, calib_ids, kvquant.KVQuantConfig(bits=4), bits_list=(3, 4))
    return {"kvquant4": {"calibration": calib}, "kvquant3": {"calibration": calib},
            "kvtuner": {"layer_bits": [(4, 4), (4, 2)]},
            "kivi2": {"residual": 32}, "kivi4": {"residual": 32},
            "zipcache": {"interval": 32}, "mikv": {"interval": 32}, "mikv4": {"interval": 32}}


CAP = 128 + 6  # generate's capacity: the prompts padded to its 64-token bucket + max_new_tokens


@pytest.fixture(scope="module")
def dense_logits(tiny):
    params, ids = tiny
    return _teacher_forced(params, ids, kvcache.init_cache(CFG.n_layers, 2, CFG.n_kv_heads, CAP, CFG.head_dim))


def _teacher_forced(params, ids, cache):
    """Logits [PROMPT_LEN, vocab] of the prompt fed in 64-token chunks (batch 2, the shapes generate
    compiles for), row 0."""
    outs = []
    toks = np.zeros((2, 128), np.int32)
    toks[:, :PROMPT_LEN] = ids
    for s in range(0, 128, 64):
        pos = np.arange(s, s + 64, dtype=np.int32)
        pos = np.where(pos < PROMPT_LEN, pos, -1)  # the tail is padding (never attended)
        lg, cache, _ = forward_jit(params, jnp.asarray(toks[:, s:s + 64]), jnp.asarray(np.stack([pos, pos])),
                                   cache, CFG, all_logits=True)
        outs.append(np.asarray(lg[0], np.float64))
    return np.concatenate(outs)[:PROMPT_LEN]


def _kl(p_logits, q_logits):
    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logp(p_logits), logp(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


@pytest.mark.parametrize("name", sorted(QUANT_CACHES))
def test_registered_cache_runs_in_generate(name, tiny, overrides, dense_logits):
    params, ids = tiny
    init = make_cache_init(name, **overrides.get(name, {}))
    # generate: two prompts of different lengths (left padding), prefill in chunks, then decode
    res = generate(params, CFG, [list(ids), list(ids[:61])], max_new_tokens=6, cache_init=init,
                   chunk_size=64, eos_ids=())
    assert [len(r) for r in res.tokens] == [6, 6]
    assert all(0 <= t < CFG.vocab_size for r in res.tokens for t in r)
    assert res.stats["cache_bytes"] > 0


@pytest.mark.parametrize("name", ["kvquant4", "qjl", "kvtuner"])
def test_registered_cache_fidelity(name, tiny, overrides, dense_logits):
    """The prompt teacher-forced through the cache: its distributions stay nearer the dense cache's
    than an unrelated distribution (the dense logits of the previous position) is. (KIVI, GEAR and
    RotateKV are checked at 8 bits below, where a wrong position/rotation would show.)"""
    params, ids = tiny
    init = make_cache_init(name, **overrides.get(name, {}))
    kl = _kl(dense_logits, _teacher_forced(params, ids, init(CFG, 2, CAP)))
    base = _kl(dense_logits, np.roll(dense_logits, 1, axis=0))
    assert np.isfinite(kl) and kl < 0.75 * base, (name, kl, base)


@pytest.mark.parametrize("name", ["kivi2", "gear2", "rotatekv2"])
def test_8bit_variant_is_near_lossless(name, tiny, dense_logits):
    """The same cache path at 8 bits: positions, RoPE, rotations and flush order are right when
    only 8-bit rounding error is left."""
    params, ids = tiny
    kl = _kl(dense_logits, _teacher_forced(params, ids, make_cache_init(name, bits=8)(CFG, 2, CAP)))
    assert kl < 5e-3, (name, kl)


def test_bytes_accounting():
    """Spec numbers: KIVI-2 at d=128, G=32 is 96 B per token per kv-head; at SmolLM2's d=64 48 B (3 bits)."""
    cfg128 = ModelConfig(name="d128", vocab_size=8, d_model=128, n_layers=1, n_heads=1, n_kv_heads=1,
                         head_dim=128, ffn_dim=8)
    assert bytes_per_token_head("kivi2", cfg128) == 96.0
    assert bytes_per_token_head("kivi4", cfg128) == 160.0
    assert bytes_per_token_head("kivi2", CFG) == 48.0
    assert bits_per_coordinate("kivi2", CFG) == 3.0
    assert bytes_per_token_head("rotatekv2", CFG) == 2 * (16 + 4)
    assert bytes_per_token_head("kvquant4", CFG) == 2 * (32 + 2 * 1 * 3) + 4   # codes, 1+1 outliers (f16 + u8), offset/range
    for name in QUANT_CACHES:
        if name == "kvtuner":
            continue
        b = bytes_per_token_head(name, CFG)
        assert 0 < b < 2 * 2 * CFG.head_dim, (name, b)  # below an fp16 cache


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown quantized cache 'kivi3'"):
        make_cache_init("kivi3")
    with pytest.raises(ValueError, match="unknown option"):
        make_cache_init("kivi2", gruop=32)
    with pytest.raises(ValueError, match="calibrate"):
        make_cache_init("kvquant4")
    with pytest.raises(ValueError, match="layer_bits"):
        make_cache_init("kvtuner")
    with pytest.raises(ValueError, match="bit"):
        make_cache_init("kivi2", bits=3)(CFG, 1, 64)
    with pytest.raises(ValueError, match="divide"):
        make_cache_init("gear2", group=48)(CFG, 1, 64)
    with pytest.raises(ValueError, match="bits"):
        make_cache_init("rotatekv2", bits=3)(CFG, 1, 64)


# bad input through the registry, for every method: an unsupported bit width, a group size that does
# not divide head_dim (where the method has groups), NaN/inf in appended K/V (eager calls)
BAD_BITS = {"kivi2": {"bits": 3}, "kivi4": {"k_bits": 5}, "kvquant4": {"bits": 5}, "kvquant3": {"bits": 1},
            "qjl": {"value_bits": 3}, "gear4": {"bits": 3}, "gear2": {"bits": 1}, "rotatekv2": {"bits": 3},
            "rotatekv4": {"bits": 5}, "kvtuner": {"layer_bits": [(3, 3), (2, 2)]}, "zipcache": {"hi_bits": 3},
            "mikv": {"lo_bits": 3}, "mikv4": {"hi_bits": 5}}
BAD_GROUP = {"kivi2": {"group": 48}, "kivi4": {"group": 24}, "qjl": {"value_group": 48}, "gear4": {"group": 48},
             "gear2": {"group": 24}, "rotatekv2": {"group": 48}, "rotatekv4": {"group": 24},
             "kvtuner": {"group": 24, "residual": 48}, "mikv": {"group": 48}, "mikv4": {"group": 24}}


@pytest.mark.parametrize("name", sorted(QUANT_CACHES))
def test_bad_input_every_method(name, overrides):
    assert set(BAD_BITS) == set(QUANT_CACHES)
    base = overrides.get(name, {})
    with pytest.raises(ValueError, match="bit"):
        make_cache_init(name, **{**base, **BAD_BITS[name]})(CFG, 1, 64)
    if name in BAD_GROUP:
        with pytest.raises(ValueError, match="divid"):
            make_cache_init(name, **{**base, **BAD_GROUP[name]})(CFG, 1, 64)
    layer = jax.tree_util.tree_map(lambda x: x[0], make_cache_init(name, **base)(CFG, 1, 64))
    k = jax.random.normal(jax.random.PRNGKey(0), (1, CFG.n_kv_heads, 8, CFG.head_dim))
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="NaN|inf|finite"):
            layer.append(k.at[0, 1, 3, 5].set(bad), k, pos, keys_pre_rope=k.at[0, 1, 3, 5].set(bad))
        with pytest.raises(ValueError, match="NaN|inf|finite"):
            layer.append(k, k.at[0, 0, 7, 0].set(-bad), pos, keys_pre_rope=k)
