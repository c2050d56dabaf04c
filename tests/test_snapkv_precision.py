"""SnapKV-family scores against a float64 numpy reference (issue 19, item 1).

SnapKV's avg pooling used to be a difference of float32 running sums (cumsum) over the whole context,
so a small score was quantised to the float32 spacing of the running total (~64 after a 64-query
window): on a 1,201-token text two distinct scores came out identical and SnapKV kept another token
than kvpress. `kvjax.policies.snapkv.pool1d` now sums each output's `kernel` inputs directly.
SnapKV, PyramidKV, ThinK's default token scorer and AdaKV over SnapKV all pool through it.

Precision rule checked here: for every non-protected slot whose float64 reference score is above
REL_FLOOR (1e-7) x the sum of its head's reference scores, |ours - ref| <= RTOL (1e-5) x ref -- a
relative error per score, relative to the score itself. Protected (window) slots must be +inf in both.
The reference is computed in float64 from the same float32 window attention probabilities the
policies see; the case has 1,300 slots, probabilities spanning > 15 orders of magnitude and pooled
scores spanning ~7 (measured: max relative error 3.7e-7 with the direct sum, 0.10-0.15 with the old
cumsum pooling over the checked scores, up to 1.0 below the floor).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.policies import snapkv as snapkv_module
from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import Observation
from kvjax.policies.pyramidkv import PyramidKV
from kvjax.policies.snapkv import SnapKV, pool1d
from kvjax.policies.think import ThinK

RTOL = 1e-5        # per-score relative error allowed
REL_FLOOR = 1e-7   # scores below this fraction of their head's total are not checked

S = 1300           # slots (context tokens)
W = 64             # observation queries recorded (the largest window tested)
LAYERS, BATCH, KV_HEADS, GROUP = 2, 1, 2, 3


def _cumsum_pool1d(x, kernel, how="avg"):
    """The old pooling (a difference of running sums), kept here only to show the checks catch it."""
    if kernel <= 1 or how != "avg":
        return pool1d(x, kernel, how)
    pad = kernel // 2
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    c = jnp.pad(jnp.cumsum(xp, axis=-1), [(0, 0)] * (x.ndim - 1) + [(1, 0)])
    return ((c[..., kernel:] - c[..., :-kernel]) / kernel)[..., : x.shape[-1]]


def _window_probs(seed: int = 0, s: int = S) -> np.ndarray:
    """float32 softmax rows [L, B, Hq, W, S] of the last W causal queries of an s-token context:
    an attention sink, a recency bump, a few heavy hitters, a per-key logit offset shared by the
    queries (std 4: some keys are ignored by every query, so pooled scores span ~7 orders of
    magnitude) and per-query noise."""
    rng = np.random.default_rng(seed)
    hq = KV_HEADS * GROUP
    logits = rng.normal(0.0, 4.0, (LAYERS, BATCH, hq, 1, s)) + rng.normal(0.0, 1.0, (LAYERS, BATCH, hq, W, s))
    logits[..., 0] += 12.0
    q_pos = np.arange(s - W, s)[:, None]
    k_pos = np.arange(s)[None, :]
    logits += 4.0 * np.exp(-np.clip(q_pos - k_pos, 0, None) / 40.0)
    heavy = rng.choice(np.arange(1, s - W), size=24, replace=False)
    logits[..., heavy] += rng.uniform(3.0, 8.0, size=heavy.size)
    logits = np.where(k_pos <= q_pos, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _observation(probs: np.ndarray) -> Observation:
    layers, batch, _, _, s = probs.shape
    cache = kvcache.init_cache(layers, batch, KV_HEADS, s, 8)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), cache.positions.shape)
    cache = dataclasses.replace(cache, positions=positions, lengths=jnp.full(cache.lengths.shape, s, jnp.int32))
    return Observation(cache=cache, config=None, window_probs=jnp.asarray(probs))


def _reference(probs: np.ndarray, window: int, kernel: int, pool: str, reduce: str) -> np.ndarray:
    """float64 SnapKV scores [L, B, Hkv, S] from the float32 probabilities (window columns +inf)."""
    p = probs.astype(np.float64)[..., -window:, :].sum(-2)                    # [L, B, Hq, S]
    *lead, hq, s = p.shape
    g = p.reshape(*lead, KV_HEADS, hq // KV_HEADS, s)
    x = g.mean(-2) if reduce == "mean" else g.max(-2)
    recent = np.arange(s) >= s - window
    x = np.where(recent, 0.0, x)
    pad = kernel // 2
    if kernel > 1:
        xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)],
                    constant_values=0.0 if pool == "avg" else -np.inf)
        win = np.stack([xp[..., k:k + s] for k in range(kernel)])
        x = win.sum(0) / kernel if pool == "avg" else win.max(0)
    return np.where(recent, np.inf, x)


def _relative_errors(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative error of every checked score (the module docstring's rule); protected slots must agree."""
    ours = np.asarray(ours, np.float64)
    prot = np.isposinf(ref)
    np.testing.assert_array_equal(np.isposinf(ours), prot)
    finite = np.where(prot, 0.0, ref)
    total = finite.sum(-1, keepdims=True)
    checked = ~prot & (finite > REL_FLOOR * total)
    assert checked.sum() >= 0.5 * (~prot).sum(), "the case should check most slots"
    return np.abs(ours[checked] - ref[checked]) / ref[checked]


# policy, and the (window, kernel, pool, reduce) its token scores use
POLICIES = {
    "snapkv": (SnapKV(), (64, 5, "avg", "mean")),
    "pyramidkv": (PyramidKV(), (32, 5, "avg", "mean")),
    "think_token_scorer": (ThinK(), (32, 5, "avg", "mean")),
    "adakv_snapkv_avg": (AdaKV(scorer=SnapKV(window=32, kernel=7, pool="avg")), (32, 7, "avg", "mean")),
    "adakv_default_max": (AdaKV(), (32, 7, "max", "mean")),
}


@pytest.fixture(scope="module")
def case():
    probs = _window_probs()
    pos = probs[probs > 0]
    assert probs.shape[-1] >= 1200 and pos.max() / pos.min() > 1e15, "values must span many orders of magnitude"
    ref = _reference(probs, 64, 5, "avg", "mean")
    scores = ref[np.isfinite(ref)]
    assert scores.max() / scores.min() > 1e6, "pooled scores must span many orders of magnitude"
    return probs, _observation(probs)


@pytest.mark.parametrize("name", list(POLICIES))
def test_scores_match_float64_reference(name, case):
    probs, obs = case
    policy, (window, kernel, pool, reduce) = POLICIES[name]
    ours = np.asarray(policy.score(obs))
    rel = _relative_errors(ours, _reference(probs, window, kernel, pool, reduce))
    assert rel.max() <= RTOL, f"{name}: max relative error {rel.max():.3g} > {RTOL} over {rel.size} scores"


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "think_token_scorer", "adakv_snapkv_avg"])
def test_old_cumsum_pooling_fails_the_reference_check(name, case, monkeypatch):
    """The same check rejects the old cumsum pooling (so the test above guards against it)."""
    probs, obs = case
    policy, (window, kernel, pool, reduce) = POLICIES[name]
    monkeypatch.setattr(snapkv_module, "pool1d", _cumsum_pool1d)
    rel = _relative_errors(np.asarray(policy.score(obs)), _reference(probs, window, kernel, pool, reduce))
    assert rel.max() > RTOL


def _two_small_scores(a: float, b: float, j1: int = 1000, j2: int = 1100, s: int = 1201):
    """Window probabilities of one head (1 layer, GROUP query heads) whose pooled SnapKV scores are `a`
    around slot j1 and `b` around slot j2: every query puts almost all its mass on the sink (so the
    running sum reaches ~W before j1) and 5a/W, 5b/W on j1 and j2."""
    probs = np.zeros((1, BATCH, KV_HEADS * GROUP, W, s), np.float64)
    probs[..., j1] = 5 * a / W
    probs[..., j2] = 5 * b / W
    probs[..., 0] = 1.0 - probs.sum(-1)
    return probs.astype(np.float32)


def test_distinct_small_scores_stay_distinct(monkeypatch):
    """The issue's numbers: 1.18016e-6 vs 1.18475e-6 on a 1,201-token context. The direct sum keeps them
    apart (and each within RTOL of float64); the cumsum pooling made them equal."""
    a, b, j1, j2 = 1.18016e-6, 1.18475e-6, 1000, 1100
    probs = _two_small_scores(a, b, j1, j2)
    obs = _observation(probs)
    ref = _reference(probs, 64, 5, "avg", "mean")
    assert ref[0, 0, 0, j2] > ref[0, 0, 0, j1]
    ours = np.asarray(SnapKV().score(obs), np.float64)
    for j in (j1, j2):
        assert abs(ours[0, 0, 0, j] - ref[0, 0, 0, j]) <= RTOL * ref[0, 0, 0, j]
    assert ours[0, 0, 0, j2] > ours[0, 0, 0, j1]

    monkeypatch.setattr(snapkv_module, "pool1d", _cumsum_pool1d)
    old = np.asarray(SnapKV().score(obs))
    assert old[0, 0, 0, j1] == old[0, 0, 0, j2], "the old pooling merged the two scores"


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("how", ["avg", "max"])
def test_pool1d_matches_numpy(kernel, how):
    """pool1d itself (odd and even kernels, torch avg_pool1d/max_pool1d padding semantics)."""
    x = np.random.default_rng(1).lognormal(-8.0, 4.0, (2, 3, 1250)).astype(np.float32)
    ours = np.asarray(pool1d(jnp.asarray(x), kernel, how), np.float64)
    pad = kernel // 2
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pad, pad)], constant_values=0.0 if how == "avg" else -np.inf)
    win = np.stack([xp[..., k:k + x.shape[-1]] for k in range(kernel)])
    ref = win.sum(0) / kernel if how == "avg" else win.max(0)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0)
