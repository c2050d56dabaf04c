"""DELTA (kvjax.selection.delta) against a float64 numpy implementation of its spec: a Δ-layer's
unified head scores (full attention probabilities summed over every query head), its top-k over
the non-sink / non-recent slots, the sparse layer attending to the handed-over set; the model's
layer loop hands the selection over; budget >= context equals the full cache; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import generate, init_engine_cache, prefill
from kvjax.selection import Delta, make_selection
from kvjax.selection.base import SelectiveCache, wrap, wrap_layer
from models.llama import forward, init_params
from tests.test_selection import B, CFG, D, HKV, HQ, _filled, _np_attend, _update


def _np_delta_scores(q, k, pos):
    """One row: q [HQ, D], k [HKV, cap, D] -> S [cap] float64 (probabilities summed over heads)."""
    g, s = HQ // HKV, np.zeros(k.shape[1])
    live = pos[0] >= 0
    for hq in range(HQ):
        logit = k[hq // g, live] @ q[hq] / np.sqrt(D)
        p = np.exp(logit - logit.max())
        s[live] += p / p.sum()
    return s


def test_delta_layer_selects_and_sparse_layer_reads_the_selection():
    cap, lengths, pad = 112, [110, 97], [0, 8]
    kv, k, v, pos = _filled(cap, lengths, pad, seed=21)
    kv2, k2, v2, _ = _filled(cap, lengths, pad, seed=22)            # the next layer: other K/V, same slots
    sel = Delta(budget=24, n_sink=3, n_recent=6, dense_layers=0)
    rng = np.random.default_rng(23)
    q1, q2 = (rng.standard_normal((B, HQ, D)).astype(np.float32) for _ in range(2))
    qpos = jnp.asarray([[150], [150]])
    d_layer = wrap_layer(sel.for_layer(0), kv, CFG)
    s_layer = wrap_layer(sel.for_layer(1), kv2, CFG)
    assert (d_layer.selector.role, s_layer.selector.role) == ("delta", "sparse")
    out1, _, d_layer = _update(d_layer, jnp.asarray(q1)[:, :, None], qpos)
    out2, _, s_layer = _update(s_layer.receive(d_layer.hand_over()), jnp.asarray(q2)[:, :, None], qpos)
    for b in range(B):
        live = [j for j in range(cap) if pos[b, 0, j] >= 0]
        sink, recent = set(live[:3]), set(live[-6:])
        s = _np_delta_scores(q1[b].astype(np.float64), k[b], pos[b])
        cand = [j for j in live if j not in sink | recent]
        top = set(sorted(cand, key=lambda j: -s[j])[:15])
        np.testing.assert_allclose(np.asarray(sel.scores(kv, jnp.asarray(q1)[:, :, None]))[b, live], s[live],
                                   rtol=1e-5, atol=1e-7)
        for h in range(HKV):
            got = {int(j) for j, ok in zip(d_layer.state.indices[b, h], d_layer.state.valid[b, h]) if ok}
            assert got == top
        # the Δ-layer attends to everything, the sparse one to sink + handed set + recent
        np.testing.assert_allclose(np.asarray(out1[b, :, 0]),
                                   _np_attend(q1[b].astype(np.float64), k[b], v[b], {h: live for h in range(HKV)}),
                                   rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(out2[b, :, 0]),
                                   _np_attend(q2[b].astype(np.float64), k2[b], v2[b],
                                              {h: top | sink | recent for h in range(HKV)}), rtol=2e-5, atol=2e-6)


def test_model_loop_hands_the_selection_to_the_sparse_layers():
    """Through models.llama.forward: layer 1 (Δ) selects, layer 2 (sparse) holds the same set."""
    params = init_params(CFG, jax.random.PRNGKey(3), scale=0.3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (1, 90)), jnp.int32)
    cache = init_engine_cache(CFG, 1, 96)
    _, cache, _ = prefill(params, CFG, tokens, jnp.arange(90, dtype=jnp.int32)[None], cache)
    sel = Delta(budget=32, n_sink=2, n_recent=8, dense_layers=1)
    cache = wrap(sel, cache, CFG)
    assert [type(lc).__name__ for lc in cache.layers] == ["KVCache", "SelectiveCache", "SelectiveCache"]
    _, cache, _ = jax.jit(lambda c: forward(params, jnp.asarray([[5]]), jnp.asarray([[90]]), c, CFG))(cache)
    d, s = cache.layers[1], cache.layers[2]
    assert isinstance(s, SelectiveCache) and s.selector.role == "sparse"
    np.testing.assert_array_equal(np.asarray(s.state.indices), np.asarray(d.state.indices))
    assert int(np.asarray(d.state.valid).sum()) == HKV * 22


def test_delta_budget_covering_the_context_equals_full_cache():
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 128, 150)), list(rng.integers(1, 128, 120))]
    full = generate(params, CFG, prompts, 5, eos_ids=(), bucket=32)
    # a budget that holds every live token (not the capacity): the selection path, same tokens
    live = generate(params, CFG, prompts, 5, eos_ids=(), bucket=32,
                    selection=Delta(budget=160, n_sink=4, n_recent=16, dense_layers=1))   # capacity 165
    assert live.tokens == full.tokens and not any("dense decode" in n for n in live.stats["notes"])
    small = generate(params, CFG, prompts, 5, eos_ids=(), bucket=32, selection=Delta.from_budget(32, dense_layers=1))
    assert all(len(t) == 5 for t in small.tokens) and small.stats["read_bytes_per_step"]["ratio"] < 1


def test_delta_bad_input():
    with pytest.raises(ValueError, match="leaves no selected tokens"):
        Delta(budget=20, n_sink=4, n_recent=16)
    with pytest.raises(ValueError, match="role must be one of"):
        Delta(budget=64, n_sink=4, n_recent=16, role="dense")
    with pytest.raises(ValueError, match="page_size must be 1"):
        Delta(budget=64, n_sink=4, n_recent=16, page_size=16)
    with pytest.raises(ValueError, match="delta_every >= 1"):
        Delta(budget=64, delta_every=0, n_sink=4, n_recent=16)
    with pytest.raises(ValueError, match="unknown selection method 'deltaa'"):
        make_selection("deltaa")
