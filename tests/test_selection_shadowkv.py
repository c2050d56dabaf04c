"""ShadowKV (kvjax.selection.shadowkv) against a float64 numpy implementation of its spec: RoPE
inverted, SVD of the pre-RoPE keys at a rank, chunk landmarks, outlier chunks by min cosine,
local chunks, softmax landmark scores summed over the GQA group, rebuilt keys re-rotated; host
value offload round trip; generate on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import generate
from kvjax.observation import Observe
from kvjax.selection import ShadowKV, make_selection
from kvjax.selection.base import wrap_layer
from kvjax.selection.shadowkv import fetch_rows, host_memory_kind, to_host
from models.llama import init_params
from models.rope import apply_rope
from tests.test_selection import B, CFG, D, HKV, HQ, _filled


def _np_rope(x, pos, theta):
    """Llama half-split RoPE of x [n, d] at positions pos [n] (float64)."""
    half = x.shape[-1] // 2
    ang = pos[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])[None]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _np_shadowkv(q, k, v, pos, length, sel, theta):
    """One batch row: q [HQ, D], k/v [HKV, cap, D], pos [HKV, cap]. Returns (out [HQ, D],
    {kv_head: selected chunk set}, {kv_head: outlier chunk set})."""
    cap, c, g = k.shape[1], sel.page_size, HQ // HKV
    live = pos[0] >= 0
    pre = np.zeros((cap, HKV * D))
    for h in range(HKV):
        pre[live, h * D:(h + 1) * D] = _np_rope(k[h, live], -pos[h, live].astype(np.float64), theta)
    uu, s, vt = np.linalg.svd(pre, full_matrices=False)
    r = min(sel.rank, HKV * D, cap)
    approx = (uu[:, :r] * s[:r]) @ vt[:r]
    exact_from = (length // c - sel.local_chunks) * c
    out, chosen, outliers = np.zeros((HQ, D)), {}, {}
    for h in range(HKV):
        comp, mean, mincos = [], {}, {}
        for ch in range(cap // c):
            members = [j for j in range(ch * c, ch * c + c) if live[j]]
            if not members or ch * c + c > exact_from:
                continue
            comp.append(ch)
            mean[ch] = k[h, members].mean(0)
            mincos[ch] = min(k[h, j] @ mean[ch] / np.linalg.norm(k[h, j]) / np.linalg.norm(mean[ch]) for j in members)
        out_set = set(sorted(comp, key=lambda ch: mincos[ch])[:sel.outlier_chunks])
        cand = [ch for ch in comp if ch not in out_set]
        score = {ch: 0.0 for ch in cand}
        for hq in range(h * g, (h + 1) * g):
            lg = np.asarray([q[hq] @ mean[ch] / np.sqrt(D) for ch in cand])
            p = np.exp(lg - lg.max())
            for ch, pc in zip(cand, p / p.sum()):
                score[ch] += pc
        top = set(sorted(cand, key=lambda ch: -score[ch])[:sel.budget // c])
        chosen[h], outliers[h] = top, out_set
        keys, vals = [], []
        for j in range(cap):
            if not live[j] or j >= length:
                continue
            if j // c in top:
                keys.append(_np_rope(approx[j:j + 1, h * D:(h + 1) * D], pos[h, j:j + 1].astype(np.float64), theta)[0])
            elif j // c in out_set or j >= exact_from:
                keys.append(k[h, j])
            else:
                continue
            vals.append(v[h, j])
        keys, vals = np.asarray(keys), np.asarray(vals)
        for hq in range(h * g, (h + 1) * g):
            lg = keys @ q[hq] / np.sqrt(D)
            p = np.exp(lg - lg.max())
            out[hq] = (p / p.sum()) @ vals
    return out, chosen, outliers


ROPE = lambda x, p: apply_rope(x, p, CFG)


@jax.jit
def _update(layer, q, qpos):
    return layer.attend_and_update(q, qpos, observe=Observe(), rope=ROPE)


def _run(sel, kv, q, qpos):
    layer = jax.jit(wrap_layer, static_argnums=(0, 2))(sel, kv, CFG)
    out, _, layer = _update(layer, jnp.asarray(q)[:, :, None], jnp.asarray(qpos)[:, None])
    return out, layer


@pytest.mark.parametrize("sel", [ShadowKV(budget=24, rank=6, outlier_chunks=2, local_chunks=2, offload=True),
                                 ShadowKV(budget=16, rank=32, outlier_chunks=0, local_chunks=1)])
def test_shadowkv_matches_float64_spec(sel):
    lengths, pad = [112, 101], [0, 13]
    kv, k, v, pos = _filled(128, lengths=lengths, pad=pad, seed=21)
    q = np.random.default_rng(22).standard_normal((B, HQ, D)).astype(np.float32)
    out, layer = _run(sel, kv, q, np.asarray([130, 130]))
    meta = layer.meta
    for b in range(B):
        want, chosen, outliers = _np_shadowkv(q[b].astype(np.float64), k[b], v[b], pos[b], lengths[b], sel,
                                              CFG.rope_theta)
        for h in range(HKV):
            got = set(np.asarray(layer.state.indices[b, h])[np.asarray(layer.state.valid[b, h])].tolist())
            assert got == chosen[h], (b, h)
            assert set(np.flatnonzero(np.asarray(meta.outlier[b, h])).tolist()) == outliers[h]
        np.testing.assert_allclose(np.asarray(out[b, :, 0]), want, rtol=2e-4, atol=2e-5)


def test_shadowkv_full_rank_and_all_chunks_equals_dense():
    """rank = kv_heads * d and a budget over every candidate chunk: the rebuilt keys are the keys."""
    kv, *_ = _filled(128, lengths=[120, 97], pad=[0, 9], seed=23)
    q = jnp.asarray(np.random.default_rng(24).standard_normal((B, HQ, D)), jnp.float32)
    qpos = np.asarray([125, 125])
    dense, _ = kv.attend(q[:, :, None], jnp.asarray(qpos)[:, None], observe=Observe(), backend="xla")
    out, _ = _run(ShadowKV(budget=120, rank=HKV * D, outlier_chunks=1, local_chunks=1), kv, q, qpos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-4, atol=1e-5)


def test_shadowkv_values_offloaded_round_trip_bit_exact():
    kv, _, v, _ = _filled(64, lengths=[64, 50], pad=[0, 0], seed=25)
    kind = host_memory_kind()
    if kind is None:
        pytest.skip("this backend has no host memory kind; ShadowKV keeps values on the device")
    host = jax.jit(to_host)(kv.values)
    assert host.sharding.memory_kind == "pinned_host"
    slots = jnp.asarray(np.random.default_rng(26).permutation(64)[None, None].repeat(B, 0).repeat(HKV, 1),
                        jnp.int32)
    back = jax.jit(fetch_rows, static_argnums=2)(host, slots, True)
    assert back.sharding.memory_kind == "device"
    want = np.take_along_axis(np.asarray(kv.values), np.asarray(slots)[..., None], axis=2)
    assert np.array_equal(np.asarray(back), want)
    _, layer = _run(ShadowKV(budget=16, rank=4, outlier_chunks=1, local_chunks=1, offload=True), kv,
                    np.zeros((B, HQ, D), np.float32), np.asarray([70, 70]))
    assert layer.meta.values.sharding.memory_kind == "pinned_host"


def test_shadowkv_bad_input():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        ShadowKV(rank=0)
    with pytest.raises(ValueError, match="at least one chunk"):
        ShadowKV(budget=4)
    kv, *_ = _filled(60, lengths=[60, 60], pad=[0, 0])
    with pytest.raises(ValueError, match="does not divide the cache capacity 60"):
        wrap_layer(ShadowKV(budget=16), kv, CFG)
    assert make_selection("shadowkv", budget=512) == ShadowKV(budget=512)


def test_generate_tiny_shadowkv():
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 128, 150)), list(rng.integers(1, 128, 120))]
    full = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32)
    big = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32, selection=ShadowKV(budget=4096))
    assert big.tokens == full.tokens
    small = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32,
                     selection=ShadowKV(budget=32, rank=8, outlier_chunks=2, local_chunks=2))
    assert all(len(t) == 6 for t in small.tokens) and small.stats["read_bytes_per_step"]["ratio"] < 0.6


def test_generate_with_values_on_the_host():
    """offload=True through generate (values in pinned_host) gives the on-device tokens; the raw
    decode_loop with an unwrapped cache is a clear error instead of an XLA:CPU abort."""
    if host_memory_kind() is None:
        pytest.skip("this backend has no host memory kind")
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    prompts = [list(np.random.default_rng(0).integers(1, 128, 150))]
    kw = dict(budget=32, rank=8, outlier_chunks=2, local_chunks=2)
    dev = generate(params, CFG, prompts, 4, eos_ids=(), bucket=32, selection=ShadowKV(**kw))
    host = generate(params, CFG, prompts, 4, eos_ids=(), bucket=32, selection=ShadowKV(offload=True, **kw))
    assert host.tokens == dev.tokens
    from kvjax.generate import decode_loop, init_engine_cache
    from kvjax.sampling import Sampling
    with pytest.raises(ValueError, match="wrap the cache before decode_loop"):
        decode_loop(params, init_engine_cache(CFG, 1, 64), jnp.asarray([3]), jnp.asarray([0]), jax.random.PRNGKey(0),
                    config=CFG, sampling=Sampling(), max_new_tokens=2, eos_ids=(), selection=ShadowKV(offload=True, **kw))
