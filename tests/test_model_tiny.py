"""The functional model on a tiny random config: cache consistency, padding, errors, RoPE."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.observation import Observe

from kvjax.cache import init_cache
from kvjax.generate import forward_jit, left_pad, prefill
from models.config import ModelConfig, RopeScaling, get_config
from models.llama import forward, init_params
from models.rope import inverse_frequencies
from numpy_reference import reference_logits

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2,
                  head_dim=8, ffn_dim=64, rope_theta=10000.0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)


def _tokens(n, seed=1, batch=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, n), 0, CFG.vocab_size, jnp.int32)


def _pos(n, batch=1):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


def test_matches_float64_numpy_reference(params):
    toks = _tokens(19)
    logits, _, _ = forward(params, toks, _pos(19), init_cache(3, 1, 2, 19, 8), CFG)
    ref = reference_logits(jax.tree_util.tree_map(np.asarray, params), CFG, np.asarray(toks[0]))
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=2e-4, rtol=0)


def test_prefill_then_decode_equals_full_forward(params):
    toks = _tokens(15, batch=2)
    full, _, _ = forward(params, toks, _pos(15, 2), init_cache(3, 2, 2, 15, 8), CFG)
    logits, cache, _ = forward(params, toks[:, :6], _pos(15, 2)[:, :6], init_cache(3, 2, 2, 15, 8), CFG)
    steps = [logits]
    for i in range(6, 15):
        logits, cache, _ = forward(params, toks[:, i:i + 1], _pos(15, 2)[:, i:i + 1], cache, CFG)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)


def test_chunked_prefill_equals_unchunked(params):
    toks, pos = _tokens(23), _pos(23)
    # prefill consumes (donates) its cache: a fresh one each time
    a, ca, _ = prefill(params, CFG, toks, pos, init_cache(3, 1, 2, 23, 8))
    b, cb, _ = prefill(params, CFG, toks, pos, init_cache(3, 1, 2, 23, 8), chunk_size=5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ca.keys), np.asarray(cb.keys), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ca.positions), np.asarray(cb.positions))


def test_left_padded_batch_matches_rows_alone(params):
    rows = [list(range(3, 14)), list(range(40, 44)), list(range(60, 67))]
    toks, pos = left_pad(rows, pad_id=0, bucket=8)
    assert toks.shape == (3, 16) and (pos[1] == -1).sum() == 12
    batch_logits, _, _ = forward(params, jnp.asarray(toks), jnp.asarray(pos), init_cache(3, 3, 2, 16, 8), CFG)
    for i, r in enumerate(rows):
        alone, _, _ = forward(params, jnp.asarray([r]), _pos(len(r)), init_cache(3, 1, 2, len(r), 8), CFG)
        np.testing.assert_allclose(np.asarray(batch_logits[i, -len(r):]), np.asarray(alone[0]), atol=1e-5)


class _Probe:
    """A policy that checks what a layer shows it and scores each slot by the window attention
    it received plus its column sum (so the test can check both reductions)."""

    observe = Observe(window=4, column_sums=True, qkv=True)
    accumulates = False

    def __init__(self, what):
        self.what, self.seen = what, []

    def score(self, obs):
        self.seen.append({k: getattr(obs, k).shape for k in ("window_probs", "column_sums", "q_pre", "k_pre",
                                                              "window_queries")})
        self.seen[-1]["cache_keys"] = obs.cache.keys.shape
        if self.what == "window":
            return obs.window_probs.sum(-2).reshape(1, 1, 2, 3, -1).sum(3)        # [1, B, Hkv, S]
        return obs.column_sums.reshape(1, 1, 2, 3, -1).sum(3)


def test_observations_are_reduced_inside_the_layer(params):
    from kvjax.observation import Observer
    toks = _tokens(9)
    probe, probe_cols = _Probe("window"), _Probe("columns")
    _, _, obs = forward(params, toks, _pos(9), init_cache(3, 1, 2, 12, 8), CFG, observer=Observer(probe))
    _, _, cols = forward(params, toks, _pos(9), init_cache(3, 1, 2, 12, 8), CFG, observer=Observer(probe_cols))
    # what one layer shows a policy: a leading layers axis of 1, never all layers at once
    want = {"window_probs": (1, 1, 6, 4, 12), "column_sums": (1, 1, 6, 12), "q_pre": (1, 1, 6, 9, 8),
            "k_pre": (1, 1, 2, 9, 8), "window_queries": (1, 1, 6, 4, 8), "cache_keys": (1, 1, 2, 12, 8)}
    assert probe.seen and all(s == want for s in probe.seen)
    scores = np.asarray(obs["scores"], np.float64)
    assert scores.shape == (3, 1, 2, 12) and set(obs) == {"scores"}
    col = np.asarray(cols["scores"], np.float64)
    # every query's probabilities sum to one over the live slots and are zero on empty ones:
    # per kv head, 3 query heads x 4 window queries and 3 x 9 queries
    np.testing.assert_allclose(scores.sum(-1), 12.0, atol=1e-4)
    np.testing.assert_allclose(col.sum(-1), 27.0, atol=1e-4)
    assert float(np.abs(scores[..., 9:]).max()) == 0.0 and float(np.abs(col[..., 9:]).max()) == 0.0
    with pytest.raises(ValueError, match="reduced inside the layer"):
        forward(params, toks, _pos(9), init_cache(3, 1, 2, 12, 8), CFG, Observe(window=4))


def test_bad_inputs_raise_clear_errors(params):
    cache = init_cache(3, 1, 2, 8, 8)
    with pytest.raises(TypeError, match="integer"):
        forward(params, jnp.zeros((1, 4), jnp.float32), _pos(4), cache, CFG)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        forward(params, jnp.zeros((4,), jnp.int32), _pos(4), cache, CFG)
    with pytest.raises(ValueError, match="must match"):
        forward(params, _tokens(4), _pos(5), cache, CFG)
    with pytest.raises(ValueError, match="empty"):
        forward(params, jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), jnp.int32), cache, CFG)
    with pytest.raises(ValueError, match="batch"):
        forward(params, _tokens(4, batch=2), _pos(4, 2), cache, CFG)
    with pytest.raises(ValueError, match="head_dim"):
        forward(params, _tokens(4), _pos(4), init_cache(3, 1, 2, 8, 4), CFG)
    with pytest.raises(TypeError, match="floating"):
        forward(jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), params), _tokens(4), _pos(4), cache, CFG)
    with pytest.raises(ValueError, match="unknown model"):
        get_config("gpt-17")
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1, 2], []], 0)


def test_llama3_rope_scaling_matches_formula():
    """Llama-3 scaling, checked against the piecewise rule written out per frequency."""
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    got = inverse_frequencies(128, 500000.0, s)
    for i in range(64):
        f = 500000.0 ** (-2 * i / 128)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            t = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - t) * f / 8 + t * f
        assert got[i] == pytest.approx(want, rel=1e-12)


def test_jit_compiles_once_per_shape(params):
    toks, pos = _tokens(8), _pos(8)
    cache = init_cache(3, 1, 2, 8, 8)
    before = forward_jit._cache_size()
    forward_jit(params, toks, pos, cache, CFG)
    forward_jit(params, toks + 1, pos, cache, CFG)
    assert forward_jit._cache_size() == before + 1


def test_fused_projections_match_float64_reference(params):
    """models.llama.fuse_projections (q|k|v and gate|up as one matmul each) against the float64
    numpy forward of the unfused weights, also through generate's per-layer cache."""
    from kvjax.generate import generate
    from models.llama import fuse_projections, unstack_params
    fused = fuse_projections(params)
    assert "wqkv" in fused["layers"][0] and "wq" not in fused["layers"][0]
    toks = _tokens(19)
    logits, _, _ = forward(fused, toks, _pos(19), init_cache(3, 1, 2, 19, 8), CFG)
    ref = reference_logits(jax.tree_util.tree_map(np.asarray, params), CFG, np.asarray(toks[0]))
    err = np.linalg.norm(np.asarray(logits[0]) - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err
    prompt = [np.asarray(toks[0]).tolist()]
    kw = dict(max_new_tokens=6, eos_ids=())
    assert generate(fused, CFG, prompt, **kw).tokens == generate(unstack_params(params), CFG, prompt, **kw).tokens
