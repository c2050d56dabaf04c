"""The Flax NNX modules (`models.nnx_llama`) over the functional core, parameter/compute dtypes,
`load_model(dtype=)`, and bf16 vs fp32 perplexity of the real SmolLM2 on KJV text."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax.cache import init_cache
from kvjax.eval.fidelity import perplexity
from kvjax.eval.text import kjv_text
from models.config import ModelConfig
from models.llama import forward, init_params, layer_params
from models.loading import cast_params, load_model, parse_dtype
from models.nnx_llama import DecoderLayer, Llama, cast, from_params, params_of

TIED = ModelConfig(name="tiny-tied", vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2,
                   head_dim=8, ffn_dim=64, tie_embeddings=True)
QWEN = ModelConfig(name="tiny-qwen", vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=12, ffn_dim=64, qkv_bias=True, qk_norm=True)
CONFIGS = pytest.mark.parametrize("config", [TIED, QWEN], ids=lambda c: c.name)

jit_forward = jax.jit(forward, static_argnames=("config",))


def _inputs(config, n=13, batch=2):
    tokens = jax.random.randint(jax.random.PRNGKey(7), (batch, n), 0, config.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    cache = init_cache(config.n_layers, batch, config.n_kv_heads, n + 3, config.head_dim)
    return tokens, positions, cache


@CONFIGS
def test_module_call_is_forward_bit_for_bit(config):
    model = Llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    tokens, positions, cache = _inputs(config)
    params = params_of(model)
    got, got_cache, _ = model(tokens, positions, cache)
    want, want_cache, _ = forward(params, tokens, positions, cache, config)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache.keys, want_cache.keys)

    # params_of: the documented layout, made of the module's own arrays
    assert isinstance(params["layers"], tuple) and len(params["layers"]) == config.n_layers
    assert params["embed"] is model.embed.get_value()
    assert params["layers"][1]["wq"] is model.layers[1].wq.get_value()
    ref = init_params(config, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert ("lm_head" in params) == (not config.tie_embeddings)
    # init as init_params: normal * 0.02, norms at 1
    assert 0.015 < float(jnp.std(params["embed"])) < 0.025
    np.testing.assert_array_equal(params["layers"][0]["attn_norm"], 1.0)
    np.testing.assert_array_equal(params["final_norm"], 1.0)

    # split/merge: the pure function for jax.jit, same logits as jitted forward
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, t, p, c: nnx.merge(graphdef, state)(t, p, c))
    jitted, _, _ = step(state, tokens, positions, cache)
    np.testing.assert_array_equal(jitted, jit_forward(params, tokens, positions, cache, config=config)[0])
    np.testing.assert_allclose(jitted, want, atol=1e-5)
    assert params_of(nnx.merge(graphdef, state))["layers"][0]["w_up"] is params["layers"][0]["w_up"]


@CONFIGS
def test_from_params_both_layer_forms(config):
    tokens, positions, cache = _inputs(config)
    stacked = init_params(config, jax.random.PRNGKey(3), scale=0.25, stacked=True)
    per_layer = init_params(config, jax.random.PRNGKey(4), scale=0.25)
    for params in (stacked, per_layer):
        model = from_params(config, params)
        got, _, _ = model(tokens, positions, cache)
        np.testing.assert_array_equal(got, forward(params, tokens, positions, cache, config)[0])
        for a, b in zip(jax.tree_util.tree_leaves(params_of(model)),
                        jax.tree_util.tree_leaves({**params, "layers": layer_params(params)})):
            np.testing.assert_array_equal(a, b)
    # the per-layer form is taken as is: no copies
    model = from_params(config, per_layer)
    assert params_of(model)["layers"][1]["wo"] is per_layer["layers"][1]["wo"]
    assert params_of(model)["embed"] is per_layer["embed"]
    bad = {**per_layer, "layers": per_layer["layers"][:-1]}
    with pytest.raises(ValueError, match="layers"):
        from_params(config, bad)
    bad = {**per_layer, "layers": ({**per_layer["layers"][0], "wq": per_layer["layers"][0]["wk"]},)
           + per_layer["layers"][1:]}
    with pytest.raises(ValueError, match=r"layers\[0\]\.wq has shape"):
        from_params(config, bad)


def test_dtypes_param_compute_and_cast():
    config = QWEN
    tokens, positions, cache = _inputs(config)
    model = Llama(config, rngs=nnx.Rngs(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params_of(model)))

    # cast: a new model / pytree, the argument untouched, unchanged dtypes not copied
    m16 = cast(model, "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params_of(m16)))
    assert model.embed.get_value().dtype == jnp.float32
    p16 = cast(params_of(model), jnp.bfloat16)
    assert cast(p16, "bf16")["embed"] is p16["embed"]
    for a, b in zip(jax.tree_util.tree_leaves(params_of(m16)), jax.tree_util.tree_leaves(p16)):
        np.testing.assert_array_equal(a, b)

    # param_dtype: stored dtype; dtype: compute dtype (float32 master weights, bf16 math)
    assert DecoderLayer(config, rngs=nnx.Rngs(0), param_dtype="bfloat16").wq.get_value().dtype == jnp.bfloat16
    b16 = Llama(config, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params_of(b16)))
    mixed = Llama(config, rngs=nnx.Rngs(1), dtype="bfloat16")
    assert mixed.embed.get_value().dtype == jnp.float32
    cache16 = init_cache(config.n_layers, 2, config.n_kv_heads, 16, config.head_dim, dtype=jnp.bfloat16)
    got, out_cache, _ = mixed(tokens, positions, cache16)
    np.testing.assert_array_equal(got, forward(p16, tokens, positions, cache16, config)[0])
    assert out_cache.keys.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="accepted"):
        Llama(config, rngs=nnx.Rngs(0), param_dtype="float16")


def test_load_model_dtype(smollm2):
    config, p32 = smollm2
    config16, p16 = load_model("smollm2", dtype="bfloat16", progress=False)
    assert config16 == config
    leaves = jax.tree_util.tree_leaves(p16)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(cast_params(p32, jnp.bfloat16))):
        np.testing.assert_array_equal(a, b)
    # the default stays float32, and casting to float32 copies nothing
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p32))
    assert cast_params(p32, "float32")["embed"] is p32["embed"]

    for text in ("bfloat16", "bf16", "BF16", jnp.bfloat16, np.dtype(jnp.bfloat16)):
        assert parse_dtype(text) == jnp.bfloat16
    for text in ("float32", "fp32", "f32", jnp.float32, np.float32):
        assert parse_dtype(text) == np.float32
    for bad in ("float16", "bfloat", "int8", jnp.float16, np.int32, None):
        with pytest.raises(ValueError, match="accepted: 'float32'.*'bfloat16'") as err:
            parse_dtype(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unsupported dtype 'half'"):   # checked before any file is read
        load_model("smollm2", dtype="half", progress=False)


def test_bf16_perplexity_within_1pct_of_fp32(smollm2, smollm2_tokenizer):
    """SmolLM2 on a KJV continuation: 256 tokens teacher-forced after a 768-token context, in one
    forward over context + continuation; fp32 parameters + cache vs bf16 parameters + cache (the
    bf16 run goes through the NNX module, split/merge under jit)."""
    config, p32 = smollm2
    context, n = 768, 256
    ids = smollm2_tokenizer.encode(kjv_text(book="Genesis", n_chars=8000))
    assert len(ids) >= context + n
    tokens = jnp.asarray(ids[:context + n], jnp.int32)[None]
    positions = jnp.arange(context + n, dtype=jnp.int32)[None]
    targets = tokens[0, context:]

    def cache(dtype):
        return init_cache(config.n_layers, 1, config.n_kv_heads, context + n, config.head_dim, dtype=dtype)

    logits32, _, _ = jit_forward(jax.tree_util.tree_map(jnp.asarray, p32), tokens, positions,
                                 cache(jnp.float32), config=config)
    ppl32 = perplexity(logits32[0, context - 1:-1], targets)

    model = cast(from_params(config, p32), "bfloat16")
    graphdef, state = nnx.split(model)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(state))
    step = jax.jit(lambda state, t, p, c: nnx.merge(graphdef, state)(t, p, c))
    logits16, cache16, _ = step(state, tokens, positions, cache(jnp.bfloat16))
    assert cache16.keys.dtype == jnp.bfloat16
    ppl16 = perplexity(logits16[0, context - 1:-1], targets)

    print(f"\nSmolLM2 KJV Genesis, {n} tokens after {context}: perplexity fp32 {ppl32:.4f}, "
          f"bf16 {ppl16:.4f} ({100 * (ppl16 / ppl32 - 1):+.2f}%)")
    assert 2.0 < ppl32 < 20.0, ppl32          # the real model on real text
    assert abs(ppl16 / ppl32 - 1) < 0.01, (ppl32, ppl16)
