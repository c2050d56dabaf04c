"""Merging policies (CAM, D2O, KVMerger) against float64 numpy loops written from the spec's
formulas, on small random GQA caches; the merge hook inside `compress` (cache at the budget, merged
values in the kept slots, nothing merged at the threshold limit = plain eviction); bad input; one
short generate on SmolLM2."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.compression import Compression
from kvjax.policies import make_policy
from kvjax.policies.base import Budget, compress, select
from kvjax.policies.cam import CAM, merge_draws
from kvjax.policies.d2o import D2O
from kvjax.policies.kvmerger import KVMerger
from kvjax.policies.h2o import H2O
from models.config import ModelConfig

B, HKV, S, D, K = 2, 2, 14, 8, 6


def layer_case(seed=0, similar=False):
    """One layer: cache [B, Hkv, S, d] (row 1 left-padded by 2), scores [B, Hkv, S] with the 3
    newest slots protected (+inf), kept idx [B, Hkv, K] from `select`."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(B, HKV, S, D))
    if similar:   # runs of near-identical keys so that merging sets form
        keys = np.repeat(keys[:, :, ::3], 3, axis=2)[:, :, :S] + 0.05 * rng.normal(size=(B, HKV, S, D))
    values = rng.normal(size=(B, HKV, S, D))
    pos = np.broadcast_to(np.arange(S), (B, HKV, S)).copy()
    pos[1, :, :2] = -1
    scores = rng.random((B, HKV, S))
    scores[..., -3:] = np.inf
    cache = kvcache.KVCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.full((B, HKV), S, jnp.int32))
    idx = select(jnp.asarray(scores, jnp.float32)[None], cache.valid[None], jnp.full((1, B, HKV), K), K)[0]
    return cache, np.asarray(idx), scores, keys, values, pos


def np_cam(keys, values, pos, idx, scores, m, u):
    vout = np.zeros(idx.shape + (values.shape[-1],))
    for b in range(B):
        for h in range(HKV):
            kept = [int(i) for i in idx[b, h] if i >= 0]
            ev = [s for s in range(S) if pos[b, h, s] >= 0 and s not in kept]
            fin = [scores[b, h, r] for r in kept if np.isfinite(scores[b, h, r])]
            top = np.max(fin)                     # KVCache-Factory: max, not mean
            v = {r: values[b, h, r].copy() for r in kept}
            for e in ev:
                p = min(max(scores[b, h, e] / top, 0.0), 1.0)
                if u is not None:
                    p = float(u[b, h, e] < p)
                after = [r for r in kept if r > e][:m]
                for r in after:
                    v[r] += p * values[b, h, e] / m
            for j, r in enumerate(kept):
                vout[b, h, j] = v[r]
    return vout


@pytest.mark.parametrize("stochastic", [False, True])
def test_cam_merge_matches_numpy(stochastic):
    cache, idx, scores, keys, values, pos = layer_case(1)
    pol = CAM(window=3, merge_budget=2, stochastic=stochastic, seed=5)
    k, v = jax.jit(pol.merge, static_argnums=3)(cache, jnp.asarray(idx), jnp.asarray(scores, jnp.float32), 4)
    u = np.asarray(merge_draws(5, 4, (B, HKV, S))) if stochastic else None
    ref = np_cam(keys, values, pos, idx, scores, 2, u)
    live = idx >= 0
    np.testing.assert_allclose(np.asarray(v)[live], ref[live], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(k)[live], np.take_along_axis(keys, np.clip(idx, 0, S)[..., None], 2)[live],
                               rtol=1e-6)   # CaM leaves keys alone
    assert not np.allclose(np.asarray(v)[live], np.take_along_axis(values, np.clip(idx, 0, S)[..., None], 2)[live])


def np_d2o(keys, values, pos, idx, threshold=None):
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    ko = np.zeros(idx.shape + (D,))
    vo = np.zeros(idx.shape + (D,))
    for b in range(B):
        info = []
        for h in range(HKV):
            kept = [int(i) for i in idx[b, h] if i >= 0]
            for e in range(S):
                if pos[b, h, e] >= 0 and e not in kept:
                    sims = [cos(keys[b, h, e], keys[b, h, r]) for r in kept]
                    info.append((h, e, max(sims), kept[int(np.argmax(sims))]))
        tau = np.mean([c for _, _, c, _ in info]) if threshold is None else threshold
        for h in range(HKV):
            kept = [int(i) for i in idx[b, h] if i >= 0]
            for j, r in enumerate(kept):
                ks, vs = [keys[b, h, r]], [values[b, h, r]]
                for hh, e, c, tgt in info:
                    if hh == h and tgt == r and c >= tau:
                        ks.append(c * keys[b, h, e])
                        vs.append(c * values[b, h, e])
                ko[b, h, j], vo[b, h, j] = np.mean(ks, 0), np.mean(vs, 0)
    return ko, vo


def test_d2o_merge_matches_numpy():
    cache, idx, scores, keys, values, pos = layer_case(2)
    k, v = jax.jit(D2O().merge, static_argnums=3)(cache, jnp.asarray(idx), jnp.asarray(scores, jnp.float32), 0)
    rk, rv = np_d2o(keys, values, pos, idx)
    live = idx >= 0
    for got, ref in ((k, rk), (v, rv)):
        np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def np_kvmerger(keys, values, pos, idx, scores, eps):
    ko = np.take_along_axis(keys, np.clip(idx, 0, S)[..., None], 2).copy()
    vo = np.take_along_axis(values, np.clip(idx, 0, S)[..., None], 2).copy()
    for b in range(B):
        for h in range(HKV):
            mer = [pos[b, h, s] >= 0 and np.isfinite(scores[b, h, s]) for s in range(S)]
            sets, cur = [], []
            for s in range(S):
                if not mer[s]:
                    cur = []
                    continue
                k0, k1 = keys[b, h, s - 1], keys[b, h, s]
                if cur and np.dot(k0, k1) / np.linalg.norm(k0) / np.linalg.norm(k1) >= eps:
                    cur.append(s)
                else:
                    cur = [s]
                    sets.append(cur)
            kept = [int(i) for i in idx[b, h] if i >= 0]
            for st in sets:
                p = st[int(np.argmax([scores[b, h, s] for s in st]))]
                ev = [s for s in st if s not in kept]
                if p not in kept or not ev:
                    continue
                d2 = np.array([np.sum((keys[b, h, p] - keys[b, h, s]) ** 2) for s in ev])
                w = np.concatenate([[1.0], np.exp(-d2 / (2 * d2.mean()))])
                w /= w.sum()
                j = kept.index(p)
                ko[b, h, j] = w @ keys[b, h, [p] + ev]
                vo[b, h, j] = w @ values[b, h, [p] + ev]
    return ko, vo


def test_kvmerger_merge_matches_numpy():
    cache, idx, scores, keys, values, pos = layer_case(3, similar=True)
    k, v = jax.jit(KVMerger(eps=0.9).merge, static_argnums=3)(cache, jnp.asarray(idx),
                                                              jnp.asarray(scores, jnp.float32), 0)
    rk, rv = np_kvmerger(keys, values, pos, idx, scores, 0.9)
    live = idx >= 0
    gathered = np.take_along_axis(values, np.clip(idx, 0, S)[..., None], 2)
    assert not np.allclose(rv[live], gathered[live])          # the case really merges something
    for got, ref in ((k, rk), (v, rv)):
        np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def tiny_stack(seed=0, n_layers=2):
    rng = np.random.default_rng(seed)
    shape = (n_layers, B, HKV, S, D)
    pos = np.broadcast_to(np.arange(S), shape[:-1]).astype(np.int32)
    return kvcache.KVCache(keys=jnp.asarray(rng.normal(size=shape), jnp.float32),
                           values=jnp.asarray(rng.normal(size=shape), jnp.float32),
                           positions=jnp.asarray(pos), lengths=jnp.full(shape[:3], S, jnp.int32))


CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


@pytest.mark.parametrize("merged,plain", [(D2O(threshold=1.0, layer_budgets=False), H2O(recent=3)), (KVMerger(eps=1.0), H2O(recent=3))])
def test_compress_no_merge_at_limit_equals_eviction(merged, plain):
    """Threshold at its limit: nothing merges, the cache equals the eviction-only cache; the merged
    default differs from it; both are allocated at the budget (memory_bytes = K slots per head)."""
    cache = tiny_stack(4)
    rng = np.random.default_rng(0)
    state = jnp.asarray(rng.random((2, B, HKV, S)), jnp.float32)
    n_keep = jnp.full((B,), K, jnp.int32)
    run = jax.jit(lambda p, c, sc: compress(p, CFG, c, sc, n_keep, K, K), static_argnums=0)
    scores = merged.adjust_scores(state, type("O", (), {"cache": cache})(), n_keep)
    got, _ = run(merged, cache, scores)
    ref, _ = run(plain, cache, scores)
    for a, b in ((got.keys, ref.keys), (got.values, ref.values), (got.positions, ref.positions)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    per_head = K * (2 * D * 4 + 4) + 4                        # K slots of f32 keys+values, int32 positions; lengths
    assert got.memory_bytes() == ref.memory_bytes() == 2 * B * HKV * per_head
    default, _ = run(D2O(layer_budgets=False) if isinstance(merged, D2O) else KVMerger(eps=-1.0), cache, scores)
    assert not np.allclose(np.asarray(default.values), np.asarray(ref.values))
    np.testing.assert_array_equal(np.asarray(default.positions), np.asarray(ref.positions))


def np_d2o_budgets(acc, valid, n_keep):
    """D2O's layer level from the spec, float64 loops: [L, B] kept tokens."""
    n_layers, nb, nh, _ = acc.shape
    out = np.zeros((n_layers, nb), int)
    for b in range(nb):
        context = valid[0, b].sum(-1).max()
        v = []
        for l in range(n_layers):
            var = np.array([np.var(acc[l, b, h][valid[l, b, h]]) for h in range(nh)])
            span = var.max() - var.min()
            v.append(np.mean((var - var.min()) / span) if span > 0 else 0.0)
        e = np.exp(-np.array(v) - np.max(-np.array(v)))
        r = np.clip(e / e.sum() * n_layers * n_keep[b] / context, 0.01, 1.0)
        r[[0, 1, n_layers - 1]] = 1.0
        out[:, b] = np.clip(np.floor(r * context + 1e-6), 1, context)
    return out


def test_d2o_layer_budgets_match_numpy():
    """D2O's layer budgets vs the spec's formula (float64); compress keeps exactly b_l tokens per
    head in layer l (0, 1, L-1 whole), the newest floor(recent * b_l) of them, and the ragged
    per-layer cache allocates sum_l b_l slots per head (+ room), less than the full cache."""
    from kvjax.layerwise import LayerwiseCache, per_layer
    from kvjax.observation import Observation
    from kvjax.policies.base import PositionsView
    from kvjax.policies.d2o import layer_budgets
    n_layers, nh, ns = 6, 4, 24          # 4 kv heads: with 2, min-max over heads is always {0, 1}
    rng = np.random.default_rng(3)
    shape = (n_layers, B, nh, ns)
    pos = np.broadcast_to(np.arange(ns), shape).copy()
    pos[:, 1, :, :3] = -1                                   # row 1 left-padded: a shorter context
    cache = kvcache.KVCache(keys=jnp.asarray(rng.normal(size=shape + (D,)), jnp.float32),
                            values=jnp.asarray(rng.normal(size=shape + (D,)), jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.asarray((pos >= 0).sum(-1), jnp.int32))
    acc = rng.random(shape) ** (1 + 6 * rng.random((n_layers, 1, nh, 1)))
    n_keep = np.array([8, 6])
    view = Observation(cache=PositionsView(jnp.asarray(pos)), config=CFG, accumulated=jnp.asarray(acc, jnp.float32))
    got = np.asarray(layer_budgets(view, jnp.asarray(n_keep)))
    ref = np_d2o_budgets(acc, pos >= 0, n_keep)
    np.testing.assert_array_equal(got, ref)
    assert len(set(ref[2:-1, 0])) > 1                       # the middle layers really differ
    pol = D2O()
    cfg = dataclasses.replace(CFG, n_layers=n_layers, n_kv_heads=nh)
    scores = jnp.asarray(acc, jnp.float32)
    new, _ = compress(pol, cfg, per_layer(cache), scores, jnp.asarray(n_keep), ns, ns, scores)
    assert isinstance(new, LayerwiseCache) and not new.uniform
    for l, lc in enumerate(new.layers):
        np.testing.assert_array_equal(np.asarray(lc.lengths), np.broadcast_to(ref[l][:, None], (B, nh)))
        for b in range(B):
            n_rec = int(np.floor(0.5 * ref[l, b] + 1e-6))
            newest = np.sort(pos[l, b, 0][pos[l, b, 0] >= 0])[len(pos[l, b, 0][pos[l, b, 0] >= 0]) - n_rec:]
            assert set(newest) <= set(np.asarray(lc.positions[b, 0]).tolist())
    sized = new.resize(new.capacity)
    slots = sum(lc.keys.shape[-2] for lc in sized.layers)
    assert slots == ref.max(1).sum() < n_layers * ns


def np_kvcrush_kept(scores, valid, n_keep, share):
    """KVCrush's kept slots per (layer, row, head) from the spec, float64 loops."""
    n_layers, nb, nh, ns = scores.shape
    kept = {}
    for l in range(n_layers):
        for b in range(nb):
            n_rep = int(np.floor(share * n_keep[b] + 1e-6))
            base = np.zeros((nh, ns), bool)
            for h in range(nh):
                live = [j for j in range(ns) if valid[l, b, h, j]]
                order = sorted(live, key=lambda j: (-scores[l, b, h, j], j))
                base[h, order[:n_keep[b] - n_rep]] = True
            anchor = np.arange(nh) % 2 == 1
            dist = [int(np.sum(base[:, j] != anchor)) for j in range(ns)]
            for h in range(nh):
                cand = sorted((j for j in range(ns) if valid[l, b, h, j] and not base[h, j]), key=lambda j: (dist[j], j))
                if len(cand) <= n_rep:
                    reps = cand
                else:
                    bounds = [int(np.ceil(i * len(cand) / n_rep)) for i in range(n_rep)]
                    reps = [cand[r] for r in bounds]
                kept[l, b, h] = sorted(set(np.flatnonzero(base[h]).tolist()) | set(reps))
    return kept


def test_kvcrush_matches_numpy():
    """KVCrush's kept set (base top + one representative per Hamming bucket) vs a float64 loop; 4 kv
    heads so signatures vary; every head keeps exactly n_keep and the representatives change it."""
    from kvjax.policies.base import PositionsView
    from kvjax.observation import Observation
    from kvjax.policies.kvcrush import KVCrush
    n_layers, nh, ns = 2, 4, 23
    rng = np.random.default_rng(11)
    pos = np.broadcast_to(np.arange(ns), (n_layers, B, nh, ns)).copy()
    pos[:, 1, :, :4] = -1
    scores = rng.random(pos.shape)
    scores[..., -2:] = np.inf                                # a protected window
    n_keep = np.array([12, 9])
    pol = KVCrush(window=2, share=0.5)
    view = Observation(cache=PositionsView(jnp.asarray(pos)), config=CFG)
    adj = pol.adjust_scores(jnp.asarray(scores, jnp.float32), view, jnp.asarray(n_keep))
    idx = np.asarray(select(adj, jnp.asarray(pos >= 0), jnp.broadcast_to(jnp.asarray(n_keep)[None, :, None],
                                                                         (n_layers, B, nh)), 12))
    ref = np_kvcrush_kept(scores, pos >= 0, n_keep, 0.5)
    changed = 0
    for (l, b, h), want in ref.items():
        got = sorted(int(i) for i in idx[l, b, h] if i >= 0)
        assert got == want and len(got) == n_keep[b]
        plain = sorted(np.argsort(-np.where(pos[l, b, h] >= 0, scores[l, b, h], -np.inf), kind="stable")[:n_keep[b]])
        changed += got != plain
    assert changed > 0
    with pytest.raises(ValueError, match="share"):
        KVCrush(share=1.0)


def test_ems_score_and_merge_match_numpy():
    """EMS: the global-local score (accumulated / queries that see the slot + window mean, GQA sums)
    vs float64 loops; its evict-then-merge (redundant heads merge into the nearest kept key's class
    mean, sparse heads drop) vs a loop; head_threshold=1 merges nothing."""
    from kvjax.observation import Observation
    from kvjax.policies.ems import EMS
    rng = np.random.default_rng(5)
    g, w = 2, 3
    cache, idx, scores, keys, values, pos = layer_case(6, similar=True)
    probs = rng.random((1, B, HKV * g, w, S))
    acc = rng.random((1, B, HKV, S))
    obs = Observation(cache=jax.tree_util.tree_map(lambda x: x[None], cache), config=CFG,
                      window_probs=jnp.asarray(probs, jnp.float32), accumulated=jnp.asarray(acc, jnp.float32))
    got = np.asarray(EMS(window=w).score(obs))[0]
    for b in range(B):
        for h in range(HKV):
            top = pos[b, h].max()
            for j in range(S):
                if pos[b, h, j] < 0:
                    continue
                want = np.inf if pos[b, h, j] > top - w else (
                    acc[0, b, h, j] / (top - pos[b, h, j] + 1) + probs[0, b, h * g:(h + 1) * g, :, j].sum() / w)
                np.testing.assert_allclose(got[b, h, j], want, rtol=1e-6)
    cos = lambda a, c: a @ c / (np.linalg.norm(a) * np.linalg.norm(c))
    for thr in (0.5, 1.0):
        k, v = jax.jit(EMS(window=w, head_threshold=thr).merge, static_argnums=3)(
            cache, jnp.asarray(idx), jnp.asarray(scores, jnp.float32), 0)
        merged = 0
        for b in range(B):
            for h in range(HKV):
                kept = [int(i) for i in idx[b, h] if i >= 0]
                ev = [e for e in range(S) if pos[b, h, e] >= 0 and e not in kept]
                best = [max(range(len(kept)), key=lambda j: cos(keys[b, h, e], keys[b, h, kept[j]])) for e in ev]
                sims = [cos(keys[b, h, e], keys[b, h, kept[j]]) for e, j in zip(ev, best)]
                go = bool(ev) and np.mean(sims) >= thr
                for j, r in enumerate(kept):
                    group = [r] + [e for e, t in zip(ev, best) if go and t == j]
                    merged += len(group) > 1
                    np.testing.assert_allclose(np.asarray(k)[b, h, j], keys[b, h, group].mean(0), rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(np.asarray(v)[b, h, j], values[b, h, group].mean(0), rtol=1e-5, atol=1e-6)
        assert (merged > 0) == (thr < 1.0)
    with pytest.raises(ValueError, match="head_threshold"):
        EMS(head_threshold=2.0)


def test_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        D2O(threshold=1.5)
    with pytest.raises(ValueError, match="eps"):
        KVMerger(eps=-2)
    with pytest.raises(ValueError, match="sigma"):
        KVMerger(sigma=-1.0)
    with pytest.raises(ValueError, match="merge_budget"):
        CAM(merge_budget=-1)
    with pytest.raises(ValueError, match="recent"):
        D2O(recent=1.5)
