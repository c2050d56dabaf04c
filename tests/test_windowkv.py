"""WindowKV (kvjax.policies.windowkv) against a float64 numpy implementation of its window
scores (average / max strategies) and of the kept set (the best whole windows + the suffix)."""
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.policies import make_policy
from kvjax.policies.windowkv import WindowKV
from tests.test_policies_extra import B, HQ, HKV, by_layer, jcompress, jit_obs, random_obs

S, SUFFIX, SIZE = 45, 6, 8


def np_windowkv(obs, suffix, size, strategy):
    """[L, B, S] window score per token (nan: not in the prefix) from the float64 window probs."""
    probs = np.asarray(obs.window_probs, np.float64)[..., -suffix:, :].sum(-2)   # [L, B, Hq, S]
    pos = np.asarray(obs.cache.positions)
    nl, nb = probs.shape[:2]
    out = np.full((nl, nb, probs.shape[-1]), np.nan)
    for l in range(nl):
        for b in range(nb):
            live = np.flatnonzero(pos[l, b, 0] >= 0)
            prefix = live[:len(live) - suffix]
            for w0 in range(0, len(prefix), size):
                slots = prefix[w0:w0 + size]
                blk = probs[l, b][:, slots]                                    # [Hq, n]
                if strategy == "average":
                    sc = blk.mean()
                else:
                    k = min(size // 2, len(slots))
                    sc = np.mean([np.sort(row)[::-1][:k].mean() for row in blk])
                out[l, b, slots] = sc
    return out


@pytest.mark.parametrize("strategy", ["average", "max"])
def test_windowkv_scores_match_float64(strategy):
    obs = random_obs(seed=3, s=S, window=SUFFIX)
    pol = WindowKV(suffix=SUFFIX, size=SIZE, strategy=strategy)
    got = np.asarray(jit_obs(pol.score, obs))                                  # [L, B, Hkv, S]
    want = np_windowkv(obs, SUFFIX, SIZE, strategy)
    pos = np.asarray(obs.cache.positions)
    for h in range(HKV):
        prefix = ~np.isnan(want)
        np.testing.assert_allclose(got[:, :, h][prefix], want[prefix], rtol=1e-5)
        newest = (pos[:, :, h] >= 0) & ~prefix
        assert np.all(np.isposinf(got[:, :, h][newest]))
        assert np.all(np.isneginf(got[:, :, h][pos[:, :, h] < 0]))


def test_windowkv_keeps_best_windows_and_the_suffix():
    obs = random_obs(seed=4, s=S, window=SUFFIX)
    n_keep = SUFFIX + 2 * SIZE
    kept, _ = jcompress(WindowKV(suffix=SUFFIX, size=SIZE), obs, n_keep, S)
    want = np_windowkv(obs, SUFFIX, SIZE, "average")
    pos = np.asarray(obs.cache.positions)
    kpos = np.asarray(kept.positions)
    for l in range(want.shape[0]):
        for b in range(B):
            live = pos[l, b, 0] >= 0
            sc = want[l, b]
            # the best windows first, older tokens first inside a window, to n_keep with the suffix
            prefix = [(-sc[j], pos[l, b, 0, j]) for j in np.flatnonzero(~np.isnan(sc))]
            keep = {p for _, p in sorted(prefix)[:n_keep - SUFFIX]} | set(pos[l, b, 0][live & np.isnan(sc)].tolist())
            assert len(keep) == n_keep
            for h in range(HKV):
                assert set(kpos[l, b, h][kpos[l, b, h] >= 0].tolist()) == keep


def test_windowkv_bad_input_and_registry():
    with pytest.raises(ValueError, match="strategy must be"):
        WindowKV(strategy="median")
    with pytest.raises(ValueError, match="must be positive"):
        WindowKV(size=0)
    assert make_policy("windowkv", suffix=32, strategy="max") == WindowKV(suffix=32, strategy="max")
