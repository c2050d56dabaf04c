"""TreeKV (kvjax.policies.treekv) against a float64 numpy version of the spec's rule: average
attention = accumulated / queries seen, and a cyclic eviction scope that evicts the lower of two
adjacent cached tokens per arrival, the scope returning to the oldest token after c // 2 evictions
(written here as a plain Python list simulation, and once worked by hand)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.generate import generate
from kvjax.policies import Budget, make_policy
from kvjax.policies.treekv import TreeKV, tree_survivors
from tests.test_policies_extra import B, HKV, HQ, L, jcompress, jit_obs, random_obs

S = 40


def np_average(acc, pos):
    acc = np.asarray(acc, np.float64)
    newest = pos.max(-1, keepdims=True)
    return np.where(pos >= 0, acc / np.maximum(newest - pos + 1, 1), -np.inf)


def np_tree_keep(pos_row, avg_row, c):
    """Set of kept positions of one head: stream the live tokens in position order into a cache of
    size c; arrival number c + e evicts the lower-scored of cache[p], cache[p + 1], p = e mod (c // 2)
    (e counted over the whole stream: the evictions before this call are newest + 1 - live)."""
    live = [(int(p), float(a)) for p, a in sorted(zip(pos_row, avg_row)) if p >= 0]
    n = len(live)
    if n <= c:
        return {p for p, _ in live}
    done = live[-1][0] + 1 - n
    cache = list(live[:c])
    for e, tok in enumerate(live[c:]):
        cache.append(tok)
        p = (done + e) % max(c // 2, 1)
        (_, sa), (_, sb) = cache[p], cache[p + 1]
        del cache[p + 1 if sb < sa else p]
    return {p for p, _ in cache}


def obs_with_state(seed, s=S):
    obs = random_obs(seed=seed, s=s)
    rng = np.random.default_rng(seed + 100)
    acc = rng.random(size=obs.cache.positions.shape).astype(np.float32) * 5
    acc = np.where(np.asarray(obs.cache.positions) >= 0, acc, 0).astype(np.float32)
    return dataclasses.replace(obs, accumulated=jnp.asarray(acc))


def test_treekv_average_score_and_accumulate_match_float64():
    obs = obs_with_state(1)
    got = np.asarray(jit_obs(TreeKV().score, obs))
    pos = np.asarray(obs.cache.positions)
    want = np_average(obs.accumulated, pos)
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-6)
    assert np.all(np.isneginf(got[~fin]))
    # the running score: attention received, mean over each kv head's query group
    cs = np.random.default_rng(2).random(size=(1, B, HQ, S)).astype(np.float32)
    one = dataclasses.replace(obs, cache=jax.tree_util.tree_map(lambda x: x[:1], obs.cache), column_sums=jnp.asarray(cs))
    inc = np.asarray(TreeKV().accumulate(one))
    np.testing.assert_allclose(inc, cs.astype(np.float64).reshape(1, B, HKV, HQ // HKV, S).mean(3), rtol=1e-6)


def test_treekv_small_example_worked_by_hand():
    """c = 4, tokens 0..7 with average scores s; sweeps of c // 2 = 2 evictions:
    [0 1 2 3]+4: (0,1) .9/.1 -> drop 1;  [0 2 3 4]+5: (2,3) .5/.6 -> drop 2;   (sweep ends, back to 0)
    [0 3 4 5]+6: (0,3) .9/.6 -> drop 3;  [0 4 5 6]+7: (4,5) .2/.8 -> drop 4   => {0, 5, 6, 7}.
    The newest c // 2 = 2 tokens are never in the scope. (Sweeping all c slots per pass instead
    would compare (4,5) then (6,7) and keep {0, 3, 5, 7}: the newest tokens halved.)"""
    s = np.array([0.9, 0.1, 0.5, 0.6, 0.2, 0.8, 0.3, 0.4])
    pos = np.arange(8, dtype=np.int32)
    assert np_tree_keep(pos, s, 4) == {0, 5, 6, 7}
    got = np.asarray(tree_survivors(jnp.asarray(s[None], jnp.float32), jnp.asarray(pos[None]), jnp.asarray([4])))
    assert set(pos[got[0]].tolist()) == {0, 5, 6, 7}


@pytest.mark.parametrize("n_keep", [7, 16, 33])
def test_treekv_keeps_the_cyclic_scope_survivors(n_keep):
    obs = obs_with_state(3 + n_keep)
    kept, _ = jcompress(TreeKV(), obs, n_keep, S, state=True)
    pos, kpos = np.asarray(obs.cache.positions), np.asarray(kept.positions)
    avg = np_average(obs.accumulated, pos)
    for l in range(L):
        for b in range(B):
            for h in range(HKV):
                want = np_tree_keep(pos[l, b, h], avg[l, b, h], n_keep)
                assert set(kpos[l, b, h][kpos[l, b, h] >= 0].tolist()) == want, (l, b, h)


def test_treekv_continues_the_stream_and_thins_old_tokens_exponentially():
    rng = np.random.default_rng(7)
    # a cache that already went through evictions: 24 live tokens of positions < 300 plus 10 new
    pos = np.sort(rng.choice(290, 24, replace=False)).tolist() + list(range(290, 300))
    pos = np.asarray(pos + [-1] * 6, np.int32)[None]
    avg = rng.random(size=pos.shape)
    got = np.asarray(tree_survivors(jnp.asarray(avg, jnp.float32), jnp.asarray(pos), jnp.asarray([24])))
    assert set(pos[0][got[0]].tolist()) == np_tree_keep(pos[0], avg[0], 24)
    # one long stream: kept tokens are dense near the end, sparse far back
    n, c = 2000, 64
    p = np.arange(n, dtype=np.int32)[None]
    a = rng.random(size=(1, n))
    keep = np.asarray(tree_survivors(jnp.asarray(a, jnp.float32), jnp.asarray(p), jnp.asarray([c])))[0]
    kp = p[0][keep]
    assert set(kp.tolist()) == np_tree_keep(p[0], a[0], c)
    gaps = np.diff(kp)
    assert gaps[: c // 4].mean() > 4 * gaps[-c // 4:].mean()
    assert kp.min() < n - 4 * c                                          # reaches far back, thinly
    for m in (n, 2 * c, 3 * c + 5):          # the newest c // 2 are always kept, also when the
        k = np.asarray(tree_survivors(jnp.asarray(a[:, :m], jnp.float32), jnp.asarray(p[:, :m]),
                                      jnp.asarray([c])))[0]                # evictions are a multiple of c
        assert k[m - c // 2:m].all() and k[:m].sum() == c, m


def test_treekv_budget_over_context_keeps_everything_and_registry():
    obs = obs_with_state(9)
    kept, _ = jcompress(TreeKV(), obs, S, S, state=True)
    assert np.array_equal(np.sort(np.asarray(kept.positions), -1), np.sort(np.asarray(obs.cache.positions), -1))
    assert make_policy("treekv") == TreeKV()


def test_treekv_generate_on_smollm2_saves_memory(smollm2_jax, smollm2_tokenizer):
    """One short real-model case: chunked prefill with eviction keeps the cache at the budget; the
    final and the peak cache are well below the full cache of the prompt + new tokens."""
    from kvjax.eval.text import kjv_text
    config, params = smollm2_jax
    prompt = smollm2_tokenizer.encode(kjv_text()[:1500])[:200]
    res = generate(params, config, [prompt], max_new_tokens=4,
                   compression=Compression(TreeKV(), Budget(tokens=64), when="chunk"), chunk_size=64)
    assert len(res.tokens[0]) == 4
    item = jnp.dtype(params["embed"].dtype).itemsize
    full = config.n_layers * config.n_kv_heads * (len(prompt) + 4) * 2 * config.head_dim * item
    assert res.stats["cache_capacity"] < 64 + 8
    assert res.stats["cache_bytes"] < 0.5 * full and res.stats["peak_cache_bytes"] < full, (res.stats, full)
