"""LouisKV (kvjax.selection.louiskv) against float64 numpy versions of its rules: k-means clusters
of the prompt keys, segments of generated keys (metadata across appends), unit-score retrieval,
the semantic-boundary trigger; budget >= context equals dense; generate on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import generate
from kvjax.observation import Observe
from kvjax.selection import LouisKV, make_selection
from kvjax.selection.base import wrap_layer
from models.llama import init_params
from tests.test_selection import B, CFG, D, HKV, HQ, _filled, _np_attend, _step, _update

CAP, CL, SEG = 96, 8, 4


def np_kmeans(k, live, cluster_size, iters):
    """Cluster id per slot (-1: not live) of one head's keys k [S, d] (float64 Lloyd, same init)."""
    slots = np.flatnonzero(live)
    n = len(slots)
    c = max(1, -(-n // cluster_size))
    cent = k[slots[[(j * n) // c for j in range(c)]]].copy()
    x = k[slots]
    for _ in range(iters + 1):
        a = np.argmin(((x[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
        if _ == iters:
            break
        for j in range(c):
            if np.any(a == j):
                cent[j] = x[a == j].mean(0)
    out = np.full(k.shape[0], -1)
    out[slots] = a
    return out


def blob_cache(seed, lengths, pad, n_blobs=6):
    """A cache whose keys come from well separated blobs (no near-ties between distances)."""
    kv, k, v, pos = _filled(CAP, lengths=lengths, pad=pad, seed=seed)
    rng = np.random.default_rng(seed + 50)
    centers = rng.standard_normal((n_blobs, D)) * 6
    lab = rng.integers(0, n_blobs, size=k.shape[:3])
    k = (centers[lab] + 0.3 * rng.standard_normal(k.shape)).astype(np.float32)
    return kv.__class__(keys=jnp.asarray(k), values=kv.values, positions=kv.positions, lengths=kv.lengths), \
        k.astype(np.float64), v, pos


def test_clusters_and_segment_metadata_match_float64_across_appends():
    sel = LouisKV(budget=32, n_local=4, cluster_size=CL, segment_size=SEG, kmeans_iters=5)
    kv, k, _, pos = blob_cache(1, lengths=[70, 61], pad=[0, 9])
    layer = wrap_layer(sel, kv, CFG)
    unit = np.asarray(layer.meta.unit)
    for b in range(B):
        for h in range(HKV):
            np.testing.assert_array_equal(unit[b, h], np_kmeans(k[b, h], pos[b, h] >= 0, CL, 5))
    # append 3 + 6 generated tokens: each joins segment (slot - prompt_end) // SEG
    rng = np.random.default_rng(2)
    n_c = -(-CAP // CL)
    for new in (3, 6):
        nk = rng.standard_normal((B, HKV, new, D)).astype(np.float32)
        npos = np.asarray(layer.kv.lengths[:, 0])[:, None] + np.arange(new)
        layer = layer.append(jnp.asarray(nk), jnp.asarray(nk), jnp.asarray(npos, jnp.int32))
    keys = np.asarray(layer.kv.keys, np.float64)
    unit = np.asarray(layer.meta.unit)
    sums, counts = np.asarray(layer.meta.sums, np.float64), np.asarray(layer.meta.counts)
    for b in range(B):
        for h in range(HKV):
            end = [70, 61][b]
            gen = np.arange(end, end + 9)
            np.testing.assert_array_equal(unit[b, h, gen], n_c + (gen - end) // SEG)
            for u in range(sums.shape[2]):
                members = unit[b, h] == u
                assert counts[b, h, u] == members.sum()
                np.testing.assert_allclose(sums[b, h, u], keys[b, h][members].sum(0), rtol=1e-5, atol=1e-4)


def test_retrieval_matches_float64_unit_scores():
    sel = LouisKV(budget=40, n_local=6, cluster_size=CL, segment_size=SEG, kmeans_iters=3)
    kv, k, v, pos = blob_cache(3, lengths=[90, 77], pad=[0, 12])
    q = np.random.default_rng(4).standard_normal((B, HQ, D)).astype(np.float32)
    out, _, layer = _step(sel, kv, q, np.asarray([95, 95]))
    g = HQ // HKV
    idx, valid = np.asarray(layer.state.indices), np.asarray(layer.state.valid)
    for b in range(B):
        length = [90, 77][b]
        slots = {}
        for h in range(HKV):
            unit = np_kmeans(k[b, h], pos[b, h] >= 0, CL, 3)
            score = {u: max(q[b, hq].astype(np.float64) @ k[b, h][unit == u].mean(0) for hq in range(h * g, (h + 1) * g))
                     for u in set(unit[unit >= 0].tolist())}
            local = list(range(length - 6, length))
            cand = [s for s in range(length - 6) if pos[b, h, s] >= 0]
            top = sorted(cand, key=lambda s: (-score[unit[s]], s))[:40 - 6]
            assert set(idx[b, h][valid[b, h]].tolist()) == set(top), (b, h)
            slots[h] = top + local
        np.testing.assert_allclose(np.asarray(out[b, :, 0]), _np_attend(q[b].astype(np.float64), k[b], v[b], slots),
                                   rtol=2e-5, atol=2e-6)


def test_retrieval_only_at_semantic_boundaries():
    sel = LouisKV(budget=24, n_local=4, threshold=0.8, cluster_size=CL, segment_size=SEG)
    kv, *_ = _filled(64, lengths=[64, 64], pad=[0, 0], seed=5)
    layer = wrap_layer(sel, kv, CFG)
    rng = np.random.default_rng(6)
    q1 = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
    near = q1 + 0.2 * rng.standard_normal(q1.shape).astype(np.float32)
    far = rng.standard_normal(q1.shape).astype(np.float32)
    cos = lambda a, b: float((a.ravel().astype(np.float64) @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    qpos = jnp.asarray([[70], [70]])
    ages = []
    for q in (q1, near, far):
        _, _, layer = _update(layer, jnp.asarray(q), qpos)
        ages.append(np.asarray(layer.state.age).tolist())
    # first step: always a retrieval; then reuse iff cos(q, query of the last retrieval) >= 0.8
    assert ages[0] == [0, 0]
    assert ages[1] == [0 if cos(near[b], q1[b]) < 0.8 else 1 for b in range(B)]
    assert all(cos(near[b], q1[b]) >= 0.8 for b in range(B)) and all(cos(far[b], near[b]) < 0.8 for b in range(B))
    assert ages[2] == [0, 0]


def test_louiskv_budget_covering_is_dense_and_generate_runs():
    kv, *_ = _filled(176, lengths=[150, 133], pad=[0, 21], seed=7)
    q = jnp.asarray(np.random.default_rng(8).standard_normal((B, HQ, 1, D)), jnp.float32)
    qpos = jnp.asarray([[200], [200]])
    dense, _ = kv.attend(q, qpos, observe=Observe(), backend="xla")
    out, _, _ = _step(LouisKV(budget=176, n_local=8), kv, q[:, :, 0], qpos[:, 0])
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-6)
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    prompts = [list(np.random.default_rng(0).integers(1, 128, 100))]
    small = generate(params, CFG, prompts, 5, eos_ids=(), bucket=32, selection=make_selection("louiskv", budget=32))
    assert len(small.tokens[0]) == 5 and small.stats["read_bytes_per_step"]["ratio"] < 0.6


def test_louiskv_bad_input():
    with pytest.raises(ValueError, match="n_local < budget"):
        LouisKV(budget=8, n_local=8)
    with pytest.raises(ValueError, match="cosine"):
        LouisKV(threshold=1.5)
    with pytest.raises(ValueError, match="page_size must be 1"):
        LouisKV(page_size=16)
    assert make_selection("louiskv", budget=256) == LouisKV(budget=256, n_local=32)
