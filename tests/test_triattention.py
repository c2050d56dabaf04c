"""TriAttention (kvjax.policies.triattention) against a float64 numpy implementation of its score:
complex P_f = qbar_f conj(k_f), the trig series averaged over geometric future offsets, the
magnitude correction, z-normalisation per query head, GQA mean, protected window; compress keeps
the best; calibration; decode-time pruning through generate; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.generate import generate
from kvjax.policies import Budget, make_policy
from kvjax.policies.triattention import TriAttention, TriStats, calibrate_triattention
from models.llama import init_params
from tests.test_policies_extra import B, D, HKV, HQ, L, jcompress, jit_obs, random_obs

S, WIN = 40, 5


def _stats(seed):
    rng = np.random.default_rng(seed)
    qbar = rng.standard_normal((L, HQ, D // 2)) + 1j * rng.standard_normal((L, HQ, D // 2))
    return TriStats(qbar=qbar, m=np.abs(qbar) + rng.random((L, HQ, D // 2)))


def np_triattention(obs, stats, window, theta=10000.0):
    """[L, B, Hkv, S] float64 scores (+inf protected, -inf empty)."""
    keys = np.asarray(obs.cache.keys, np.float64)
    pos = np.asarray(obs.cache.positions)
    h, g = D // 2, HQ // HKV
    w = theta ** (-np.arange(0, D, 2) / D)
    qbar, m = stats.qbar.astype(np.complex128), stats.m.astype(np.float64)
    out = np.full(pos.shape, -np.inf)
    for l in range(L):
        for b in range(B):
            live = np.flatnonzero(pos[l, b, 0] >= 0)
            t0 = pos[l, b].max() + 1
            z = np.zeros((HQ, len(live)))
            for hq in range(HQ):
                kf = keys[l, b, hq // g, live, :h] + 1j * keys[l, b, hq // g, live, h:]
                p = qbar[l, hq] * np.conj(kf)                                    # [n, F]
                trig = np.mean([np.real(p * np.exp(1j * (t0 + o) * w)).sum(-1) for o in 2 ** np.arange(17)], axis=0)
                sc = trig + (np.abs(kf) * (m[l, hq] - np.abs(qbar[l, hq]))).sum(-1)
                z[hq] = (sc - sc.mean()) / sc.std()
            for kv in range(HKV):
                out[l, b, kv, live] = z[kv * g:(kv + 1) * g].mean(0)
                newest = live[pos[l, b, kv, live] > pos[l, b, kv].max() - window]
                out[l, b, kv, newest] = np.inf
    return out


def test_triattention_scores_match_float64():
    obs = random_obs(seed=41, s=S)
    stats = _stats(42)
    got = np.asarray(jit_obs(TriAttention(stats=stats, window=WIN).score, obs))
    want = np_triattention(obs, stats, WIN)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def test_triattention_compress_keeps_the_best_and_the_window():
    obs = random_obs(seed=43, s=S)
    stats, n_keep = _stats(44), 15
    kept, _ = jcompress(TriAttention(stats=stats, window=WIN), obs, n_keep, S)
    want = np_triattention(obs, stats, WIN)
    pos, kpos = np.asarray(obs.cache.positions), np.asarray(kept.positions)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                top = np.argsort(-want[l, b, h], kind="stable")[:n_keep]
                assert set(kpos[l, b, h][kpos[l, b, h] >= 0].tolist()) == set(pos[l, b, h, top].tolist())


def test_triattention_calibration_and_decode_pruning():
    from tests.test_selection import CFG
    params = init_params(CFG, jax.random.PRNGKey(5), scale=0.3)
    prompt = list(np.random.default_rng(6).integers(1, 128, 70))
    stats = calibrate_triattention(params, CFG, jnp.asarray([prompt[:32]]))
    assert stats.qbar.shape == (CFG.n_layers, CFG.n_heads, CFG.head_dim // 2)
    assert np.all(stats.m >= np.abs(stats.qbar) - 1e-5)                    # mean |q| >= |mean q|
    pol = make_policy("triattention", stats=stats, window=8)
    out = generate(params, CFG, [prompt], 12, eos_ids=(), bucket=16,
                   compression=Compression(pol, Budget(tokens=48), when="decode", interval=8))
    assert len(out.tokens[0]) == 12


def test_triattention_bad_input():
    with pytest.raises(ValueError, match="needs calibrated query statistics"):
        make_policy("triattention")
    with pytest.raises(ValueError, match="must both be"):
        TriStats(qbar=np.zeros((2, 4, 4)), m=np.zeros((2, 4)))
    obs = random_obs(seed=45, s=S)
    bad = TriStats(qbar=np.zeros((L, HQ, 3)), m=np.zeros((L, HQ, 3)))
    with pytest.raises(ValueError, match="the model needs"):
        jit_obs(TriAttention(stats=bad).score, obs)
