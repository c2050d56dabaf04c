"""The real embedded SmolLM2-135M: logits vs an independent float64 numpy forward on a long prompt,
cache consistency (prefill+decode, chunked prefill, padded batches) and a chat answer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit, generate, prefill
from numpy_reference import reference_logits


@pytest.fixture(scope="module")
def long_ids(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(kjv_text(book="Exodus", n_chars=6000))
    assert len(ids) >= 1040
    return ids[:1040]


def _cache(config, capacity, batch=1):
    return init_cache(config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)


def _pos(n, start=0):
    return jnp.arange(start, start + n, dtype=jnp.int32)[None]


def test_long_prompt_logits_match_float64_reference(smollm2_jax, smollm2, long_ids):
    config, params = smollm2_jax
    n = len(long_ids)
    logits, _, _ = forward_jit(params, jnp.asarray(long_ids)[None], _pos(n), _cache(config, n), config,
                               all_logits=True)
    at = [0, 1, 100, 517, 900, n - 2, n - 1]
    ref = reference_logits(smollm2[1], config, np.asarray(long_ids), at=at)
    err = np.abs(np.asarray(logits[0, at], np.float64) - ref).max()
    assert err < 2e-3, f"max abs logit error {err:.2e} over {n} tokens"
    assert np.abs(ref).max() > 5  # real logits, not a degenerate comparison


def test_prefill_then_decode_equals_full_forward(smollm2_jax, long_ids):
    config, params = smollm2_jax
    ids = jnp.asarray(long_ids[:300])[None]
    full, _, _ = forward_jit(params, ids, _pos(300), _cache(config, 300), config, all_logits=True)
    last, cache, _ = prefill(params, config, ids[:, :292], _pos(292), _cache(config, 300))
    np.testing.assert_allclose(last, full[:, 291], atol=1e-4)
    for t in range(292, 300):
        step, cache, _ = forward_jit(params, ids[:, t:t + 1], _pos(1, t), cache, config)
        np.testing.assert_allclose(step[:, -1], full[:, t], atol=1e-4)


def test_chunked_prefill_equals_unchunked(smollm2_jax, long_ids):
    config, params = smollm2_jax
    ids = jnp.asarray(long_ids[:300])[None]
    whole, cache_a, _ = prefill(params, config, ids, _pos(300), _cache(config, 300))
    chunked, cache_b, _ = prefill(params, config, ids, _pos(300), _cache(config, 300), chunk_size=64)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    np.testing.assert_allclose(cache_b.keys, cache_a.keys, atol=1e-4)
    np.testing.assert_array_equal(cache_b.positions, cache_a.positions)


def test_padded_batch_equals_rows_alone(smollm2_jax, smollm2_tokenizer, long_ids):
    config, params = smollm2_jax
    prompts = [long_ids[:150], smollm2_tokenizer.encode("The LORD said unto Moses,"), long_ids[400:470]]
    batch = generate(params, config, prompts, 6, pad_id=smollm2_tokenizer.pad_id)
    for i, p in enumerate(prompts):
        # one padded length for every row alone (bucket 192): one compilation, each row padded differently
        alone = generate(params, config, [p], 6, pad_id=smollm2_tokenizer.pad_id, bucket=192)
        assert batch.tokens[i] == alone.tokens[0], f"row {i}"


def test_bad_inputs_are_clear_errors(smollm2_jax):
    config, params = smollm2_jax
    with pytest.raises(ValueError, match="empty"):
        generate(params, config, [[]], 4)
    with pytest.raises(ValueError, match="capacity"):
        generate(params, config, [list(range(1, 100))], 4, capacity=50)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(params, config, [[1, 2, 3]], config.max_position)
