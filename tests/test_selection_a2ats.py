"""A2ATS (kvjax.selection.a2ats) against a float64 numpy implementation of its spec: codes are the
nearest codebook entries under the query-aware metric (pre-RoPE keys, per subspace), the k-means
update is the members' mean, lookup-table scores of the window-rotated query, top-k over the
non-sink / non-local slots, appended tokens encoded with the same codebook; budget >= context
equals the full cache; calibration; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import generate
from kvjax.selection import A2ATS, make_selection
from kvjax.selection.a2ats import QueryMetric, calibrate_query_metric
from kvjax.selection.base import wrap_layer
from models.llama import init_params
from tests.test_selection import B, CFG, D, HKV, HQ, _filled, _np_attend, _update
from tests.test_selection_shadowkv import _np_rope


def _np_codes(x, cb, sig):
    """x [n, M, s], cb [M, K, s], sig [M, s, s] -> [n, M] metric-nearest codes (float64)."""
    diff = x[:, :, None, :] - cb[None]                                         # [n, M, K, s]
    return np.argmin(np.einsum("nmks,mst,nmkt->nmk", diff, sig, diff), axis=-1)


def _np_kmeans(x, sig, k, iters):
    """Lloyd's k-means of x [n, M, s] under the metric blocks sig [M, s, s] (float64), started from
    the k rows x[(i * n) // k]; an empty cluster keeps its centroid. -> codebook [M, k, s]."""
    n = len(x)
    cb = x[[(i * n) // k for i in range(k)]].transpose(1, 0, 2).copy()
    for _ in range(iters):
        codes = _np_codes(x, cb, sig)
        for i in range(x.shape[1]):
            for c in range(k):
                if (codes[:, i] == c).any():
                    cb[i, c] = x[codes[:, i] == c, i].mean(0)
    return cb


def _metric(seed):
    a = np.random.default_rng(seed).standard_normal((1, HKV, D, D))
    return QueryMetric(a @ a.transpose(0, 1, 3, 2) / D + 0.1 * np.eye(D))


def test_a2ats_codes_scores_and_selection_match_float64_spec():
    cap, lengths, pad = 112, [110, 97], [0, 8]
    kv, k, v, pos = _filled(cap, lengths, pad, seed=31)
    metric = _metric(32)
    sel = A2ATS(budget=30, n_init=2, n_local=8, sub_dim=4, n_codes=8, kmeans_iters=4, metric=metric)
    q = np.random.default_rng(33).standard_normal((B, HQ, D)).astype(np.float32)
    t = 140
    out, _, layer = _update(jax.jit(wrap_layer, static_argnums=(0, 2))(sel, kv, CFG),
                            jnp.asarray(q)[:, :, None], jnp.asarray([[t], [t]]))
    meta = layer.meta
    cb = np.asarray(meta.codebook, np.float64)                                 # [b, h, M, K, s]
    codes = np.asarray(meta.codes)
    m = D // 4
    sig = np.stack([[metric.sigma[0, h, i * 4:(i + 1) * 4, i * 4:(i + 1) * 4] for i in range(m)]
                    for h in range(HKV)]).astype(np.float64)
    g = HQ // HKV
    for b in range(B):
        live = [j for j in range(cap) if pos[b, 0, j] >= 0]
        sink, local = set(live[:2]), set(live[-8:])
        cand = [j for j in live if j not in sink | local]
        qw = _np_rope(q[b].astype(np.float64), np.full(HQ, 8.0 - t), CFG.rope_theta)   # RoPE(q_pre, n_local)
        for h in range(HKV):
            pre = _np_rope(k[b, h, live], -pos[b, h, live].astype(np.float64), CFG.rope_theta).reshape(-1, m, 4)
            want = _np_codes(pre, cb[b, h], sig[h])
            np.testing.assert_array_equal(codes[b, h, live], want)
            np.testing.assert_allclose(cb[b, h], _np_kmeans(pre, sig[h], 8, 4), rtol=1e-4, atol=1e-5)
            khat = np.stack([np.concatenate([cb[b, h, i, codes[b, h, j, i]] for i in range(m)]) for j in cand])
            score = np.max(qw[h * g:(h + 1) * g] @ khat.T, axis=0)
            top = set(np.asarray(cand)[np.argsort(-score)[:20]].tolist())
            got = {int(j) for j, ok in zip(layer.state.indices[b, h], layer.state.valid[b, h]) if ok}
            assert got == top
        np.testing.assert_allclose(np.asarray(out[b, :, 0]),
                                   _np_attend(q[b].astype(np.float64), k[b], v[b],
                                              {h: {int(j) for j, ok in zip(layer.state.indices[b, h],
                                                                          layer.state.valid[b, h]) if ok}
                                                   | sink | local for h in range(HKV)}), rtol=2e-5, atol=2e-6)


def test_a2ats_appended_tokens_use_the_same_codebook():
    sel = A2ATS(budget=30, n_init=2, n_local=8, sub_dim=4, n_codes=8, kmeans_iters=3)
    kv, *_ = _filled(96, lengths=[60, 57], pad=[0, 5], seed=34)
    meta = jax.jit(sel.init_meta, static_argnums=1)(kv, CFG)
    append = jax.jit(sel.append_meta)
    rng = np.random.default_rng(35)
    pre = rng.standard_normal((B, HKV, 3, D)).astype(np.float32)
    p = jnp.asarray([[60, 61, 62], [-1, 57, 58]], jnp.int32)                    # row 1: a padding token
    from models.rope import apply_rope
    post = apply_rope(jnp.asarray(pre), jnp.maximum(p, 0), CFG)
    new = append(meta, kv, post, p, jnp.asarray(pre))
    cb = np.asarray(meta.codebook, np.float64)
    for b, slots in enumerate([[60, 61, 62], [57, 58, 59]]):
        for h in range(HKV):
            want = _np_codes(pre[b, h].astype(np.float64).reshape(3, -1, 4), cb[b, h],
                             np.broadcast_to(np.eye(4), (D // 4, 4, 4)))
            got = np.asarray(new.codes[b, h, slots])
            if b == 1:                     # the padding token writes nothing; 58, 59 hold the others
                np.testing.assert_array_equal(got[0], np.asarray(meta.codes[b, h, 57]))
                np.testing.assert_array_equal(got[1:], want[1:])
            else:
                np.testing.assert_array_equal(got, want)
    # without the pre-RoPE keys the layer's own inverse rotation gives the same codes
    again = append(meta, kv, post, p)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(new.codes))


def test_a2ats_budget_covering_the_context_equals_full_cache():
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 128, 150)), list(rng.integers(1, 128, 120))]
    full = generate(params, CFG, prompts, 4, eos_ids=(), bucket=32)
    live = generate(params, CFG, prompts, 4, eos_ids=(), bucket=32,
                    selection=A2ATS(budget=160, n_codes=16, kmeans_iters=2))          # capacity 164
    assert live.tokens == full.tokens and not any("dense decode" in n for n in live.stats["notes"])
    metric = calibrate_query_metric(params, CFG, jnp.asarray([prompts[0][:64]]), window=16)
    assert metric.sigma.shape == (CFG.n_layers, HKV, D, D)
    assert np.all(np.linalg.eigvalsh(metric.sigma.astype(np.float64)) > -1e-5)      # a second moment
    small = generate(params, CFG, prompts, 4, eos_ids=(), bucket=32,
                     selection=A2ATS.from_budget(48, n_codes=16, kmeans_iters=2, metric=metric))
    assert all(len(t) == 4 for t in small.tokens) and small.stats["read_bytes_per_step"]["ratio"] < 1


def test_a2ats_bad_input():
    with pytest.raises(ValueError, match="leaves no selected tokens"):
        A2ATS(budget=60, n_init=4, n_local=64)
    with pytest.raises(ValueError, match="n_codes"):
        A2ATS(n_codes=1)
    kv, *_ = _filled(32, lengths=[32, 32], pad=[0, 0])
    with pytest.raises(ValueError, match="sub_dim 5 does not divide head_dim 16"):
        A2ATS(budget=30, n_local=8, sub_dim=5).init_meta(kv, CFG)
    with pytest.raises(ValueError, match="metric is"):
        A2ATS(budget=30, n_local=8, metric=_metric(0), layer=2).init_meta(kv, CFG)
    with pytest.raises(ValueError, match="sigma must be"):
        QueryMetric(np.zeros((2, 3)))
