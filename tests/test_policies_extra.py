"""ExpectedAttention, ThinK, PyramidKV, AdaKV, Keyformer, DuoAttention, RazorAttention.

Every score / budget / cache is compared with an independent float64 numpy version of the
method's formula (written here from the spec), on small random inputs with GQA; then each
method runs through `kvjax.generate.generate` on the real SmolLM2.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.compression import Compression
from kvjax.generate import generate
from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import Budget, Observation, compress
from kvjax.layerwise import LayerwiseCache
from kvjax.policies.duo_attention import DuoAttention, HeadSplitCache
from kvjax.policies.expected_attention import ExpectedAttention
from kvjax.policies.keyformer import Keyformer
from kvjax.policies.knorm import KNorm
from kvjax.policies.pyramidkv import PyramidKV
from kvjax.policies.razor import RazorAttention, find_retrieval_heads, head_scores
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.think import ThinK, ThinKCache
from models.config import ModelConfig

L, B, HQ, HKV, S, D = 2, 2, 4, 2, 16, 8
PAD = 3    # batch row 1 is left-padded: its first PAD slots are empty


def tiny_config(n_layers=L, hq=HQ, hkv=HKV, d=D):
    return ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=n_layers, n_heads=hq, n_kv_heads=hkv,
                       head_dim=d, ffn_dim=32, rope_theta=10000.0)


def random_obs(seed=0, n_layers=L, hq=HQ, hkv=HKV, s=S, d=D, pad=PAD, window=4, t=None):
    """A prefill-like Observation: cache [L, B, Hkv, S, d] (row 1 left-padded), pre-RoPE queries of
    all S tokens, post-RoPE window queries, window probabilities."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n_layers, B, hkv, s, d)).astype(np.float32)
    values = rng.normal(size=(n_layers, B, hkv, s, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(s), (n_layers, B, hkv, s)).copy()
    pos[:, 1, :, :pad] = -1
    pos[:, 1, :, pad:] -= pad
    t = s if t is None else t
    q_pre = rng.normal(size=(n_layers, B, hq, t, d)).astype(np.float32)
    wq = rng.normal(size=(n_layers, B, hq, window, d)).astype(np.float32)
    cache = kvcache.KVCache(keys=jnp.asarray(keys), values=jnp.asarray(values), positions=jnp.asarray(pos, jnp.int32),
                            lengths=jnp.full((n_layers, B, hkv), s, jnp.int32))
    probs = rng.random(size=(n_layers, B, hq, window, s)).astype(np.float32)
    probs = np.where(pos[:, :, :1, None, :].repeat(hq, 2) >= 0, probs, 0)
    probs /= probs.sum(-1, keepdims=True)
    return Observation(cache=cache, config=tiny_config(n_layers, hq, hkv, d), window_probs=jnp.asarray(probs),
                       window_queries=jnp.asarray(wq), q_pre=jnp.asarray(q_pre), n_layers=n_layers)


def layer_obs(obs: Observation, layer: int) -> Observation:
    """Layer `layer` of a stacked Observation as the forward shows it to a policy: every array with
    a leading layers axis of size 1, `obs.layer` and `obs.n_layers` set."""
    one = lambda x: None if x is None else x[layer:layer + 1]
    return Observation(cache=jax.tree_util.tree_map(one, obs.cache), config=obs.config,
                       window_probs=one(obs.window_probs), window_queries=one(obs.window_queries),
                       column_sums=one(obs.column_sums), q_pre=one(obs.q_pre), k_pre=one(obs.k_pre),
                       v=one(obs.v), hidden=one(obs.hidden), accumulated=one(obs.accumulated),
                       layer=layer, n_layers=obs.n_layers)


def by_layer(fn, obs: Observation) -> jax.Array:
    """`fn` (a policy's score / accumulate) run on one layer at a time, as inside the forward,
    stacked over layers: [L, ...]."""
    return jnp.concatenate([fn(layer_obs(obs, l)) for l in range(obs.n_layers)])


@functools.partial(jax.jit, static_argnames=("fn", "config", "layered"))
def _run(fn, config, cache, wp, wq, qp, acc, layered=True):
    obs = Observation(cache=cache, config=config, window_probs=wp, window_queries=wq, q_pre=qp,
                      accumulated=acc, n_layers=cache.keys.shape[0])
    return by_layer(fn, obs) if layered else fn(obs)


def jit_obs(fn, obs: Observation, layered: bool = True):
    """Run `fn(observation)` under one jax.jit (op-by-op dispatch compiles every primitive: slow);
    layered: one layer at a time (a policy's score / accumulate, as the forward calls them).
    fn must be hashable by value (a bound method of a policy) for the compile cache to hit."""
    return _run(fn, obs.config, obs.cache, obs.window_probs, obs.window_queries, obs.q_pre, obs.accumulated,
                layered=layered)


def jcompress(policy, obs, n_keep, capacity, state=None):
    """compress() under jit, same n_keep for every batch row: the policy's scores computed layer by
    layer (as the forward's Observer reduces them), then selection over the stacked cache."""
    return jit_obs(lambda o: compress(policy, o.config, o.cache, by_layer(policy.score, o),
                                      jnp.full((B,), n_keep, jnp.int32), capacity, capacity,
                                      o.accumulated if state is not None else None, o.window_queries),
                   obs, layered=False)


# ----------------------------------------------------------------------------------------------
# numpy float64 helpers (independent of models/rope.py: complex rotation of the (i, i + d/2) pairs)

def np_rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    f = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * np.asarray(pos, np.float64)[..., None] * f)
    return np.concatenate([z.real, z.imag], -1)


def np_rope_matrix(p, d, theta=10000.0):
    """R_p with R_p x = rope(x, p)."""
    return np_rope(np.eye(d), np.full(d, p), theta).T


# ----------------------------------------------------------------------------------------------
# ExpectedAttention

def np_expected_attention(obs, n_future=512, n_sink=4, use_vnorm=True, eps=0.0):
    keys = np.asarray(obs.cache.keys, np.float64)
    vals = np.asarray(obs.cache.values, np.float64)
    pos = np.asarray(obs.cache.positions)
    q = np.asarray(obs.q_pre, np.float64)
    nl, b, hkv, s, d = keys.shape
    hq = q.shape[2]
    out = np.zeros((nl, b, hkv, s))
    for l in range(nl):
        for bi in range(b):
            qpos = pos[l, bi, 0, -q.shape[3]:]
            start = pos[l, bi].max() + 1
            rbar = np.mean([np_rope_matrix(p, d) for p in range(start, start + n_future)], axis=0)
            live = (pos[l, bi, 0] >= n_sink)
            per_q = np.zeros((hq, s))
            for h in range(hq):
                qs = q[l, bi, h][qpos >= n_sink]
                mu = qs.mean(0)
                cov = (qs - mu).T @ (qs - mu) / len(qs)
                mu, cov = rbar @ mu, rbar @ cov @ rbar.T
                k = keys[l, bi, h // (hq // hkv)]
                z = k @ mu / np.sqrt(d) + 0.5 * np.einsum("si,ij,sj->s", k, cov, k) / d
                z = np.where(live, z, -np.inf)
                e = np.exp(z - z[live].max())
                per_q[h] = e / e.sum()
            sc = per_q.reshape(hkv, hq // hkv, s).mean(1)
            if use_vnorm:
                sc = (sc + eps) * np.linalg.norm(vals[l, bi], axis=-1)
            out[l, bi] = np.where((pos[l, bi] >= 0) & (pos[l, bi] < n_sink), np.inf, sc)
    return out


def test_expected_attention_matches_numpy_formula():
    obs = random_obs(1)
    ours = np.asarray(jit_obs(ExpectedAttention().score, obs), np.float64)
    ref = np_expected_attention(obs)
    valid = np.asarray(obs.cache.valid)
    assert np.isposinf(ours[np.isposinf(ref)]).all()
    fin = np.isfinite(ref) & valid
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=2e-4, atol=1e-7)


def test_expected_attention_is_the_gaussian_expectation_monte_carlo():
    """With G=1 and no value norm, the score is E[exp(q.k/sqrt d)] normalised over keys, where q is
    the Gaussian (mean and covariance rotated by the average future RoPE): check by sampling."""
    obs = random_obs(2, n_layers=1, hq=1, hkv=1, s=10, d=4, pad=0)
    obs = Observation(cache=obs.cache, config=obs.config, q_pre=obs.q_pre * 0.3)
    pol = ExpectedAttention(n_sink=2, use_vnorm=False, n_future_positions=8)
    ours = np.asarray(jit_obs(pol.score, obs))[0, 0, 0, 2:]
    q = np.asarray(obs.q_pre, np.float64)[0, 0, 0, 2:]
    rbar = np.mean([np_rope_matrix(p, 4) for p in range(10, 18)], axis=0)
    mu, cov = rbar @ q.mean(0), rbar @ np.cov(q.T, bias=True) @ rbar.T
    samples = np.random.default_rng(0).multivariate_normal(mu, cov, size=400_000)
    k = np.asarray(obs.cache.keys, np.float64)[0, 0, 0, 2:]
    e = np.exp(samples @ k.T / 2.0).mean(0)
    np.testing.assert_allclose(ours, e / e.sum(), rtol=0.02)


# ----------------------------------------------------------------------------------------------
# ThinK

def test_think_channels_cache_and_attention_match_numpy():
    obs = random_obs(3, s=S, pad=0)
    n_keep = 12
    pol = ThinK(pruning_ratio=0.4, recent_size=4, query_window=4, token_policy=KNorm())
    new, _ = jcompress(pol, obs, n_keep, n_keep)
    assert isinstance(new, ThinKCache)
    d, n_pr = D, int(np.floor(0.4 * D))
    # numpy: token selection by -||k||, channel scores over the kept tokens, kept channels
    new_np = jax.tree_util.tree_map(np.asarray, new)
    keys = np.asarray(obs.cache.keys, np.float64)
    wq = np.asarray(obs.window_queries, np.float64)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                kept_tok = np.sort(np.argsort(np.linalg.norm(keys[l, b, h], axis=-1), kind="stable")[:n_keep])
                kk = keys[l, b, h, kept_tok]
                qterm = (wq[l, b, h * 2:(h + 1) * 2] ** 2).mean(1).mean(0)
                sc = qterm * (kk ** 2).mean(0)
                chans = np.sort(np.argsort(-sc, kind="stable")[: d - n_pr])
                np.testing.assert_array_equal(new_np.channels[l, b, h], chans)
                np.testing.assert_array_equal(new_np.pruned_positions[l, b, h], kept_tok[:-4])
                np.testing.assert_array_equal(new_np.recent.positions[l, b, h], kept_tok[-4:])
                np.testing.assert_allclose(new_np.keys[l, b, h], kk[:-4][:, chans], rtol=1e-6)
    assert new.keys.shape[-1] == d - n_pr and new.recent.keys.shape[-1] == d
    # attention of a new query: pruned tokens see q only on the kept channels
    rng = np.random.default_rng(0)
    k_new = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
    v_new = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
    layer = jax.jit(lambda c, k_, v_: jax.tree_util.tree_map(lambda x: x[0], c.resize(c.capacity + 1)).append(
        k_, v_, jnp.array([[S], [S]], jnp.int32)))(new, jnp.asarray(k_new), jnp.asarray(v_new))
    q = rng.normal(size=(B, HQ, 1, D)).astype(np.float32)
    out, _ = jax.jit(lambda c, q_, p_: c.attend(q_, p_, observe=Observe()))(layer, jnp.asarray(q), jnp.array([[S], [S]], jnp.int32))
    ch = np.asarray(layer.channels)
    out = np.asarray(out)
    layer = jax.tree_util.tree_map(np.asarray, layer)
    for b in range(B):
        for hq in range(HQ):
            h = hq // 2
            kp = np.zeros((n_keep - 4, D))
            kp[:, ch[b, h]] = np.asarray(layer.keys[b, h], np.float64)
            kfull = np.concatenate([kp, np.asarray(layer.recent.keys[b, h, :5], np.float64)])
            vfull = np.concatenate([np.asarray(layer.values[b, h], np.float64),
                                    np.asarray(layer.recent.values[b, h, :5], np.float64)])
            s_ = kfull @ q[b, hq, 0] / np.sqrt(D)
            p = np.exp(s_ - s_.max())
            np.testing.assert_allclose(np.asarray(out[b, hq, 0]), (p / p.sum()) @ vfull, rtol=1e-4, atol=1e-5)


def test_think_memory_shrinks_with_the_ratio():
    obs = random_obs(4, s=64, pad=0, window=4)
    sizes = {}
    for r in (0.0, 0.25, 0.5):
        new, _ = jcompress(ThinK(pruning_ratio=r, recent_size=4, query_window=4, token_policy=KNorm()), obs, 32, 32)
        sizes[r] = new.keys.size * new.keys.dtype.itemsize
    assert sizes[0.25] == sizes[0.0] * 6 // 8 and sizes[0.5] == sizes[0.0] // 2


# ----------------------------------------------------------------------------------------------
# PyramidKV

def np_pyramid(C, n, nl, w, beta=20):
    """KVCache-Factory PyramidKVCluster arithmetic (floor division), then the remainder returned."""
    if n < 2 * (C - w) or nl == 1:
        return np.full(nl, C)
    min_num = (C - w) // beta
    max_num = 2 * (C - w) - min_num
    if max_num >= n - w:
        max_num = n - w
        min_num = 2 * (C - w) - max_num
    steps = (max_num - min_num) // (nl - 1)
    b = np.array([w + max_num - l * steps for l in range(nl)])
    excess = b.sum() - nl * C
    b -= excess // nl
    b[: excess % nl] -= 1
    return b


@pytest.mark.parametrize("C,n", [(64, 200), (100, 1000), (512, 4000), (50, 80), (40, 500)])
def test_pyramid_budgets(C, n):
    from kvjax.policies.pyramidkv import pyramid_budgets
    b = pyramid_budgets(C, n, 30, 32)
    np.testing.assert_array_equal(b, np_pyramid(C, n, 30, 32))
    assert b.sum() == 30 * C and (np.diff(b) <= 0).all() and b.max() <= n
    jb = pyramid_budgets(jnp.array([C, C]), jnp.array([n, n]), 30, 32)
    np.testing.assert_array_equal(np.asarray(jb), np.stack([b, b], 1))


def test_pyramid_selection_keeps_layer_budgets():
    obs = random_obs(5, n_layers=4, s=64, pad=0, window=4)
    pol = PyramidKV(window=4, kernel=3, n_layers=4)
    cap = pol.max_keep(12, 64)
    new, _ = jcompress(pol, obs, 12, cap)
    b = np_pyramid(12, 64, 4, 4)
    assert cap == b.max() and PyramidKV(window=4, kernel=3).max_keep(12, 64) >= cap
    np.testing.assert_array_equal(np.asarray(new.lengths)[:, 0, 0], b)
    assert np.asarray(new.lengths).sum() == 4 * B * HKV * 12
    # window always kept, chronological order
    p = np.asarray(new.positions)
    assert all(set(range(60, 64)) <= set(p[l, 0, h]) for l in range(4) for h in range(HKV))
    for row in p.reshape(-1, p.shape[-1]):
        assert (np.diff(row[row >= 0]) > 0).all() and (row[: (row >= 0).sum()] >= 0).all()


# ----------------------------------------------------------------------------------------------
# AdaKV

def np_adakv_budgets(scores, n_keep, alpha):
    """Official AdaKV for one layer [Hkv, S]: protected (+inf) tokens w_h outside, Bbase_h = n_keep - w_h;
    flat top-(sum Bbase) of the rest; b_h = w_h + floor(alpha Bbase_h) + cnt_h (1 - alpha), rounded
    so the total is exact (largest fractional part first)."""
    hkv, s = scores.shape
    prot = np.isposinf(scores).sum(1)
    bbase = n_keep - prot
    flat = np.where(np.isposinf(scores), -np.inf, scores).ravel()
    top = np.argsort(-flat, kind="stable")[: bbase.sum()]
    cnt = np.bincount(top // s, minlength=hkv)
    fl = np.floor(alpha * bbase).astype(int)
    share = cnt * (1 - alpha)
    base = np.floor(share + 1e-9).astype(int)
    left = bbase.sum() - fl.sum() - base.sum()
    order = np.argsort(-np.round(share - base, 6), kind="stable")
    extra = np.zeros(hkv, int)
    extra[order[: left % hkv]] = 1
    return prot + fl + base + left // hkv + extra


@pytest.mark.parametrize("scorer", [KNorm(), ExpectedAttention(n_sink=2), SnapKV(window=4, kernel=3, pool="max")],
                         ids=["knorm", "expected_attention", "snapkv"])
@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_adakv_budgets_and_selection(scorer, alpha):
    obs = random_obs(6, hkv=4, hq=8, s=32, pad=0)
    pol = AdaKV(scorer=scorer, alpha=alpha, kv_heads=4)
    n_keep = 6
    cap = pol.max_keep(n_keep, 32)
    new, _ = jcompress(pol, obs, n_keep, cap)
    raw = np.asarray(jit_obs(scorer.score, obs), np.float64)
    lengths = np.asarray(new.lengths)
    newpos = np.asarray(new.positions)
    for l in range(L):
        for b in range(B):
            want = np_adakv_budgets(raw[l, b], n_keep, alpha)
            np.testing.assert_array_equal(lengths[l, b], want)
            assert lengths[l, b].sum() == 4 * n_keep
            for h in range(4):   # each head keeps its own top-b_h, sorted
                top = np.sort(np.argsort(-raw[l, b, h], kind="stable")[: want[h]])
                row = newpos[l, b, h]       # padded (live first) or packed per-head view (-1 between)
                np.testing.assert_array_equal(row[row >= 0], top)
    assert lengths.max() <= cap < 32


# ----------------------------------------------------------------------------------------------
# Keyformer

def test_keyformer_accumulated_gumbel_score_matches_numpy():
    obs = random_obs(7, s=10, pad=2)
    pol = Keyformer(seed=3)
    ours = np.asarray(jit_obs(pol.accumulate, obs), np.float64)
    # the same Gumbel draw, layer l's from fold_in(key, l) (the noise is an input of the formula,
    # not part of what is tested)
    zeta = jax.jit(lambda p: jnp.stack([jax.random.gumbel(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(3, impl="rbg"), jnp.max(p)), l),
        (B, HKV, 2, 10, 10)) for l in range(L)]))(obs.cache.positions)
    zeta = np.asarray(zeta, np.float64)
    pos = np.asarray(obs.cache.positions)
    q = np.asarray(obs.q_pre, np.float64)
    k = np.asarray(obs.cache.keys, np.float64)
    ref = np.zeros((L, B, HKV, 10))
    for l in range(L):
        for b in range(B):
            for hq in range(HQ):
                h, g = hq // 2, hq % 2
                p = pos[l, b, h]
                qr = np_rope(q[l, b, hq], np.maximum(p, 0))
                x = qr @ k[l, b, h].T / np.sqrt(D)
                live = (p[None, :] >= 0) & (p[None, :] <= p[:, None]) & (p[:, None] >= 0)
                y = np.where(live, (x + zeta[l, b, h, g]) / pol.tau(0), -np.inf)
                e = np.where(live, np.exp(y - np.where(live.any(1), y.max(1), 0)[:, None]), 0)
                gs = np.divide(e, e.sum(1, keepdims=True), out=np.zeros_like(e), where=e.sum(1, keepdims=True) > 0)
                ref[l, b, h] += gs.sum(0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # one layer at a time (inside the forward) or all layers stacked: the same noise per layer
    np.testing.assert_array_equal(ours, np.asarray(jit_obs(pol.accumulate, obs, layered=False), np.float64))
    # deterministic given the seed, different across seeds
    np.testing.assert_array_equal(ours, np.asarray(jit_obs(Keyformer(seed=3).accumulate, obs)))
    assert not np.allclose(ours, np.asarray(jit_obs(Keyformer(seed=4).accumulate, obs)))


def test_keyformer_keeps_recent_share_of_budget():
    obs = random_obs(8, s=40, pad=0)
    pol = Keyformer()
    state = jit_obs(pol.accumulate, obs)
    obs = Observation(cache=obs.cache, config=obs.config, q_pre=obs.q_pre, accumulated=state)
    n_keep = 20                                  # recent = int(20 * 0.3) = 6
    new, _ = jcompress(pol, obs, n_keep, n_keep, state=state)
    st = np.asarray(state, np.float64)
    newpos = np.asarray(new.positions)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                rest = np.sort(np.argsort(-st[l, b, h, :34], kind="stable")[:14])
                want = np.concatenate([rest, np.arange(34, 40)])
                np.testing.assert_array_equal(newpos[l, b, h], want)


# ----------------------------------------------------------------------------------------------
# DuoAttention / RazorAttention (head-split cache)

def np_attend(q, k, v, bias=None):
    s_ = k @ q / np.sqrt(len(q)) + (0 if bias is None else bias)
    p = np.exp(s_ - s_.max())
    return (p / p.sum()) @ v


PATTERN = ((1, 0), (0, 1))     # one retrieval kv head per layer


def test_duo_split_cache_attention_and_memory():
    obs = random_obs(9, s=32, pad=0)
    pol = DuoAttention(pattern=PATTERN, sink=2, recent=6)
    cap = pol.max_keep(8, 32)
    new, _ = jcompress(pol, obs, 8, cap)
    assert isinstance(new, LayerwiseCache) and all(isinstance(lc, HeadSplitCache) for lc in new.layers)
    np.testing.assert_array_equal(np.asarray(new.lengths), np.broadcast_to(
        np.where(np.asarray(PATTERN, bool), 32, 8)[:, None], (L, B, HKV)))
    full = obs.cache.memory_bytes()
    # after resize (no decode room): keys+values 1 head x 32 + 1 head x 8 slots instead of 2 x 32
    # (plus small position/bias arrays)
    new = new.resize(new.capacity)
    assert new.memory_bytes() < 0.7 * full
    layer = new.layers[1]
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, HQ, 1, D)).astype(np.float32)
    out, _ = jax.jit(lambda c, q_, p_: c.attend(q_, p_, observe=Observe()))(layer, jnp.asarray(q), jnp.array([[40], [40]], jnp.int32))
    out = np.asarray(out)
    k = np.asarray(obs.cache.keys[1], np.float64)
    v = np.asarray(obs.cache.values[1], np.float64)
    for b in range(B):
        for hq in range(HQ):
            h = hq // 2
            keep = np.arange(32) if PATTERN[1][h] else np.r_[0:2, 26:32]
            np.testing.assert_allclose(np.asarray(out[b, hq, 0]), np_attend(q[b, hq, 0], k[b, h, keep], v[b, h, keep]),
                                       rtol=1e-4, atol=1e-5)


def test_razor_compensation_token_matches_numpy():
    """Layer 1 has no retrieval head (an empty full part), layer 0 one of each."""
    obs = random_obs(10, s=32, pad=0)
    pattern = ((1, 0), (0, 0))
    none_streaming = RazorAttention(pattern=((1, 1), (0, 1)), sink=2, recent=6)   # R = Hkv: no stream rows
    dense, _ = jcompress(none_streaming, obs, 8, 32)
    assert dense.layers[0].stream.keys.shape[1] == 0 and dense.layers[0].full.keys.shape[1] == HKV
    pol = RazorAttention(pattern=pattern, sink=2, recent=6)
    cap = pol.max_keep(8, 32)
    new, _ = jcompress(pol, obs, 8, cap)
    rng = np.random.default_rng(2)
    q = rng.normal(size=(B, HQ, 1, D)).astype(np.float32)
    attend = jax.jit(lambda c, q_, p_: c.attend(q_, p_, observe=Observe()))
    new = new.resize(new.capacity)          # parts trimmed to their live tokens
    for l in range(L):
        layer = new.layers[l]
        out, _ = attend(layer, jnp.asarray(q), jnp.array([[40], [40]], jnp.int32))
        out = np.asarray(out)
        k = np.asarray(obs.cache.keys[l], np.float64)
        v = np.asarray(obs.cache.values[l], np.float64)
        for b in range(B):
            for hq in range(HQ):
                h = hq // 2
                if pattern[l][h]:
                    want = np_attend(q[b, hq, 0], k[b, h], v[b, h])
                else:
                    keep, drop = np.r_[0:2, 26:32], np.arange(2, 26)
                    kk = np.concatenate([k[b, h, keep], k[b, h, drop].mean(0, keepdims=True)])
                    vv = np.concatenate([v[b, h, keep], v[b, h, drop].mean(0, keepdims=True)])
                    want = np_attend(q[b, hq, 0], kk, vv, np.r_[np.zeros(8), np.log(24.0)])
                np.testing.assert_allclose(out[b, hq, 0], want, rtol=1e-4, atol=1e-5)


def test_razor_echo_induction_scores_match_numpy():
    rng = np.random.default_rng(0)
    toks = np.tile(rng.choice(50, 5, replace=False), 3)
    probs = rng.random((2, 3, 15, 15)) * np.tril(np.ones((15, 15)))
    probs /= probs.sum(-1, keepdims=True)
    echo, ind = head_scores(probs, toks, 5)
    ref_e, ref_i = np.zeros((2, 3)), np.zeros((2, 3))
    for t in range(5, 15):
        for s_ in range(t):
            if toks[s_] == toks[t]:
                ref_e += probs[:, :, t, s_] / 10
                ref_i += probs[:, :, t, s_ + 1] / 10
    np.testing.assert_allclose(echo, ref_e, rtol=1e-12)
    np.testing.assert_allclose(ind, ref_i, rtol=1e-12)


@pytest.fixture(scope="module")
def razor_heads(smollm2):
    config, params = smollm2
    return find_retrieval_heads(params, config, segment=32, repeats=3, seed=0)


def test_razor_finder_on_smollm2(smollm2, razor_heads):
    config, _ = smollm2
    pattern, echo, ind = razor_heads
    pat = np.asarray(pattern)
    assert pat.shape == (config.n_layers, config.n_kv_heads)
    n_top = math.ceil(0.14 * ind.size)
    # the protected heads really do induction: their score is far above the median head's
    top = np.sort(ind.ravel())[::-1][:n_top]
    assert top.min() > 3 * np.median(ind) and top[:5].min() > 0.5
    assert 1 <= pat.sum() <= n_top + math.ceil(0.01 * echo.size)


# ----------------------------------------------------------------------------------------------
# Every method through generate on the real SmolLM2

def _generate_cases(config, razor_pattern):
    nl, hkv = config.n_layers, config.n_kv_heads
    duo_pattern = tuple(tuple(int(h == l % hkv) for h in range(hkv)) for l in range(nl))
    return {
        "expected_attention": (ExpectedAttention(), Budget(ratio=0.5)),
        "think": (ThinK(), Budget(ratio=0.5)),
        "pyramidkv": (PyramidKV(n_layers=nl), Budget(ratio=0.5)),
        "adakv": (AdaKV(kv_heads=hkv), Budget(ratio=0.5)),
        # 0.5 as ExpectedAttention: the same decode cache, so generate reuses its compiled decode loop
        "keyformer": (Keyformer(), Budget(ratio=0.5)),
        "duo_attention": (DuoAttention(pattern=duo_pattern, sink=16, recent=48), Budget(tokens=64)),
        "razor": (RazorAttention(pattern=razor_pattern, sink=4, recent=60), Budget(tokens=64)),
    }


@pytest.fixture(scope="module")
def prompt(smollm2_tokenizer):
    from kvjax.eval.text import kjv_text
    return smollm2_tokenizer.encode(kjv_text()[:1500])[:200]


@pytest.fixture(scope="module")
def full_run(smollm2, prompt):
    config, params = smollm2
    return generate(params, config, [prompt], max_new_tokens=4)


@pytest.mark.parametrize("name", ["expected_attention", "think", "pyramidkv", "adakv", "keyformer",
                                  "duo_attention", "razor"])
def test_generate_with_policy_on_smollm2(name, smollm2, prompt, full_run, razor_heads):
    config, params = smollm2
    policy, budget = _generate_cases(config, razor_heads[0])[name]
    res = generate(params, config, [prompt], max_new_tokens=4, compression=Compression(policy, budget))
    assert len(res.tokens[0]) == 4
    if name in ("duo_attention", "razor"):
        # per-layer head-split layout: R_l rows of n + new slots, Hkv - R_l rows of sink + recent
        # (+1 compensation) + new slots
        n, d, f4 = len(prompt), config.head_dim, 4
        cf, cw = n + 4, policy.sink + policy.recent + (name == "razor") + 4
        want = 0
        for row in np.asarray(policy.pattern, bool):
            r, ss = int(row.sum()), int((~row).sum())
            # keys + values + position + bias per slot, lengths and head map per row
            want += (r * cf + ss * cw) * (2 * d * f4 + 2 * f4) + 2 * (r + ss) * f4
        assert res.stats["cache_bytes"] == want
        if np.asarray(policy.pattern).mean() <= 1 / 3:
            assert res.stats["cache_bytes"] < 0.6 * full_run.stats["cache_bytes"]
    else:
        assert res.stats["cache_bytes"] < full_run.stats["cache_bytes"], res.stats
    # 200 KJV tokens: the second greedy token (the first decoded over the compressed cache; the
    # first comes from the prefill logits, before compression) agrees with the full cache's
    if name not in ("duo_attention", "razor"):
        assert res.tokens[0][:2] == full_run.tokens[0][:2], (res.tokens[0], full_run.tokens[0])


# ----------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs_raise_clear_errors():
    # a tiny random model: the checks and the note below do not depend on the weights (on SmolLM2
    # the 20-token generate was a compilation of its own, ~90 CPU seconds)
    from models.llama import init_params
    config = tiny_config()
    params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="budget"):
        Budget(tokens=0)
    with pytest.raises(ValueError, match="pruning_ratio"):
        ThinK(pruning_ratio=1.0)
    with pytest.raises(ValueError, match="alpha"):
        AdaKV(alpha=1.5)
    with pytest.raises(ValueError, match="n_future_positions"):
        ExpectedAttention(n_future_positions=0)
    with pytest.raises(ValueError, match="recent"):
        Keyformer(recent=2.0)
    with pytest.raises(ValueError, match="pattern"):
        DuoAttention(pattern=((1, 0), (1,)))
    with pytest.raises(ValueError, match="exceed the observation window"):
        PyramidKV(n_layers=2, window=32).max_keep(20, 100)
    with pytest.raises(ValueError, match="segment"):
        find_retrieval_heads(params, config, segment=1)
    # a window longer than the context shrinks to fit, with a note (kvjax.compression.fit_window)
    res = generate(params, config, [list(range(1, 21))], max_new_tokens=2,
                   compression=Compression(PyramidKV(n_layers=config.n_layers), Budget(tokens=10)))
    assert any("window" in n for n in res.stats["notes"]), res.stats["notes"]
    # a pattern of the wrong shape for the cache; Keyformer asked to accumulate a decode step
    obs = random_obs(11, n_layers=3)
    with pytest.raises(ValueError, match="pattern is"):
        DuoAttention(pattern=PATTERN, sink=2, recent=6).score(obs)
    decode = Observation(cache=obs.cache, config=obs.config, q_pre=obs.q_pre[..., -1:, :])
    with pytest.raises(ValueError, match="decode step"):
        Keyformer().accumulate(decode)


def test_duo_pattern_from_alphas():
    alphas = np.random.default_rng(3).random((6, 4)) * 1.4 - 0.2          # some outside [0, 1]
    for sparsity in (0.5, 0.75):
        pat = np.asarray(DuoAttention.from_alphas(alphas, sparsity=sparsity, sink=2, recent=6).pattern)
        clipped = np.clip(alphas, 0, 1)
        np.testing.assert_array_equal(pat, clipped >= np.quantile(clipped, sparsity))
        assert abs(pat.mean() - (1 - sparsity)) <= 1 / alphas.size + 1e-9
    pat = np.asarray(DuoAttention.from_alphas(alphas, sink=2, recent=6).pattern)
    np.testing.assert_array_equal(pat, np.clip(alphas, 0, 1) >= 0.5)
