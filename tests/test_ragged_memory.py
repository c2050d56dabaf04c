"""Per-head / per-layer budgets allocate real memory: kvjax.packed (head-packed pools, AdaKV),
kvjax.layerwise (one cache per layer: PyramidKV, DuoAttention / RazorAttention).

References are independent of the ragged storage: float64 numpy attention over the kept tokens of
each head, the budget formulas, and the full prefill cache with the dropped slots masked out
(kvpress's masking trick, through the ordinary stacked KVCache path).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.compression import Compression
from kvjax.generate import forward_jit, generate, left_pad, plan_cache, prefill
from kvjax.layerwise import LayerwiseCache
from kvjax.packed import PackedCache, pack
from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import Budget, Observation, compress
from kvjax.policies.duo_attention import DuoAttention
from kvjax.policies.pyramidkv import PyramidKV, pyramid_budgets
from kvjax.policies.snapkv import SnapKV
from models.config import ModelConfig
from models.llama import init_params

L, B, HQ, HKV, S, D = 3, 2, 4, 2, 64, 8
F32 = 4


def tiny_config():
    return ModelConfig(name="tiny", vocab_size=64, d_model=32, n_layers=L, n_heads=HQ, n_kv_heads=HKV,
                       head_dim=D, ffn_dim=32, rope_theta=10000.0)


def random_obs(seed=0, window=8):
    """A prefill-like Observation over a full cache [L, B, Hkv, S, D] (no padding)."""
    rng = np.random.default_rng(seed)
    cache = kvcache.KVCache(
        keys=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
        values=jnp.asarray(rng.normal(size=(L, B, HKV, S, D)), jnp.float32),
        positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, HKV, S)),
        lengths=jnp.full((L, B, HKV), S, jnp.int32))
    probs = rng.random((L, B, HQ, window, S)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    return Observation(cache=cache, config=tiny_config(), window_probs=jnp.asarray(probs),
                       window_queries=jnp.asarray(rng.normal(size=(L, B, HQ, window, D)), jnp.float32),
                       n_layers=L)


def layer_scores(policy, obs: Observation) -> jax.Array:
    """The policy's scores [L, B, Hkv, S], computed one layer at a time as the forward's Observer
    does (each layer's arrays with a leading layers axis of 1, `layer` and `n_layers` set)."""
    def one(l):
        take = lambda x: None if x is None else x[l:l + 1]
        return policy.score(Observation(cache=jax.tree_util.tree_map(take, obs.cache), config=obs.config,
                                        window_probs=take(obs.window_probs),
                                        window_queries=take(obs.window_queries), layer=l, n_layers=L))
    return jnp.concatenate([one(l) for l in range(L)])


@functools.partial(jax.jit, static_argnames=("policy", "max_keep"))
def _compress(policy, cache, wp, wq, n_keep, *, max_keep):
    obs = Observation(cache=cache, config=tiny_config(), window_probs=wp, window_queries=wq, n_layers=L)
    return compress(policy, obs.config, cache, layer_scores(policy, obs), n_keep, max_keep, max_keep,
                    queries=wq)[0]


def compressed(policy, obs, n_keep, room=0):
    """compress (jit) then generate's eager resize to max_keep + room."""
    max_keep = policy.max_keep(n_keep, S)
    new = _compress(policy, obs.cache, obs.window_probs, obs.window_queries, jnp.full((B,), n_keep, jnp.int32),
                    max_keep=max_keep)
    return kvcache.resize(new, max_keep + room)


def kept_sets(cache) -> np.ndarray:
    """[L, B, Hkv] object array of each head's kept positions (any layout's per-head positions)."""
    pos = np.asarray(cache.positions)
    out = np.empty(pos.shape[:3], object)
    for i in np.ndindex(out.shape):
        out[i] = tuple(sorted(pos[i][pos[i] >= 0]))
    return out


# ----------------------------------------------------------------------------------------------
# Budgets sum to the layer / total budget; bytes = formula; bytes shrink with the budget

SLOT = 2 * D * F32           # keys + values of one slot


def test_adakv_packed_budgets_and_bytes():
    obs = random_obs(1)
    pol = AdaKV(scorer=SnapKV(window=8, kernel=3, pool="max"), kv_heads=HKV)
    sizes = {}
    for n_keep in (32, 16):
        room = 3
        c = compressed(pol, obs, n_keep, room)
        assert isinstance(c, PackedCache)
        lengths = np.asarray(c.lengths)
        assert (lengths.sum(-1) == HKV * n_keep).all()        # per-layer total = Hkv * n_keep
        assert len(np.unique(lengths)) > 1                     # really head-adaptive
        pool = HKV * (n_keep + room)
        # keys + values + position (int32) + head tag (int16) per slot, used [L, B]
        want = L * B * pool * (SLOT + F32 + 2) + L * B * F32
        assert c.memory_bytes() == want
        if n_keep == 32:  # the uniform SnapKV cache of the same budget: same slots; the 2-byte head
            # tag is 3% of a 68-byte slot here (0.4% at head_dim 64 in float32)
            uni = compressed(SnapKV(window=8, kernel=3, pool="max"), obs, n_keep, room)
            assert 0 < c.memory_bytes() - uni.memory_bytes() <= 0.03 * uni.memory_bytes()
        sizes[n_keep] = compressed(pol, obs, n_keep).memory_bytes()
    assert sizes[16] / sizes[32] == pytest.approx(0.5, abs=0.01)


def test_pyramid_layerwise_budgets_and_bytes():
    obs = random_obs(2)
    pol = PyramidKV(window=8, kernel=3, n_layers=L)
    sizes = {}
    for n_keep in (32, 16):
        c = compressed(pol, obs, n_keep, room=2)
        assert isinstance(c, LayerwiseCache)
        b = pyramid_budgets(n_keep, S, L, 8)
        assert b.sum() == L * n_keep and len(set(b.tolist())) > 1
        np.testing.assert_array_equal(np.asarray(c.lengths), np.broadcast_to(b[:, None, None], (L, B, HKV)))
        # layer l holds budget_l + room slots per head; keys + values + position per slot, lengths
        assert [lc.capacity for lc in c.layers] == [int(x) + 2 for x in b]
        assert c.memory_bytes() == B * HKV * ((b + 2).sum() * (SLOT + F32) + L * F32)
        sizes[n_keep] = compressed(pol, obs, n_keep).memory_bytes()
        # the stacked layout would allocate layer 0's budget in every layer
        assert sizes[n_keep] < 0.85 * B * HKV * L * b.max() * (SLOT + F32)
    assert sizes[16] / sizes[32] == pytest.approx(0.5, abs=0.02)


def test_adakv_over_pyramid_packs_each_layer():
    """Layer totals from PyramidKV, heads adaptive inside: one packed pool of Hkv * budget_l per layer."""
    obs = random_obs(8)
    pol = AdaKV(scorer=PyramidKV(window=8, kernel=3, n_layers=L), kv_heads=HKV)
    c = compressed(pol, obs, 24, room=2)
    assert isinstance(c, LayerwiseCache) and all(isinstance(lc, PackedCache) for lc in c.layers)
    b = pyramid_budgets(24, S, L, 8)
    lengths = np.asarray(c.lengths)
    np.testing.assert_array_equal(lengths.sum(-1), np.broadcast_to(HKV * b[:, None], (L, B)))
    assert len(np.unique(lengths[0])) > 1
    assert [lc.pool for lc in c.layers] == [HKV * (int(x) + 2) for x in b]
    assert c.memory_bytes() == B * (HKV * (b + 2).sum() * (SLOT + F32 + 2) + L * F32)


PATTERN = ((1, 0), (0, 0), (1, 1))


@pytest.mark.parametrize("n_keep", [8, 20])
def test_duo_any_budget_sets_streaming_heads(n_keep):
    """Budget(tokens=sink + recent) is the official deployment (n_keep = 8 here); any other budget
    keeps sink + (n_keep - sink) newest tokens in streaming heads; bytes = per-layer rows."""
    obs = random_obs(3)
    pol = DuoAttention(pattern=PATTERN, sink=2, recent=6)
    assert pol.default_budget.kept(S) == 8
    c = compressed(pol, obs, n_keep, room=1)
    sets = kept_sets(c)
    for l, row in enumerate(PATTERN):
        for h, ret in enumerate(row):
            want = range(S) if ret else [*range(2), *range(S - (n_keep - 2), S)]
            assert all(sets[l, b, h] == tuple(want) for b in range(B))
    want = 0
    for row in PATTERN:
        r = sum(row)
        # rows: R_l x (S + 1), (Hkv - R_l) x (n_keep + 1); per slot keys, values, position, bias;
        # per row lengths and head map
        want += B * (r * (S + 1) + (HKV - r) * (n_keep + 1)) * (SLOT + 2 * F32) + HKV * (B + 1) * F32
    assert c.memory_bytes() == want
    full = kvcache.resize(obs.cache, S + 1).memory_bytes()
    assert c.memory_bytes() < full                           # a layer full of retrieval heads costs ~dense


# ----------------------------------------------------------------------------------------------
# Head-packed attention vs float64 numpy

def np_attention(q, k, v, qpos, kpos):
    """One query head: softmax over the kept keys not after the query (float64)."""
    out = np.zeros((len(q), v.shape[-1]))
    for t in range(len(q)):
        m = kpos <= qpos[t]
        if m.any():
            z = k[m] @ q[t] / np.sqrt(len(q[t]))
            p = np.exp(z - z.max())
            out[t] = (p / p.sum()) @ v[m]
    return out


def test_packed_attention_and_append_match_numpy():
    rng = np.random.default_rng(4)
    lengths = np.array([[5, 12], [9, 1]])                       # ragged per (batch, head)
    keys = rng.normal(size=(B, HKV, 12, D)).astype(np.float32)
    values = rng.normal(size=(B, HKV, 12, D)).astype(np.float32)
    pos = np.full((B, HKV, 12), -1, np.int32)
    for b, h in np.ndindex(B, HKV):                            # each head keeps its own positions
        pos[b, h, :lengths[b, h]] = np.sort(rng.choice(20, lengths[b, h], replace=False))
    dense = kvcache.KVCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(pos), jnp.asarray(lengths, jnp.int32))
    packed = pack(dense).resize(12 + 2)                        # room for 2 tokens per head
    assert packed.pool == lengths.sum(-1).max() + 2 * HKV
    np.testing.assert_array_equal(np.asarray(packed.lengths), lengths)

    attend = jax.jit(lambda c, q_, p_: c.attend(q_, p_, observe=Observe())[0])
    new_k = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
    new_v = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
    for step in range(2):
        q = rng.normal(size=(B, HQ, 3, D)).astype(np.float32)
        qpos = np.array([[7, 15, 19], [3, 10, 19]]) + 20 * step
        out = np.asarray(attend(packed, jnp.asarray(q), jnp.asarray(qpos, jnp.int32)), np.float64)
        for b, hq in np.ndindex(B, HQ):
            h = hq // (HQ // HKV)
            kk, vv, kp = keys[b, h, :lengths[b, h]], values[b, h, :lengths[b, h]], pos[b, h, :lengths[b, h]]
            if step:
                kk, vv, kp = np.r_[kk, new_k[b, h]], np.r_[vv, new_v[b, h]], np.r_[kp, 30]
            np.testing.assert_allclose(out[b, hq], np_attention(q[b, hq].astype(np.float64), kk, vv, qpos[b], kp),
                                       rtol=1e-5, atol=1e-5)
        packed = jax.jit(lambda c, k_, v_, p_: c.append(k_, v_, p_))(
            packed, jnp.asarray(new_k), jnp.asarray(new_v), jnp.full((B, 1), 30, jnp.int32))


# ----------------------------------------------------------------------------------------------
# Through the model: generate runs; the first decode logits equal the full prefill cache with the
# dropped slots masked (the same kept sets, independently stored and attended)

@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    params = init_params(config, jax.random.PRNGKey(0), scale=0.5, stacked=True)
    prompts = [list(np.random.default_rng(5).integers(1, 64, 64)), list(np.random.default_rng(6).integers(1, 64, 52))]
    tokens, positions = (jnp.asarray(x) for x in left_pad(prompts, 0))
    full = kvcache.init_cache(L, B, HKV, 64 + 1, D)
    logits, full, _ = forward_jit(params, tokens, positions, full, config)
    return config, params, prompts, tokens, positions, full, logits


def masked_reference(full: kvcache.KVCache, sets) -> kvcache.KVCache:
    """The full cache with every slot outside its head's kept set marked empty."""
    pos = np.asarray(full.positions).copy()
    for i in np.ndindex(sets.shape):
        pos[i][~np.isin(pos[i], sets[i])] = -1
    return dataclasses.replace(full, positions=jnp.asarray(pos))


def duo_sets(pattern, lengths, n_keep, sink):
    sets = np.empty((L, B, HKV), object)
    for l, b, h in np.ndindex(sets.shape):
        n = lengths[b]
        sets[l, b, h] = tuple(range(n)) if pattern[l][h] else (*range(sink), *range(n - (n_keep[b] - sink), n))
    return sets


@pytest.mark.parametrize("name", ["adakv", "pyramidkv", "pyramid_adakv", "duo"])
def test_generate_first_logits_equal_masked_full_cache(name, tiny_model):
    config, params, prompts, tokens, positions, full, logits = tiny_model
    policy = {"adakv": AdaKV(scorer=SnapKV(window=4, kernel=3), kv_heads=HKV),
              "pyramidkv": PyramidKV(window=4, kernel=3, n_layers=L),
              "pyramid_adakv": AdaKV(scorer=PyramidKV(window=4, kernel=3, n_layers=L), kv_heads=HKV),
              "duo": DuoAttention(pattern=PATTERN, sink=2, recent=6)}[name]
    comp = Compression(policy, Budget(ratio=0.25))
    lengths = [len(p) for p in prompts]
    plan = plan_cache(tokens.shape[1], lengths, 4, None, comp)
    cache = kvcache.init_cache(L, B, HKV, plan.prefill_capacity, D)
    last, cache, _ = prefill(params, config, tokens, positions, cache, None, False, plan.compression,
                             jnp.asarray(plan.n_keep, jnp.int32), plan.max_keep, None)
    cache = kvcache.resize(cache, plan.decode_capacity)
    assert isinstance(cache, PackedCache if name == "adakv" else LayerwiseCache)
    if name == "duo":
        sets = duo_sets(PATTERN, lengths, plan.n_keep, 2)
    else:  # the same policy with the padded stacked layout (ragged storage not involved)
        _, padded, _ = prefill(params, config, tokens, positions, kvcache.init_cache(L, B, HKV, plan.prefill_capacity, D),
                               None, False, Compression(dataclasses.replace(policy, ragged=False), comp.budget),
                               jnp.asarray(plan.n_keep, jnp.int32), plan.max_keep, None)
        assert isinstance(padded, kvcache.KVCache)
        sets = kept_sets(padded)
    got = kept_sets(cache)
    assert all(got[i] == sets[i] for i in np.ndindex(sets.shape))
    first = jnp.argmax(last, -1).astype(jnp.int32)[:, None]
    nxt = jnp.asarray([[n] for n in lengths], jnp.int32)
    ragged_logits, _, _ = forward_jit(params, first, nxt, cache, config)
    ref_logits, _, _ = forward_jit(params, first, nxt, masked_reference(full, sets), config)
    np.testing.assert_allclose(np.asarray(ragged_logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    # and generate runs end to end with the same layout
    res = generate(params, config, prompts, max_new_tokens=4, compression=comp, bucket=1)
    assert [len(t) for t in res.tokens] == [4, 4]
    assert res.tokens[0][0] == int(first[0, 0]) and res.tokens[0][1] == int(jnp.argmax(ragged_logits[0, -1]))


# ----------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs(tiny_model):
    config, params, prompts, *_ = tiny_model
    res = generate(params, config, prompts[:1], max_new_tokens=2, bucket=1,
                   compression=Compression(AdaKV(scorer=SnapKV(window=4, kernel=3)), Budget(tokens=500)))
    assert "no compression" in res.stats["notes"][0]           # budget >= context: a no-op with a note
    with pytest.raises(ValueError, match="budget"):
        Budget(ratio=0.0)
    obs = random_obs(7)
    c = compressed(AdaKV(scorer=SnapKV(window=8, kernel=3), kv_heads=HKV), obs, 16, room=2)
    with pytest.raises(ValueError, match="less room"):
        c.resize(c.capacity - 3)
    lw = compressed(PyramidKV(window=8, kernel=3, n_layers=L), obs, 16)
    with pytest.raises(ValueError, match="less room"):
        lw.resize(lw.capacity - 1)
    with pytest.raises(ValueError, match="pool"):
        pack(obs.cache, pool=0)
    with pytest.raises(ValueError, match="cannot be compressed again"):
        jax.tree_util.tree_map(lambda x: x[0], c).attend(
            jnp.zeros((B, HQ, 1, D)), jnp.zeros((B, 1), jnp.int32), observe=Observe(window=1))
    # per-slot observations of a layer-wise cache whose layers differ in size
    from kvjax.observation import Observer
    from models.llama import forward
    with pytest.raises(ValueError, match="different sizes"):
        forward(params, jnp.zeros((B, 1), jnp.int32), jnp.full((B, 1), 70, jnp.int32), lw, config,
                observer=Observer(SnapKV(window=1, kernel=3)))
    # chunk / decode schedules keep the padded stacked layout (they observe the cache again)
    assert Compression(AdaKV(), Budget(ratio=0.5), when="chunk").policy.ragged is False
    assert Compression(PyramidKV(), Budget(ratio=0.5), when="decode").policy.ragged is False
