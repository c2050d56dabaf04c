"""Query-aware sparse decode (kvjax.selection): Quest and TokenSelect against float64 numpy
implementations of their spec formulas, metadata across appends, reuse, budget >= context,
error messages, and generate on a tiny model and on SmolLM2."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.generate import generate
from kvjax.observation import Observe
from kvjax.selection import Quest, TokenSelect, make_selection, sparse_attend
from kvjax.selection.base import init_state, wrap_layer
from models.config import ModelConfig
from models.llama import init_params

CFG = ModelConfig(name="tiny-sel", vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                  head_dim=16, ffn_dim=64, rope_theta=10000.0, max_position=4096)
B, HQ, HKV, D = 2, 4, 2, 16


def _filled(cap, lengths, pad, seed=0):
    """A dense layer cache [B, HKV, cap, D]: row b has pad[b] padding slots (position -1) then
    lengths[b] - pad[b] live tokens; plus the numpy float64 copies."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, HKV, cap, D)).astype(np.float32)
    v = rng.standard_normal((B, HKV, cap, D)).astype(np.float32)
    pos = np.full((B, HKV, cap), -1, np.int32)
    for b in range(B):
        pos[b, :, pad[b]:lengths[b]] = np.arange(lengths[b] - pad[b])
    lens = np.broadcast_to(np.asarray(lengths, np.int32)[:, None], (B, HKV)).copy()
    kv = kvcache.KVCache(keys=jnp.asarray(k), values=jnp.asarray(v), positions=jnp.asarray(pos),
                         lengths=jnp.asarray(lens))
    return kv, k.astype(np.float64), v.astype(np.float64), pos


def _np_attend(q, k, v, slots):
    """float64 softmax attention of q [HQ, D] over the slots of every kv head ({h: list})."""
    g = HQ // HKV
    out = np.zeros((HQ, D))
    for hq in range(HQ):
        s = np.asarray(sorted(slots[hq // g]))
        logit = k[hq // g, s] @ q[hq] / np.sqrt(D)
        p = np.exp(logit - logit.max())
        out[hq] = (p / p.sum()) @ v[hq // g, s]
    return out


@jax.jit
def _update(layer, q, qpos):
    return layer.attend_and_update(q, qpos, observe=Observe())


def _step(sel, kv, q, qpos):
    layer = jax.jit(wrap_layer, static_argnums=(0, 2))(sel, kv, CFG)
    return _update(layer, jnp.asarray(q, jnp.float32)[:, :, None], jnp.asarray(qpos)[:, None])


def _np_quest_pages(q, k, pos, length, page, n_top):
    """Quest's spec in numpy: per-page min/max of live keys, sum_c max(q m, q M), max over the GQA
    group, top pages among all but the newest; returns {kv_head: set of pages} and the scores."""
    g = HQ // HKV
    chosen, scores = {}, {}
    n_pages = k.shape[1] // page
    newest = (length - 1) // page
    for h in range(HKV):
        sc = {}
        for p in range(n_pages):
            live = pos[h, p * page:(p + 1) * page] >= 0
            if not live.any() or p == newest:
                continue
            kp = k[h, p * page:(p + 1) * page][live]
            m, M = kp.min(0), kp.max(0)
            sc[p] = max(np.maximum(q[hq] * m, q[hq] * M).sum() for hq in range(h * g, (h + 1) * g))
        top = sorted(sc, key=lambda p: -sc[p])[:n_top]
        chosen[h] = set(top) | {newest}
        scores[h] = sc
    return chosen, scores


def test_quest_matches_float64_spec():
    page, cap = 16, 160
    kv, k, v, pos = _filled(cap, lengths=[150, 133], pad=[0, 21], seed=1)   # row 1: padding + partial page
    sel = Quest(budget=64, dense_layers=0)                                  # 3 selected pages + the newest
    q = np.random.default_rng(2).standard_normal((B, HQ, D)).astype(np.float32)
    out, _, layer = _step(sel, kv, q, [200, 200])
    scores = sel.page_scores(layer.meta, jnp.asarray(q)[:, :, None])
    for b, length in enumerate([150, 133]):
        chosen, ref = _np_quest_pages(q[b].astype(np.float64), k[b], pos[b], length, page, 3)
        for h in range(HKV):
            got = {int(p) for p, ok in zip(layer.state.indices[b, h], layer.state.valid[b, h]) if ok}
            assert got | {(length - 1) // page} == chosen[h]
            ps = np.array(sorted(ref[h]))
            np.testing.assert_allclose(np.asarray(scores[b, h])[ps], [ref[h][p] for p in ps], rtol=1e-5)
        slots = {h: [s for p in chosen[h] for s in range(p * page, (p + 1) * page) if pos[b, h, s] >= 0]
                 for h in range(HKV)}
        np.testing.assert_allclose(np.asarray(out[b, :, 0]), _np_attend(q[b].astype(np.float64), k[b], v[b], slots),
                                   rtol=2e-5, atol=2e-6)


def test_quest_metadata_stays_correct_across_appends():
    sel = Quest(budget=64, dense_layers=0)
    kv, *_ = _filled(96, lengths=[40, 37], pad=[0, 5])
    meta = sel.init_meta(kv)
    step_fn = jax.jit(lambda meta, kv, keys, positions: (sel.append_meta(meta, kv, keys, positions),
                                                         kv.append(keys, keys, positions)))
    rng = np.random.default_rng(3)
    for step, new in enumerate([1, 1, 7, 1, 20]):
        keys = jnp.asarray(rng.standard_normal((B, HKV, new, D)), jnp.float32)
        p = 40 + 3 * step + jnp.arange(new, dtype=jnp.int32)
        positions = jnp.stack([p, jnp.where(jnp.arange(new) == 0, -1, p)])    # row 1: one padding token
        meta, kv = step_fn(meta, kv, keys, positions)
    for got, want in zip(meta, sel.init_meta(kv)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_tokenselect_matches_float64_spec():
    cap = 120
    kv, k, v, pos = _filled(cap, lengths=[120, 110], pad=[0, 9], seed=4)
    sel = TokenSelect(n_init=4, n_local=8, top_k=10)
    q = np.random.default_rng(5).standard_normal((B, HQ, D)).astype(np.float32)
    out, _, layer = _step(sel, kv, q, [300, 300])
    g = HQ // HKV
    for b, (length, pad) in enumerate([(120, 0), (110, 9)]):
        n = length - pad
        cand = np.arange(pad + 4, pad + n - 8)
        votes = np.zeros(len(cand))
        for hq in range(HQ):
            logit = k[b, hq // g, cand] @ q[b, hq].astype(np.float64)       # no 1/sqrt(d)
            e = np.exp(logit - logit.max())
            votes += e / e.sum()
        top = set(cand[np.argsort(-votes)[:10]].tolist())
        want = top | set(range(pad, pad + 4)) | set(range(length - 8, length))
        for h in range(HKV):
            got = {int(s) for s, ok in zip(layer.state.indices[b, h], layer.state.valid[b, h]) if ok}
            assert got == top
        np.testing.assert_allclose(np.asarray(out[b, :, 0]),
                                   _np_attend(q[b].astype(np.float64), k[b], v[b], {h: want for h in range(HKV)}),
                                   rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("sel", [Quest(budget=160, dense_layers=0), TokenSelect(n_init=4, n_local=8, top_k=150)])
def test_budget_covering_the_live_tokens_equals_dense(sel):
    kv, *_ = _filled(176, lengths=[150, 133], pad=[0, 21], seed=6)
    q = jnp.asarray(np.random.default_rng(7).standard_normal((B, HQ, 1, D)), jnp.float32)
    qpos = jnp.asarray([[200], [200]])
    dense, _ = kv.attend(q, qpos, observe=Observe(), backend="xla")
    out, _, _ = _step(sel, kv, q[:, :, 0], qpos[:, 0])
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-6)


def test_selection_reuse_rules():
    kv, *_ = _filled(64, lengths=[64, 64], pad=[0, 0], seed=8)
    rng = np.random.default_rng(9)
    q1 = jnp.asarray(rng.standard_normal((B, HQ, 1, D)), jnp.float32)
    q2 = jnp.asarray(rng.standard_normal((B, HQ, 1, D)), jnp.float32)
    qpos = jnp.asarray([[70], [70]])
    # TokenSelect selection cache: the same query is reused, an unrelated one reselects
    ts = wrap_layer(TokenSelect(n_init=2, n_local=4, top_k=8, reuse_threshold=0.9), kv, CFG)
    _, _, ts = _update(ts, q1, qpos)
    first = np.asarray(ts.state.indices)
    _, _, ts = _update(ts, q1 * 2.0, qpos)
    assert np.asarray(ts.state.age).tolist() == [1, 1]
    _, _, ts = _update(ts, q2, qpos)
    assert np.asarray(ts.state.age).tolist() == [0, 0]
    assert not np.array_equal(np.asarray(ts.state.indices), first)
    # Quest every 3 steps: the selection made for q1 is kept for q2 until its age reaches 3
    qs = wrap_layer(Quest(budget=32, interval=3, dense_layers=0), kv, CFG)
    ages, picks = [], []
    for q in (q1, q2, q2, q2):
        _, _, qs = _update(qs, q, qpos)
        ages.append(int(qs.state.age[0]))
        picks.append(np.asarray(qs.state.indices[:, :, 0]))
    assert ages == [0, 1, 2, 0]
    fresh = Quest(budget=32, dense_layers=0).select(qs.meta, kv, q2, qpos)[0][:, :, 0]
    np.testing.assert_array_equal(picks[3], fresh)
    np.testing.assert_array_equal(picks[1], picks[0])


def test_page_selection_with_padding_uses_live_slots_only():
    """A selected page holding padding slots: token mode over its live slots (kernel interpreted)."""
    kv, k, v, pos = _filled(64, lengths=[64, 64], pad=[0, 5], seed=10)
    q = np.random.default_rng(11).standard_normal((B, HQ, D)).astype(np.float32)
    idx = jnp.asarray([[[0, 2, 3]] * HKV] * B, jnp.int32)
    valid = jnp.ones((B, HKV, 3), bool)
    for backend in ("xla", "interpret"):
        out = sparse_attend(jnp.asarray(q)[:, :, None], kv, idx, valid, 16, backend)
        for b in range(B):
            slots = {h: [s for p in (0, 2, 3) for s in range(16 * p, 16 * p + 16) if pos[b, h, s] >= 0]
                     for h in range(HKV)}
            np.testing.assert_allclose(np.asarray(out[b, :, 0]),
                                       _np_attend(q[b].astype(np.float64), k[b], v[b], slots), rtol=2e-5, atol=2e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown selection method"):
        make_selection("nope")
    with pytest.raises(ValueError, match="at least two pages"):
        Quest(budget=16)
    with pytest.raises(ValueError, match="leaves no top-k"):
        make_selection("tokenselect", budget=1)
    with pytest.raises(ValueError, match="must be a positive int"):
        Quest(budget=64, interval=0)
    kv, *_ = _filled(40, lengths=[40, 40], pad=[0, 0])
    with pytest.raises(ValueError, match="does not divide the cache capacity 40"):
        wrap_layer(Quest(budget=64), kv, CFG)
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    with pytest.raises(ValueError, match="leaves no sparse layer"):
        generate(params, CFG, [[1, 2, 3]], 2, selection=Quest(budget=32, dense_layers=3))
    from kvjax.compression import Compression
    from kvjax.policies import Budget, make_policy
    with pytest.raises(ValueError, match="decode-time compression"):
        generate(params, CFG, [list(range(1, 100))], 2, selection=Quest(budget=32),
                 compression=Compression(make_policy("h2o"), Budget(tokens=40), when="decode", interval=8))


def test_generate_tiny_budget_covering_capacity_is_exact_and_sparse_runs():
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 128, 150)), list(rng.integers(1, 128, 120))]
    full = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32)
    big = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32, selection=make_selection("quest", budget=4096))
    assert big.tokens == full.tokens and "dense decode" in big.stats["notes"][-1]
    small = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32, selection=Quest(budget=32, dense_layers=1))
    rb = small.stats["read_bytes_per_step"]
    # 1 dense layer of 3 reads all 176 slots (128 B of K+V each); the 2 sparse ones 32 slots + the
    # metadata: per page of 16, min and max (2 x 16 float32) and a live count (int32)
    want = (176 + 2 * (32 + 176 / 16 * (2 * 16 * 4 + 4) / 128)) / (3 * 176)
    assert abs(rb["ratio"] - want) < 1e-3 and small.stats["cache_bytes"] > full.stats["cache_bytes"]
    assert all(len(t) == 6 for t in small.tokens)


def test_cli_selection_option():
    from kvjax.cli import build_parser, selection_from_args
    args = build_parser().parse_args(["generate", "--prompt", "x", "--selection", "quest", "--token-budget", "256"])
    assert selection_from_args(args) == Quest(budget=256)
    bad = build_parser().parse_args(["generate", "--prompt", "x", "--selection", "bogus"])
    with pytest.raises(ValueError, match="unknown selection method"):
        selection_from_args(bad)
