"""SALE and HyperAttention sparse prefill (kvjax.sparse_prefill.sale / .hyper) vs float64 numpy
re-derivations of their specs (shared/methods quantization_and_sparse_attention.md §8, §9), the
attention they drive, and their errors.

Geometry, inputs and the masked float64 attention come from test_sparse_prefill (odd chunk
lengths, unaligned query offsets, left padding).
"""
import dataclasses
import functools
import json

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kvjax.cache import KVCache
from kvjax.sparse_prefill import SALE, make_sparse_prefill
from kvjax.sparse_prefill.attend import attend, block_mask
from tests.test_sparse_prefill import MID, SMALL, _inputs, np_attention, np_geometry


@functools.partial(jax.jit, static_argnums=0)
def _block_mask(method, q, k, starts, lengths):
    mask, geo = block_mask(method, q, k, starts, lengths, 0, q.shape[-1] ** -0.5)
    return mask, geo.live_blocks()


def local_inputs(seed, amp=4.0, period=300, **shape):
    """_inputs plus a recency bias: a 2-d rotation by the slot added to q and k, so q_i . k_j gains
    amp^2 cos(2 pi (i - j) / period) and sink + local hold much of each query's mass."""
    q, k, v, st, ln = _inputs(seed, **shape)
    qslot = jnp.repeat(ln[..., None] - shape["t"] + jnp.arange(shape["t"]), shape["hq"] // shape["hkv"], axis=1)
    w = 2 * np.pi / period
    rot = lambda x: amp * jnp.stack([jnp.cos(w * x), jnp.sin(w * x)], -1)
    return q.at[..., :2].add(rot(qslot)), k.at[..., :2].add(rot(jnp.arange(shape["s"]))[None, None]), v, st, ln


def np_head_union(method, q, k, starts, lengths, head_mask):
    """[b, hkv, nqb, nkb]: union over each kv head's query heads of head_mask(qh [T, d], kh [S, d],
    starts, length, live, firsts) -> [nqb, nkb] (float64 inputs), every live block for a context of
    at most method.min_seq_len tokens (both methods' dense fallback)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    out = None
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            st, ln = int(starts[bi, kh]), int(lengths[bi, kh])
            live, firsts, nqb, nkb = np_geometry(t, s, method.block_size, st, ln)
            if out is None:
                out = np.zeros((b, hkv, nqb, nkb), bool)
            dense = ln - st <= method.min_seq_len
            out[bi, kh] |= live if dense else head_mask(q[bi, h], k[bi, kh], st, ln, live, firsts) & live
    return out


# ---------------------------------------------------------------------------------------------
# SALE


def np_int8(x):
    """per-row symmetric int8 of a float64 matrix -> (codes, scales)."""
    amax = np.abs(x).max(-1)
    sc = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(x / sc[:, None]), -127, 127), sc


def np_sale_scores(q, k, qslots, starts, length, sale, scale, tau=None):
    """float64 spec of SALE for one query head: (estimate [T, S], exact sink+local threshold [T],
    pair wanted [T, S]); q [T, d], k [S, d]; tau: the head's tau_h (default sale.tau)."""
    tau = sale.tau if tau is None else tau
    s = k.shape[0]
    live = [j for j in range(s) if starts <= j < length]
    k_s = k - k[live].mean(0)
    rows = [i for i, qs in enumerate(qslots) if qs >= starts]
    q_mean = q[rows].mean(0)
    cq, sq = np_int8(q - q_mean)
    ck, sk = np_int8(np.where(np.isin(np.arange(s), live)[:, None], k_s, 0.0))
    est = np.zeros((len(qslots), s))
    thr = np.full(len(qslots), np.inf)
    want = np.zeros((len(qslots), s), bool)
    lv = np.asarray(live)
    for i in rows:
        qs = qslots[i]
        seen = lv[lv <= qs]
        est[i, seen] = (sq[i] * sk[seen] * (ck[seen] @ cq[i]) + k_s[seen] @ q_mean) * scale
        near = seen[(seen < starts + sale.sink) | (seen > qs - sale.local)]
        z = k_s[near] @ q[i] * scale
        m = z.max()
        thr[i] = m + np.log(tau * np.exp(z - m).sum())
        want[i, seen] = np.exp(est[i, seen] - m) / np.exp(z - m).sum() > tau           # relative score
    return est, thr, want


def np_sale_mask(sale, q, k, starts, lengths):
    bs = sale.block_size
    hq = q.shape[1]
    taus = iter([sale.tau if sale.taus is None else sale.taus[0][h] for _ in range(q.shape[0]) for h in range(hq)])

    def head(qh, kh, st, ln, live, firsts):
        t, nqb, nkb = qh.shape[0], *live.shape
        qslots = [ln - t + i for i in range(t)]
        _, _, want = np_sale_scores(qh, kh, qslots, st, ln, sale, qh.shape[1] ** -0.5, next(taus))
        m = np.zeros((nqb, nkb), bool)
        for i, j in zip(*np.nonzero(want)):
            m[i // bs, j // bs] = True
        for i in range(nqb):                           # sink + local blocks (token rule per query slot)
            for qs in range(firsts[i], firsts[i] + bs):
                for j in range(nkb * bs):
                    if st <= j < st + sale.sink or qs - sale.local < j <= qs:
                        m[i, j // bs] = True
        return m
    return np_head_union(sale, q, k, starts, lengths, head)


HEAD_TAUS = ((0.2, 0.004, 0.05, 0.01, 0.1, 0.02),)     # [layer 0][6 query heads]
SALE_CASES = [
    (SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16, taus=HEAD_TAUS), MID, 3, "sparse"),
    (SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16), MID, 3, "sparse"),     # density ~0.58
    (SALE(tau=0.01, sink=4, local=20, min_seq_len=16, block_size=16), MID, 3, "sparse"),     # ~0.84
    (SALE(tau=0.05, sink=4, local=20, min_seq_len=300, block_size=16), MID, 5, "dense"),    # context <= 300
]


@pytest.mark.parametrize("sale,shape,seed,expect", SALE_CASES, ids=["per-head-tau", "mid", "mid-tau0.01", "dense-fallback"])
def test_sale_block_mask_matches_float64_spec(sale, shape, seed, expect):
    q, k, _, starts, lengths = local_inputs(seed, **shape)
    mask, live = _block_mask(sale, q, k, starts, lengths)
    mask, live = np.asarray(mask), np.asarray(live)
    ref = np_sale_mask(sale, q, k, np.asarray(starts), np.asarray(lengths))
    assert np.array_equal(mask, ref), (np.argwhere(mask != ref), ref.mean())
    assert 0 < ref.sum() <= live.sum()
    if expect == "dense":
        assert ref.sum() == live.sum()
    elif expect == "sparse":
        assert ref.sum() < 0.9 * live.sum()


def test_sale_int8_estimate_and_threshold():
    """The int8 estimate is close to the exact smoothed logit (< 6 % of its spread); the logit-form
    threshold equals the relative-score rule; quantize_int8 matches the float64 per-token rule."""
    from kvjax.sparse_prefill.sale import quantize_int8
    q, k, _, starts, lengths = local_inputs(3, **MID)
    qn, kn = np.asarray(q[0, 0], np.float64), np.asarray(k[0, 0], np.float64)
    sale = SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16)
    qslots = [290 - 70 + i for i in range(70)]
    est, thr, want = np_sale_scores(qn, kn, qslots, 0, 290, sale, 0.25)
    exact = qn @ (kn - kn[:290].mean(0)).T * 0.25
    causal = np.arange(300)[None] <= np.asarray(qslots)[:, None]
    err = np.abs(est - exact)[causal]
    assert err.max() < 0.06 * exact[causal].std() and err.mean() < 0.01 * exact[causal].std(), err.max()
    # the logit-domain threshold m + log(tau l) (what the kernel tests) is the relative-score rule
    margin = (est - thr[:, None])[causal]
    assert np.array_equal(want[causal][np.abs(margin) > 1e-9], (margin > 0)[np.abs(margin) > 1e-9])
    assert 0.01 < want[causal].mean() < 0.5
    codes, sc = quantize_int8(jnp.asarray(kn, jnp.float32))
    rc, rs = np_int8(kn)
    assert np.abs(np.asarray(codes, np.float64) - rc).max() <= 1 and np.mean(np.asarray(codes) != rc) < 1e-3
    np.testing.assert_allclose(np.asarray(sc), rs, rtol=1e-6)


def test_sale_calibrate_taus_to_budget():
    """calibrate_taus: each head's log tau_h is its float64 spec block score of rank
    floor(budget * n) among the blocks outside sink + local, so about the budget fraction of those
    blocks pass its threshold, and the heads get different taus. (Per-head taus in the selection:
    the per-head-tau case of test_sale_block_mask_matches_float64_spec.)"""
    from kvjax.sparse_prefill.base import Geometry, sink_local
    from kvjax.sparse_prefill.sale import calibrate_taus
    shape = dict(MID, hq=3, hkv=3, b=1, starts=[[0, 0, 0]], lengths=[[290, 290, 290]])
    q, k, _, starts, lengths = local_inputs(6, **shape)
    sale = SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16)
    geo = Geometry(t=shape["t"], s=shape["s"], block_size=16, starts=starts, lengths=lengths)
    budget = 0.3
    calib = jax.jit(lambda q, k: calibrate_taus(sale, q, k, geo, 0.25, budget))
    tau_h = np.asarray(calib(q, k), np.float64)
    free = np.asarray(geo.live_blocks() & ~sink_local(geo, sale.sink, sale.local))[0]     # [h, nqb, nkb]
    qslots = np.arange(290 - 70, 290)
    causal = np.arange(300)[None] <= qslots[:, None]                                       # [T, S]
    for h in range(3):
        qn, kn = np.asarray(q[0, h], np.float64), np.asarray(k[0, h], np.float64)
        est, thr, _ = np_sale_scores(qn, kn, list(qslots), 0, 290, sale, 0.25, tau=1.0)    # thr = m + log l
        rel = np.where(causal, est - thr[:, None], -np.inf)
        rel = np.pad(rel, ((0, 80 - 70), (0, 304 - 300)), constant_values=-np.inf)
        rel = rel.reshape(5, 16, 19, 16).max((1, 3))                                       # [nqb, nkb]
        sc = np.sort(rel[free[h]])[::-1]
        kk = int(np.floor(budget * free[h].sum()))
        np.testing.assert_allclose(np.log(tau_h[h]), sc[kk], rtol=1e-4, atol=1e-4 * np.abs(sc[kk]))
        assert abs((sc > np.log(tau_h[h])).sum() - kk) <= 1
    assert len(set(np.round(tau_h, 6))) == 3                          # heads differ


def test_sale_attend_matches_masked_float64_attention():
    """The interpreted GPU kernel over SALE's lists = float64 attention restricted to the spec's mask
    (SMALL: 37-query chunk, unaligned offsets, left padding)."""
    sale = SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16)
    _attend_check(sale, SMALL, 4, "interpret", np_sale_mask)


def _attend_check(method, shape, seed, backend, np_mask):
    q, k, v, starts, lengths = local_inputs(seed, **shape)
    slot = jnp.arange(shape["s"])
    pos = jnp.where((slot >= starts[..., None]) & (slot < lengths[..., None]), slot, -1)
    cache = KVCache(keys=k, values=v, positions=pos.astype(jnp.int32), lengths=lengths)
    qpos = (lengths[:, 0:1] - shape["t"] + jnp.arange(shape["t"])).astype(jnp.int32)
    out, obs = jax.jit(lambda q, c, p: attend(method, q, c, p, backend=backend))(q, cache, qpos)
    ref_mask = np_mask(method, q, k, np.asarray(starts), np.asarray(lengths))
    ref = np_attention(q, k, v, np.asarray(starts), np.asarray(lengths), ref_mask, method.block_size)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 2e-5, err
    np.testing.assert_array_equal(np.asarray(obs["prefill_density"])[..., 0], ref_mask.sum((-1, -2)))


def test_sale_errors():
    for spec, msg in [("sale:tau=0", "tau"), ("sale:tau=1.5", "tau"), ("sale:local=0", "local >= 1"),
                      ("sale:bogus=1", "bogus")]:
        with pytest.raises(ValueError, match=msg):
            make_sparse_prefill(spec)
    for bad in (((0.1, 0.2), (0.1,)), ((0.1, 1.0),)):
        with pytest.raises(ValueError, match="taus must be"):
            SALE(taus=bad)
    from kvjax.sparse_prefill import check_sparse_prefill
    from types import SimpleNamespace
    with pytest.raises(ValueError, match=r"taus must be \[layers=2\]\[q_heads=3\]"):
        check_sparse_prefill(SALE(taus=((0.1, 0.1, 0.1),)), SimpleNamespace(n_layers=2, n_heads=3))
    assert make_sparse_prefill("block_sparse:sale") == SALE(tau=0.004, sink=64, local=128, min_seq_len=1024,
                                                            block_size=64)


# ---------------------------------------------------------------------------------------------
# HyperAttention

from kvjax.sparse_prefill import HyperAttention  # noqa: E402


def np_gray(k):
    """reflected binary Gray code of k (the official perm[k])."""
    return k ^ (k >> 1)


def np_bucket(x, planes):
    bits = (x @ planes > 0).astype(int)
    return np_gray(int(sum(int(bit) << r for r, bit in enumerate(bits))))


def np_regions(lo, hi, hy, out):
    """The causal halving on key blocks [lo, hi): out[(a, j)] = "dense" or the rectangle's columns
    (c0, c1) for every causal pair, recursively (hy: the HyperAttention config)."""
    n = hi - lo
    if n * hy.block_size <= hy.min_seq_len:
        for a in range(lo, hi):
            for j in range(lo, a + 1):
                out[(a, j)] = "dense"
        return
    mid = lo + (n + 1) // 2
    np_regions(lo, mid, hy, out)
    np_regions(mid, hi, hy, out)
    for a in range(mid, hi):
        for j in range(lo, mid):
            out[(a, j)] = "dense" if (hi - mid) * hy.block_size < hy.min_seq_len else (lo, mid)


def np_hyper_mask(hy, q, k, starts, lengths, planes, draws):
    """Float64 block form of HyperAttention (module docstring of kvjax.sparse_prefill.hyper) with the
    method's hyperplanes and sample draws."""
    import bisect
    planes, draws = np.asarray(planes, np.float64), np.asarray(draws, np.float64)
    bs, gsz = hy.block_size, hy.lsh_block // hy.block_size
    heads = iter([(bi, h) for bi in range(q.shape[0]) for h in range(q.shape[1])])   # np_head_union's order

    def head(qh, kh, st, ln, live, firsts):
        bi, h = next(heads)
        t, nqb, nkb = qh.shape[0], *live.shape
        regions = {}
        np_regions(st // bs, -(-ln // bs), hy, regions)
        kb = [np_bucket(kh[max(j * bs, st):min((j + 1) * bs, ln)].mean(0), planes) for j in range(nkb)
              if j * bs < ln] + [0] * nkb
        m = np.zeros((nqb, nkb), bool)
        orders = {}                                    # rectangle -> its key blocks sorted by (bucket, index)
        for i in range(nqb):
            hq_i = np_bucket(qh[i * bs:min((i + 1) * bs, t)].mean(0), planes)
            last = ln - t + min((i + 1) * bs, t) - 1
            for a in {firsts[i] // bs, last // bs}:
                for j in range(nkb):
                    r = regions.get((a, j))
                    if r == "dense":
                        m[i, j] = True
                    elif r is not None:
                        c0, c1 = r
                        if r not in orders:
                            orders[r] = sorted(range(c0, c1), key=lambda x: (kb[x], x))
                        order = orders[r]
                        ins = bisect.bisect_left([kb[x] for x in order], hq_i)
                        group = min(ins // gsz, (c1 - c0 - 1) // gsz)
                        sampled = [c0 + int(np.floor(u * (c1 - c0))) for u in draws[bi, h]]
                        m[i, j] |= j in order[group * gsz:(group + 1) * gsz] or j in sampled
        for j in range(st, min(st + hy.sink, ln)):     # sink tokens: their blocks at every query block
            m[:, j // bs] = True
        return m
    return np_head_union(hy, q, k, starts, lengths, head)


HYPER_CASES = [
    (HyperAttention(lsh_num_projs=3, lsh_block=32, sample_size=16, min_seq_len=32, block_size=16, sink=0), MID, 21,
     "sparse"),
    (HyperAttention(lsh_num_projs=7, lsh_block=32, sample_size=0, min_seq_len=32, block_size=16, sink=20), MID, 22,
     "sparse"),                                  # sink of 20 tokens: 2 blocks at starts 0, 2 at starts 9
]


@pytest.mark.parametrize("hy,shape,seed,expect", HYPER_CASES, ids=["r3-sampled-nosink", "r7-lsh-only-sink20"])
def test_hyper_block_mask_matches_float64_spec(hy, shape, seed, expect):
    q, k, _, starts, lengths = _inputs(seed, **shape)
    mask, live = _block_mask(hy, q, k, starts, lengths)
    mask, live = np.asarray(mask), np.asarray(live)
    planes, draws = hy.draws(0, shape["d"], shape["b"], shape["hq"])
    ref = np_hyper_mask(hy, q, k, np.asarray(starts), np.asarray(lengths), planes, draws)
    assert np.array_equal(mask, ref), (np.argwhere(mask != ref), ref.mean())
    assert 0 < ref.sum() < 0.9 * live.sum()


def test_hyper_gray_buckets_and_regions():
    """The bucket table is the reflected Gray code (neighbours differ in one bit); the halving's
    regions tile the causal block triangle: 8 blocks of 16, min 32 -> dense diagonal squares of 2,
    rectangles of 2 rows dense (2 * 16 >= 32 is hyper), 4 rows hyper."""
    from kvjax.sparse_prefill.hyper import DENSE, HYPER, NONE, gray_order
    perm = gray_order(7)
    assert np.array_equal(perm, np_gray(np.arange(128)))
    assert all(bin(int(x) ^ int(y)).count("1") == 1 for x, y in zip(perm[:-1], perm[1:]))
    hy = HyperAttention(min_seq_len=32, block_size=16, lsh_block=32)
    from kvjax.sparse_prefill.base import Geometry
    geo = Geometry(t=128, s=128, block_size=16, starts=jnp.zeros((1, 1), jnp.int32),
                   lengths=jnp.full((1, 1), 128, jnp.int32))
    a = jnp.arange(8)[None, None, :, None]
    state, c0, c1 = hy._regions(a, jnp.broadcast_to(jnp.arange(8), (1, 1, 8, 8)), geo.starts, geo.lengths, geo)
    ref = {}
    np_regions(0, 8, hy, ref)
    for ai in range(8):
        for j in range(8):
            r = ref.get((ai, j))
            want = NONE if r is None else DENSE if r == "dense" else HYPER
            assert int(state[0, 0, ai, j]) == want, (ai, j)
            if want == HYPER:
                assert (int(c0[0, 0, ai, j]), int(c1[0, 0, ai, j])) == r
    assert int((state == HYPER).sum()) == 4 * 4 + 2 * (2 * 2)       # rows 4-7 x cols 0-3, 2 rects of 2x2


def test_hyper_exact_below_min_len_and_sparse_attention():
    """Below min_seq_len the kernel output is dense causal attention (float64 reference); a sparse
    setting runs through the interpreted GPU kernel to the float64 attention over its mask."""
    hy = HyperAttention(block_size=16)
    _attend_check(hy, SMALL, 24, "xla", lambda m, q, k, st, ln: np.asarray(_block_mask(m, q, k, st, ln)[1]))
    sparse = HyperAttention(lsh_num_projs=3, lsh_block=16, sample_size=16, min_seq_len=16, block_size=16, sink=16)
    planes, draws = sparse.draws(0, SMALL["d"], SMALL["b"], SMALL["hq"])
    _attend_check(sparse, SMALL, 21, "interpret",
                  lambda m, q, k, st, ln: np_hyper_mask(m, q, k, st, ln, planes, draws))


def test_hyper_sink_reduces_attention_error():
    """Inputs with an attention sink (the first live key aligned with the mean query, as trained
    models have): listing the sink block cuts the attention-output error of the sparse selection vs
    dense float64 attention by more than half (measured: 0.66 -> 0.10 relative error, 226 -> 235 of 318 blocks), at a density
    rise of at most one block per query block."""
    q, k, v, starts, lengths = _inputs(23, **MID)
    first = np.asarray(starts)[:, 0]
    q = q.at[..., 2].add(2.0)                                                        # a shared query direction
    k = k.at[jnp.arange(2), :, first, 2].add(12.0)                                  # ~half of each row's mass
    st, ln = np.asarray(starts), np.asarray(lengths)
    dense = np_attention(q, k, v, st, ln, np.ones((2, 2, 5, 19), bool), 16)
    errs, listed = [], []
    for sink in (0, 16):
        hy = HyperAttention(lsh_num_projs=3, lsh_block=32, sample_size=16, min_seq_len=32, block_size=16, sink=sink)
        mask, live = (np.asarray(x) for x in _block_mask(hy, q, k, starts, lengths))
        out = np_attention(q, k, v, st, ln, mask, 16)
        errs.append(np.linalg.norm(out - dense) / np.linalg.norm(dense))
        listed.append(mask.sum())
    assert errs[1] < 0.5 * errs[0], errs
    assert listed[0] < listed[1] <= listed[0] + 2 * 2 * 5 and listed[1] < 0.9 * live.sum(), (listed, live.sum())


def test_hyper_errors():
    for spec, msg in [("hyper:lsh_num_projs=0", "lsh_num_projs"), ("hyper:lsh_block=16", "lsh_block >= block_size"),
                      ("hyper:sample_size=-1", "sample_size >= 0"), ("hyper:sink=-1", "sink >= 0"),
                      ("hyper:bogus=1", "bogus")]:
        with pytest.raises(ValueError, match=msg):
            make_sparse_prefill(spec)
    assert make_sparse_prefill("block_sparse:hyper") == HyperAttention(7, 256, 256, 4096, 64, 0, 64)
