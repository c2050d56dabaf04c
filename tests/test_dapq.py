"""DapQ (kvjax.policies.dapq) against a float64 numpy implementation: window queries moved to
future positions (RoPE by +window), softmax over every live slot summed over the pseudo-queries,
GQA mean, window columns zeroed, avg-pool 5, window protected; compress keeps the best."""
import numpy as np
import pytest

from kvjax.policies import make_policy
from kvjax.policies.dapq import DapQ
from tests.test_policies_extra import B, D, HKV, HQ, L, jcompress, jit_obs, np_rope, random_obs

S, WIN, KERNEL = 40, 4, 5


def np_dapq(obs, window, kernel):
    """[L, B, Hkv, S] float64 (+inf: the window; live slots only are meaningful)."""
    keys = np.asarray(obs.cache.keys, np.float64)
    wq = np.asarray(obs.window_queries, np.float64)[..., -window:, :]
    pos = np.asarray(obs.cache.positions)
    g = HQ // HKV
    out = np.zeros(pos.shape)
    for l in range(L):
        for b in range(B):
            live = pos[l, b, 0] >= 0
            s = np.zeros((HQ, S))
            for hq in range(HQ):
                q = np_rope(wq[l, b, hq], np.full(window, window))              # pseudo-queries at n + i
                lg = q @ keys[l, b, hq // g][live].T / np.sqrt(D)
                p = np.exp(lg - lg.max(-1, keepdims=True))
                s[hq, live] = (p / p.sum(-1, keepdims=True)).sum(0)
            for h in range(HKV):
                sh = s[h * g:(h + 1) * g].mean(0)
                recent = live & (pos[l, b, h] > pos[l, b, h].max() - window)
                sh = np.where(recent, 0.0, sh)
                padded = np.pad(sh, kernel // 2)
                pooled = np.array([padded[j:j + kernel].sum() / kernel for j in range(S)])
                out[l, b, h] = np.where(recent, np.inf, pooled)
    return out


def test_dapq_scores_match_float64_and_compress_keeps_the_best():
    obs = random_obs(seed=51, s=S, window=WIN)
    pol = DapQ(window=WIN, kernel=KERNEL)
    got = np.asarray(jit_obs(pol.score, obs))
    want = np_dapq(obs, WIN, KERNEL)
    live = np.asarray(obs.cache.positions) >= 0
    np.testing.assert_array_equal(np.isposinf(got[live]), np.isposinf(want[live]))
    fin = live & np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-7)
    kept, _ = jcompress(pol, obs, 12, S)
    pos, kpos = np.asarray(obs.cache.positions), np.asarray(kept.positions)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                sc = np.where(live[l, b, h], want[l, b, h], -np.inf)
                top = np.argsort(-sc, kind="stable")[:12]
                assert set(kpos[l, b, h][kpos[l, b, h] >= 0].tolist()) == set(pos[l, b, h, top].tolist())


def test_dapq_registry_and_bad_input():
    assert make_policy("dapq", window=16) == DapQ(window=16)
    with pytest.raises(ValueError, match="window and kernel must be positive"):
        DapQ(window=0)
