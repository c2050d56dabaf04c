"""CompressKV: the layer's semantic retrieval heads choose one token set for all its kv heads.
Scores vs a float64 numpy loop of the spec (window sum, mean over the chosen heads, zeroed window,
avg pool 5 with zero padding, window protected; GQA 2 query heads per kv head); compress keeps the
same slots in every kv head at the budget's size; the NIAH detection sample; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observation
from kvjax.policies import make_policy
from kvjax.policies.base import compress
from kvjax.policies.compresskv import CompressKV, niah_sample, top_heads
from models.config import ModelConfig

B, HKV, G, S, W, D = 2, 2, 2, 20, 8, 4
HEADS = ((0, 3), (1, 2))
CFG = ModelConfig(name="tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=HKV * G, n_kv_heads=HKV, head_dim=D,
                  ffn_dim=32, rope_theta=10000.0)


def case(seed=0):
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(S), (2, B, HKV, S)).copy()
    pos[:, 1, :, :3] = -1                                           # row 1 left-padded
    probs = rng.random((2, B, HKV * G, W, S)) ** 3
    probs = np.where(pos[:, :, :1, None, :] >= 0, probs, 0.0)
    probs /= probs.sum(-1, keepdims=True)
    cache = kvcache.KVCache(keys=jnp.asarray(rng.normal(size=(2, B, HKV, S, D)), jnp.float32),
                            values=jnp.asarray(rng.normal(size=(2, B, HKV, S, D)), jnp.float32),
                            positions=jnp.asarray(pos, jnp.int32), lengths=jnp.full((2, B, HKV), S, jnp.int32))
    return probs, pos, cache


def np_scores(probs, pos, layer):
    out = np.zeros((B, HKV, S))
    for b in range(B):
        s = np.mean([probs[layer, b, h].sum(0) for h in HEADS[layer]], axis=0)
        live = pos[layer, b, 0] >= 0
        recent = live & (pos[layer, b, 0] > pos[layer, b, 0].max() - W)
        s = np.where(recent, 0.0, s)
        padded = np.concatenate([np.zeros(2), s, np.zeros(2)])
        pooled = np.array([padded[j:j + 5].sum() / 5 for j in range(S)])
        out[b] = np.where(recent, np.inf, pooled)[None]
    return out


def test_scores_match_numpy():
    probs, pos, cache = case()
    pol = CompressKV(heads=HEADS)
    for layer in (0, 1):
        one = jax.tree_util.tree_map(lambda x: x[layer:layer + 1], cache)
        obs = Observation(cache=one, config=CFG, window_probs=jnp.asarray(probs[layer:layer + 1], jnp.float32),
                          layer=layer, n_layers=2)
        got = np.asarray(pol.score(obs))[0]
        ref = np_scores(probs, pos, layer)
        live = pos[layer] >= 0
        np.testing.assert_allclose(got[live], ref[live], rtol=1e-5, atol=1e-7)


def test_compress_keeps_one_token_set_per_layer():
    probs, pos, cache = case(1)
    pol = CompressKV(heads=HEADS)
    scores = np.stack([np_scores(probs, pos, l) for l in (0, 1)])
    scores = np.where(pos >= 0, scores, -np.inf)
    k = 12
    new, _ = jax.jit(lambda c, s: compress(pol, CFG, c, s, jnp.full((B,), k, jnp.int32), k, k))(
        cache, jnp.asarray(scores, jnp.float32))
    p = np.asarray(new.positions)
    np.testing.assert_array_equal(p[:, :, 0], p[:, :, 1])            # same slots in both kv heads
    for l in (0, 1):
        for b in range(B):
            live = pos[l, b, 0] >= 0
            order = np.argsort(-np.where(live, scores[l, b, 0], -np.inf), kind="stable")[:k]
            assert set(p[l, b, 0].tolist()) == set(pos[l, b, 0, order].tolist())
    assert new.keys.shape[-2] == k and new.memory_bytes() < cache.memory_bytes()


def test_niah_sample_and_top_heads():
    toks, span, rows = niah_sample(np.random.default_rng(0), 64, haystack=30, needle=4, depth=0.5)
    needle = toks[span]
    assert len(toks) == 38 and np.array_equal(toks[rows + 1], needle)   # the answer rows predict the needle
    assert np.array_equal(toks[-4:], needle) and span.start == 15
    assert top_heads(np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 0.0, 1.0, 2.0]]), 2) == ((1, 2), (0, 3))


def test_find_heads_on_a_tiny_model():
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(0))
    pol = make_policy("compresskv", params=params, config=CFG, first_k=2, haystack=24, needle=4, depths=(0.5,))
    assert len(pol.heads) == 2 and all(len(set(r)) == 2 and max(r) < CFG.n_heads for r in pol.heads)
    assert pol.window == 8 and pol.kernel == 5 and pol.pool == "avg"


def test_bad_input():
    with pytest.raises(ValueError, match="semantic retrieval heads"):
        CompressKV()
    with pytest.raises(ValueError, match="params"):
        make_policy("compresskv")
    with pytest.raises(ValueError, match="first_k"):
        make_policy("compresskv", params={}, config=CFG, first_k=9)
    probs, pos, cache = case()
    obs = Observation(cache=cache, config=CFG, window_probs=jnp.asarray(probs, jnp.float32), n_layers=2)
    with pytest.raises(ValueError, match="out of range"):
        CompressKV(heads=((0, 7), (1, 2))).score(obs)
    with pytest.raises(ValueError, match="3 layers"):
        CompressKV(heads=((0,), (1,), (2,))).score(obs)


# --- error-aware layer budgets ---------------------------------------------------------------------

def np_allocation(importance, total, lo, hi):
    """The spec's allocation, float64 loops: b = clip(lo + round(imp (total - lo L)), lo, hi), then +1
    to layers below hi in decreasing importance (-1 above lo in increasing), pass after pass."""
    imp = np.asarray(importance, np.float64) / np.sum(importance)
    n = len(imp)
    b = np.clip(lo + np.round(imp * (total - lo * n)), lo, hi).astype(int)
    while b.sum() != total:
        diff = total - b.sum()
        order = sorted(range(n), key=lambda i: (-imp[i], i)) if diff > 0 else sorted(range(n), key=lambda i: (imp[i], i))
        moved = False
        for i in order:
            if b.sum() == total:
                break
            if diff > 0 and b[i] < hi:
                b[i] += 1
                moved = True
            elif diff < 0 and b[i] > lo:
                b[i] -= 1
                moved = True
        if not moved:
            break
    return b


@pytest.mark.parametrize("imp", [[0.1, 0.2, 0.3, 0.4, 0.0, 0.05],          # rounding, a zero layer
                                 [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],      # the cap 3C binds
                                 [1 / 6] * 6])                             # ties: +-1 in layer order
def test_error_aware_budgets_match_numpy(imp):
    from kvjax.policies.compresskv import error_aware_budgets
    n_keep = np.array([40, 100])
    got = np.asarray(error_aware_budgets(jnp.asarray(imp, jnp.float32), jnp.asarray(n_keep)))
    for b, c in enumerate(n_keep):
        ref = np_allocation(imp, 6 * c, min(32, c), 3 * c)
        np.testing.assert_array_equal(got[:, b], ref)
        assert got[:, b].sum() == 6 * c


def np_layer_errors(params, config, heads, context, continuation, budget, w=8):
    """Per-layer sum over continuation queries of ||o_proj(attn_kept) - o_proj(attn_full)|| / ||o_proj(attn_full)||,
    float64 numpy forward (RoPE as complex pairs), kept = the layer's CompressKV selection + the continuation."""
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    toks = np.asarray(list(context) + list(continuation))
    n, t = len(context), len(toks)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * g
    freqs = config.rope_theta ** (-np.arange(0, d, 2) / d)

    def rope(x):
        z = (x[..., :d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * np.arange(t)[:, None, None] * freqs)
        return np.concatenate([z.real, z.imag], -1)

    x = np.asarray(params["embed"], np.float64)[toks]
    errs = []
    for l in range(config.n_layers):
        h = rms(x, lay["attn_norm"][l])
        q = rope((h @ lay["wq"][l]).reshape(t, hq, d))
        k = rope((h @ lay["wk"][l]).reshape(t, hkv, d))
        v = (h @ lay["wv"][l]).reshape(t, hkv, d)
        kv = np.arange(hq) // (hq // hkv)
        s = np.einsum("qhd,khd->hqk", q, k[:, kv]) / np.sqrt(d)               # [Hq, T, T]
        mask = np.tril(np.ones((t, t), bool))
        def sm(a, m):
            a = np.where(m, a, -np.inf)
            with np.errstate(invalid="ignore"):                              # context rows left with no key: unused
                e = np.exp(a - a.max(-1, keepdims=True))
                return e / e.sum(-1, keepdims=True)
        win = sm(s[:, n - w:n, :n], mask[n - w:n, :n])                         # [Hq, w, n]
        score = np.mean([win[hd].sum(0) for hd in heads[l]], axis=0)
        score[n - w:] = 0.0
        pad = np.concatenate([np.zeros(2), score, np.zeros(2)])
        pooled = np.array([pad[j:j + 5].sum() / 5 for j in range(n)])
        pooled[n - w:] = np.inf
        kept = np.zeros(t, bool)
        kept[np.argsort(-pooled, kind="stable")[:budget]] = True
        kept[n:] = True
        full = sm(s, mask)
        comp = sm(s, mask & kept[None, :])
        out = lambda p: np.einsum("hqk,khd->qhd", p, v[:, kv]).reshape(t, hq * d) @ lay["wo"][l]
        of, oc = out(full)[n:], out(comp)[n:]
        errs.append(np.sum(np.linalg.norm(oc - of, axis=-1) / (np.linalg.norm(of, axis=-1) + 1e-5)))
        x = x + out(full)
        h = rms(x, lay["mlp_norm"][l])
        g = h @ lay["w_gate"][l]
        x = x + (g / (1 + np.exp(-g)) * (h @ lay["w_up"][l])) @ lay["w_down"][l]
    return np.asarray(errs)


def test_layer_importance_matches_numpy_and_budgets_shrink_memory():
    """Offline layer errors on a tiny GQA model vs the float64 reference; then `compress` with the
    layer shares gives a per-layer cache holding exactly the allocated budgets (sum = L x C)."""
    from kvjax.layerwise import LayerwiseCache
    from kvjax.policies.compresskv import layer_importance
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3, stacked=True)
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 64, 24).tolist(), rng.integers(0, 64, 4).tolist()) for _ in range(2)]   # same shape: one compile
    pol = CompressKV(heads=HEADS)
    got = layer_importance(params, CFG, pol, samples, 12)
    ref = sum(np_layer_errors(params, CFG, HEADS, c, x, 12) for c, x in samples)
    np.testing.assert_allclose(got, ref / ref.sum(), rtol=1e-4)
    assert abs(got[0] - got[1]) > 1e-3                                  # the layers really differ
    imp = (0.75, 0.25)
    pol = CompressKV(heads=HEADS, importance=imp, min_tokens=4)
    probs, pos, cache = case(2)
    scores = jnp.asarray(np.where(pos >= 0, np.stack([np_scores(probs, pos, l) for l in (0, 1)]), -np.inf), jnp.float32)
    k = 8
    budgets = [np_allocation(imp, 2 * c, 4, 3 * c) for c in (k, k)]     # both rows: uniform budget 8
    new, _ = jax.jit(lambda c, s: compress(pol, CFG, c, s, jnp.full((B,), k, jnp.int32), pol.max_keep(k, S), S))(
        cache, scores)
    assert isinstance(new, LayerwiseCache)
    new = new.resize(S)                                                  # the engine's eager resize: live + room
    for layer, lc in enumerate(new.layers):
        live = np.asarray(lc.positions >= 0).sum(-1)
        assert (live == budgets[0][layer]).all()                           # every head of layer l keeps b_l
    assert budgets[0].tolist() == [10, 6] and budgets[0].sum() == 2 * k
    assert [lc.keys.shape[-2] for lc in new.layers] == [10, 6]            # each layer allocates its own budget
    assert new.memory_bytes() == 2 * B * HKV * (2 * k * (2 * D * 4 + 4) // 2 + 4)


def test_bad_layer_budget_input():
    with pytest.raises(ValueError, match="importance"):
        CompressKV(heads=HEADS, importance=(0.5,))
    with pytest.raises(ValueError, match="importance"):
        CompressKV(heads=HEADS, importance=(0.5, -0.1))
    with pytest.raises(ValueError, match="min_tokens"):
        CompressKV(heads=HEADS, min_tokens=0)
    from kvjax.policies.compresskv import layer_importance
    with pytest.raises(ValueError, match="calibration samples"):
        layer_importance({}, CFG, CompressKV(heads=HEADS), [], 12)
    with pytest.raises(ValueError, match="longer than the budget"):
        layer_importance({}, CFG, CompressKV(heads=HEADS), [([1] * 8, [2])], 12)
