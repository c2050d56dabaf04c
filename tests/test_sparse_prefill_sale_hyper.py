"""SALE and HyperAttention sparse prefill (kvjax.sparse_prefill.sale / .hyper) vs float64 numpy
re-derivations of their specs (shared/methods quantization_and_sparse_attention.md §8, §9), the
attention they drive, and their errors.

Geometry, inputs and the masked float64 attention come from test_sparse_prefill (odd chunk
lengths, unaligned query offsets, left padding).
"""
import functools

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


# ---------------------------------------------------------------------------------------------
# SALE


def np_int8(x):
    """per-row symmetric int8 of a float64 matrix -> (codes, scales)."""
    amax = np.abs(x).max(-1)
    sc = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(x / sc[:, None]), -127, 127), sc


def np_sale_scores(q, k, qslots, starts, length, sale, scale):
    """float64 spec of SALE for one query head: (estimate [T, S], exact sink+local threshold [T],
    pair wanted [T, S]); q [T, d], k [S, d]."""
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
        thr[i] = m + np.log(sale.tau * np.exp(z - m).sum())
        want[i, seen] = np.exp(est[i, seen] - m) / np.exp(z - m).sum() > sale.tau      # relative score
    return est, thr, want


def np_sale_mask(sale, q, k, starts, lengths):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, bs = hq // hkv, sale.block_size
    out = None
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            st, ln = int(starts[bi, kh]), int(lengths[bi, kh])
            live, firsts, nqb, nkb = np_geometry(t, s, bs, st, ln)
            if out is None:
                out = np.zeros((b, hkv, nqb, nkb), bool)
            if ln - st <= sale.min_seq_len:
                out[bi, kh] |= live
                continue
            qslots = [ln - t + i for i in range(t)]
            _, _, want = np_sale_scores(q[bi, h], k[bi, kh], qslots, st, ln, sale, d ** -0.5)
            m = np.zeros((nqb, nkb), bool)
            for i, j in zip(*np.nonzero(want)):
                m[i // bs, j // bs] = True
            for i in range(nqb):                       # sink + local blocks (token rule per query slot)
                for qs in range(firsts[i], firsts[i] + bs):
                    for j in range(nkb * bs):
                        if st <= j < st + sale.sink or qs - sale.local < j <= qs:
                            m[i, j // bs] = True
            out[bi, kh] |= m & live
    return out


SALE_CASES = [
    (SALE(tau=0.05, sink=4, local=20, min_seq_len=16, block_size=16), MID, 3, "sparse"),     # density ~0.58
    (SALE(tau=0.01, sink=4, local=20, min_seq_len=16, block_size=16), MID, 3, "sparse"),     # ~0.84
    (SALE(tau=0.05, sink=4, local=20, min_seq_len=300, block_size=16), MID, 5, "dense"),    # context <= 300
]


@pytest.mark.parametrize("sale,shape,seed,expect", SALE_CASES, ids=["mid", "mid-tau0.01", "dense-fallback"])
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
    assert make_sparse_prefill("block_sparse:sale") == SALE(tau=0.004, sink=64, local=128, min_seq_len=1024,
                                                            block_size=64)
