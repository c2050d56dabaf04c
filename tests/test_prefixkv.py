"""PrefixKV: layer budgets from one global search over the layers' cumulative attention curves vs a
float64 numpy exact search (every curve value tried as the threshold); compress keeps b_l tokens
per head in layer l, the ragged per-layer cache allocates sum_l b_l; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.layerwise import LayerwiseCache
from kvjax.policies.base import compress
from kvjax.policies.prefixkv import PrefixKV, prefix_budgets
from models.config import ModelConfig

L, B, HKV, S, W, D = 4, 2, 2, 24, 4, 4
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=L, n_heads=4, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


def case(seed=0):
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(S), (L, B, HKV, S)).copy()
    pos[:, 1, :, :5] = -1                                        # row 1 left-padded
    sharp = np.array([1.0, 4.0, 8.0, 2.0])[:, None, None, None]  # layers differ in concentration
    scores = rng.random((L, B, HKV, S)) ** sharp
    newest = (pos >= 0) & (pos > pos.max(-1, keepdims=True) - W)
    scores = np.where(newest, np.inf, scores)
    return scores, pos


def np_budgets(scores, pos, n_keep):
    out = np.zeros((L, B), int)
    for b in range(B):
        curves, m, w = [], [], []
        for l in range(L):
            cs = []
            for h in range(HKV):
                live = pos[l, b, h] >= 0
                cand = live & np.isfinite(scores[l, b, h])
                x = np.sort(scores[l, b, h][cand])[::-1]
                cs.append(np.cumsum(x / x.sum()))
            curves.append(np.mean(cs, 0))
            m.append(len(curves[-1]))
            w.append(int((live & ~cand).sum()))
        n_of = lambda p: [min(int((c < p).sum()) + 1, mm) + ww for c, mm, ww in zip(curves, m, w)]
        best = max(p for p in list(np.concatenate(curves)) + [1.0] if sum(n_of(p)) <= L * n_keep[b])
        out[:, b] = n_of(best)
    return out


def test_budgets_match_numpy_and_compress_allocates_them():
    scores, pos = case()
    n_keep = np.array([9, 7])
    got = np.asarray(prefix_budgets(jnp.asarray(scores, jnp.float32), jnp.asarray(pos >= 0), jnp.asarray(n_keep)))
    ref = np_budgets(scores, pos, n_keep)
    np.testing.assert_array_equal(got, ref)
    assert len(set(ref[:, 0])) > 1 and (ref.sum(0) <= L * n_keep).all()
    rng = np.random.default_rng(1)
    cache = kvcache.KVCache(keys=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
                            values=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32),
                            lengths=jnp.asarray((pos >= 0).sum(-1), jnp.int32))
    pol = PrefixKV(window=W)
    new, _ = jax.jit(lambda c, s: compress(pol, CFG, c, s, jnp.asarray(n_keep), S, S))(
        cache, jnp.asarray(scores, jnp.float32))
    assert isinstance(new, LayerwiseCache)
    for l, lc in enumerate(new.layers):
        np.testing.assert_array_equal(np.asarray(lc.lengths), np.broadcast_to(ref[l][:, None], (B, HKV)))
    sized = new.resize(new.capacity)
    assert sum(lc.keys.shape[-2] for lc in sized.layers) == ref.max(1).sum() < L * S


def test_bad_input():
    with pytest.raises(ValueError, match="window"):
        PrefixKV().max_keep(16, 100)
    with pytest.raises(ValueError, match="window"):
        PrefixKV(window=0)
