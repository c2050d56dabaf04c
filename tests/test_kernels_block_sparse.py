"""block_sparse_prefill (block-sparse causal chunked prefill): GPU (Pallas-Triton) and TPU (Mosaic)
kernels in interpret mode and the pure-jnp reference, against a float64 numpy oracle written
row by row from the contract (a query sees slot s iff s's block is listed for its query block and
starts <= s <= lengths - T + t); plus the full causal list = dense flash prefill, lowering on
CPU and errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels.gpu.block_sparse_prefill import block_sparse_prefill as gpu_bsp
from pallas_kernels.tpu.block_sparse_prefill import block_sparse_prefill as tpu_bsp

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def oracle(q, k, v, starts, lengths, idx, counts, bs, cols=None, col_counts=None):
    """float64, one query row at a time (cols / col_counts: the listed single columns)."""
    b, hq, t_len, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    g = hq // hkv
    out = np.zeros(q.shape)
    for i in range(b):
        for h in range(hq):
            kv = h // g
            for t in range(t_len):
                row = idx[i, kv, t // bs, :counts[i, kv, t // bs]]
                listed = set(int(x) for x in row)
                columns = set() if cols is None else set(int(x) for x in cols[i, kv, t // bs, :col_counts[i, kv, t // bs]])
                last = min(int(lengths[i, kv]) - t_len + t, int(lengths[i, kv]) - 1)
                slots = [s for s in range(max(int(starts[i, kv]), 0), last + 1) if s // bs in listed or s in columns]
                if not slots:
                    continue
                s = k[i, kv, slots] @ q[i, h, t] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[i, h, t] = p @ v[i, kv, slots] / p.sum()
    return out


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def make_case(seed, g, t_len, cap, d, bs, dtype, starts, lengths, m=6, density=0.5, n_cols=0):
    """Random q/k/v (batch 2, kv heads 2; NaN in dead slots) and random lists: entries past the
    count, duplicates, negative and out-of-range indices included. n_cols > 0: column lists of
    n_cols entries too (the same kinds of entries, plus columns inside listed blocks and slots
    after the row's queries), appended to the arguments."""
    rng = np.random.default_rng(seed)
    b, hkv = 2, 2
    starts, lengths = np.asarray(starts, np.int32), np.asarray(lengths, np.int32)
    nqb, nkb = -(-t_len // bs), -(-cap // bs)
    q = jnp.asarray(rng.standard_normal((b, hkv * g, t_len, d)), dtype)
    k = _f64(jnp.asarray(rng.standard_normal((b, hkv, cap, d)) * 1.5, dtype))
    v = _f64(jnp.asarray(rng.standard_normal((b, hkv, cap, d)), dtype))
    idx = rng.integers(-1, nkb + 1, (b, hkv, nqb, m)).astype(np.int32)
    idx[..., 1] = idx[..., 0]                                          # a duplicate
    counts = rng.binomial(m, density, (b, hkv, nqb)).astype(np.int32)
    counts[0, 0, 0] = 0                                                # an empty list
    idx[1, :, :, 0] = np.arange(nqb)[None, :]                          # a diagonal block listed
    counts[1] = np.maximum(counts[1], 1)
    cols = col_counts = None
    if n_cols:
        cols = rng.integers(-2, cap + 2, (b, hkv, nqb, n_cols)).astype(np.int32)
        cols[..., 1] = cols[..., 0]                                    # a duplicate
        cols[..., 2] = np.clip(idx[..., 0], 0, nkb - 1) * bs + 1       # inside a (maybe) listed block
        col_counts = rng.integers(0, n_cols + 1, (b, hkv, nqb)).astype(np.int32)
        col_counts[0, 1, 0] = n_cols
    want = oracle(_f64(q), k, v, starts, lengths, idx, counts, bs, cols, col_counts)
    slot = np.arange(cap)[None, None, :]
    dead = (slot < starts[..., None]) | (slot >= lengths[..., None])
    k[dead], v[dead] = np.nan, np.nan
    args = (q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(starts), jnp.asarray(lengths),
            jnp.asarray(idx), jnp.asarray(counts))
    if n_cols:
        args += (jnp.asarray(cols), jnp.asarray(col_counts))
    return args, want


def _check(got, want, dtype):
    got = _f64(got)
    assert got.shape == want.shape and np.isfinite(got).all()
    seen = np.abs(want).sum(-1) > 0
    assert np.all(got[~seen] == 0.0)                       # a query that sees nothing: zeros
    assert seen.any()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < TOL[dtype], rel


# (g, T, cap, d, block_size, dtype, starts, lengths): rows of starts/lengths are batch items.
CASES = [
    # GQA 1, no offset (lengths == T), odd T, f32
    (1, 37, 40, 16, 16, jnp.float32, [[0, 3], [0, 20]], [[37, 37], [37, 37]]),
    # GQA 3, offset (chunk after a cached prefix), not block-aligned, empty head, bf16
    (3, 29, 150, 32, 16, jnp.bfloat16, [[0, 110], [40, 33]], [[150, 140], [40, 120]]),
    # GQA 4, offset, cap not a multiple of the block (shifted last block), block 32
    (4, 45, 190, 16, 32, jnp.float32, [[0, 65], [0, 130]], [[190, 189], [45, 175]]),
    # GQA 8, lengths < T (blind first queries), a cache smaller than a block
    (8, 9, 13, 16, 16, jnp.float32, [[0, 2], [13, 1]], [[13, 9], [13, 6]]),
]
_ref = jax.jit(reference.block_sparse_prefill, static_argnames="block_size")


def _full_lists(args, bs):
    """Every key block listed, in reverse order with -1 and n_kb around (ignored): same shape as
    the random lists (m = n_kb + 2), so the compiled kernel is reused."""
    q, k, v, st, ln, idx, cnt = args
    nkb = -(-k.shape[2] // bs)
    full = jnp.broadcast_to(jnp.arange(nkb + 2)[::-1] - 1, idx.shape).astype(jnp.int32)
    return (q, k, v, st, ln, full, jnp.full(cnt.shape, nkb + 2, jnp.int32))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[0]}-T{c[1]}-S{c[2]}-b{c[4]}-{jnp.dtype(c[5]).name}")
def test_gpu_kernel_and_reference_match_oracle(case):
    """Random lists vs the oracle; the full causal list vs the dense flash prefill reference."""
    g, t_len, cap, d, bs, dtype, starts, lengths = case
    nkb = -(-cap // bs)
    args, want = make_case(g * 100 + t_len, g, t_len, cap, d, bs, dtype, starts, lengths, m=nkb + 2)
    gpu = functools.partial(gpu_bsp, block_size=bs, block_rows=64, interpret=True)
    _check(gpu(*args), want, dtype)
    _check(_ref(*args, block_size=bs), want, dtype)
    full = _full_lists(args, bs)
    dense = _f64(reference.flash_prefill(*full[:5]))
    np.testing.assert_allclose(_f64(gpu(*full)), dense, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(_f64(_ref(*full, block_size=bs)), dense, rtol=1e-6, atol=1e-6)


def test_tpu_kernel_matches_oracle():
    """TPU kernel (interpret): GQA 3 with an offset, bf16, random lists and the full list."""
    g, t_len, cap, d, bs, dtype, starts, lengths = CASES[1]
    args, want = make_case(5, g, t_len, cap, d, bs, dtype, starts, lengths, m=-(-cap // bs) + 2)
    tpu = functools.partial(tpu_bsp, block_size=bs, block_rows=64, interpret=True)
    _check(tpu(*args), want, dtype)
    full = _full_lists(args, bs)
    np.testing.assert_allclose(_f64(tpu(*full)), _f64(reference.flash_prefill(*full[:5])),
                               rtol=TOL[dtype], atol=TOL[dtype])


def _columns(fn, args, bs, **kw):
    return fn(*args[:7], column_indices=args[7], column_counts=args[8], block_size=bs, **kw)


def _all_columns(args, bs):
    """Empty block lists, every slot listed as a column (reversed, -1 and S around): the dense result."""
    q, k, v, st, ln, idx, cnt, cols, ccnt = args
    cap = k.shape[2]
    every = jnp.broadcast_to(jnp.arange(cap + 2)[::-1] - 1, cols.shape[:3] + (cap + 2,)).astype(jnp.int32)
    return (q, k, v, st, ln, idx, jnp.zeros_like(cnt), every, jnp.full(ccnt.shape, cap + 2, jnp.int32))


@pytest.mark.parametrize("case,n_cols", [(CASES[2], 23), (CASES[3], 15)], ids=["g4-T45-S190-b32", "g8-T9-S13"])
def test_vertical_columns_gpu_kernel_and_reference(case, n_cols):
    """The column-gather form (MInference's vertical lines): blocks + random single columns vs
    the oracle (odd T, offsets, a partial last block, GQA 4 / 8); columns alone (empty block
    lists) covering every slot = the dense flash prefill (S + 2 = n_cols: the same compiled kernel)."""
    g, t_len, cap, d, bs, dtype, starts, lengths = case
    args, want = make_case(g * 7 + cap, g, t_len, cap, d, bs, dtype, starts, lengths, m=4, n_cols=n_cols)
    gpu = functools.partial(gpu_bsp, block_rows=64, column_block=16, interpret=True)
    _check(_columns(gpu, args, bs), want, dtype)
    _check(_columns(_ref, args, bs), want, dtype)
    blocks_only = oracle(*map(_f64, args[:5]), *map(np.asarray, args[5:7]), bs)
    assert np.linalg.norm(want - blocks_only) > 0.1 * np.linalg.norm(want)     # the columns matter
    if cap + 2 == n_cols:
        every = _all_columns(args, bs)
        dense = _f64(reference.flash_prefill(*every[:5]))
        np.testing.assert_allclose(_f64(_columns(gpu, every, bs)), dense, rtol=TOL[dtype], atol=TOL[dtype])
        np.testing.assert_allclose(_f64(_columns(_ref, every, bs)), dense, rtol=1e-6, atol=1e-6)


def test_vertical_columns_tpu_kernel():
    """TPU kernel (interpret): GQA 3 with an offset, bf16, blocks + columns (one-row DMA gathers)."""
    g, t_len, cap, d, bs, dtype, starts, lengths = CASES[1]
    args, want = make_case(6, g, t_len, cap, d, bs, dtype, starts, lengths, m=4, n_cols=19)
    tpu = functools.partial(tpu_bsp, block_rows=64, column_block=8, interpret=True)
    _check(_columns(tpu, args, bs), want, dtype)


def test_dispatch_and_errors():
    args, want = make_case(3, 2, 20, 32, 16, 16, jnp.float32, [[0, 0], [0, 0]], [[32, 32], [20, 20]])
    got = pallas_kernels.block_sparse_prefill(*args, block_size=16, num_warps=4)   # cpu: reference
    _check(got, want, jnp.float32)
    assert pallas_kernels.resolve("block_sparse_prefill", "gpu")[0] is gpu_bsp
    assert pallas_kernels.resolve("block_sparse_prefill", "tpu")[0] is tpu_bsp
    q, k, v, st, ln, idx, cnt = args
    with pytest.raises(ValueError, match="block_indices must be"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx[:, :, :1], cnt, block_size=16)
    with pytest.raises(ValueError, match="block_counts must be"):
        gpu_bsp(q, k, v, st, ln, idx, cnt[:, :1], block_size=16, interpret=True)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        gpu_bsp(q, k, v, st, ln, idx[:, :, :1], cnt[:, :, :1], block_size=24, interpret=True)
    with pytest.raises(ValueError, match="block_size must be a multiple of 8"):
        tpu_bsp(q, k, v, st, ln, idx, cnt, block_size=12, interpret=True)
    with pytest.raises(ValueError, match="must be integer"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx.astype(jnp.float32), cnt, block_size=16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=0)
    with pytest.raises(ValueError, match="column_indices and column_counts go together"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=16, column_indices=idx)
    with pytest.raises(ValueError, match="column_indices must be"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=16, column_indices=idx[:, :1],
                                       column_counts=cnt)
    with pytest.raises(ValueError, match="column_counts must be integer"):
        reference.block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=16, column_indices=idx,
                                       column_counts=cnt.astype(jnp.float32))
    with pytest.raises(ValueError, match="column_block must be a power of two"):
        gpu_bsp(q, k, v, st, ln, idx, cnt, block_size=16, column_indices=idx, column_counts=cnt, column_block=24,
                interpret=True)
    with pytest.raises(ValueError, match="column_block must be a multiple of 8"):
        tpu_bsp(q, k, v, st, ln, idx, cnt, block_size=16, column_indices=idx, column_counts=cnt, column_block=12,
                interpret=True)
    empty = gpu_bsp(q[:, :, :0], k, v, st, ln, idx[:, :, :0], cnt[:, :, :0], block_size=16, interpret=True)
    assert empty.shape == (2, 4, 0, 16)


def test_kernels_lower():
    """GPU kernel -> Triton IR, TPU kernel -> Mosaic custom call (lowered on CPU, not executed)."""
    q = jnp.zeros((1, 8, 300, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, 1000, 128), jnp.bfloat16)
    st = jnp.zeros((1, 2), jnp.int32)
    idx, cnt = jnp.zeros((1, 2, 3, 5), jnp.int32), jnp.ones((1, 2, 3), jnp.int32)
    cols, ccnt = jnp.zeros((1, 2, 3, 40), jnp.int32), jnp.ones((1, 2, 3), jnp.int32)
    for fn in (lambda *a: tpu_bsp(*a, block_size=128),
               lambda *a: tpu_bsp(*a, block_size=128, column_indices=cols, column_counts=ccnt)):
        text = jax.jit(fn).trace(q, k, k, st, st + 900, idx, cnt).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text
    try:
        fn = lambda *a: gpu_bsp(*a, block_size=128, column_indices=cols, column_counts=ccnt)
        text = jax.jit(fn).trace(q, k, k, st, st + 900, idx, cnt).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # jax >= 0.11 needs a (possibly abstract) GPU device to lower for cuda
        if "No supported GPU devices found" in str(e):
            pytest.skip("this jax cannot lower for cuda without a GPU device (jax >= 0.11)")
        raise
    assert "triton" in text.lower()
